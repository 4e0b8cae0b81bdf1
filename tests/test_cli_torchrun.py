"""Every training command runs under `torchrun` unchanged (2 gloo processes on the CPU): it finishes, and the run
record written by rank 0 says 2 processes. (seq2seq, non-termination and dialogpt-train are also checked against
one process in their own test files; this file covers the others.)"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SIMBOOK = shutil.which("simbook") or str(Path(sys.executable).parent / "simbook")

COMMANDS = {
    "smoothness": ["smoothness", "--steps", "3", "--compare-steps", "2", "--lrs", "3", "--clipped-lrs", "3",
                   "--embed-size", "8", "--hidden-size", "16", "--batch-size", "4", "--seq-len", "8"],
    "mgs": ["mgs", "--pretrain-steps", "2", "--finetune-steps", "1", "--width", "16", "--layers", "1",
            "--batch-size", "4", "--num-prompts", "4", "--cap", "8", "--num-candidates", "2"],
    "vae": ["vae", "--epochs", "1", "--batch-size", "100", "--classifier-epochs", "1", "--held-out", "100"],
    "ig-sentiment": ["ig-sentiment", "--steps", "3", "--batch-size", "8", "--held-out", "50", "--explain", "1",
                     "--eval-every", "3", "--width", "8", "--channels", "8"],
    "ig-study": ["ig-study", "--seeds", "0", "1", "--train-steps", "2", "--reviews", "10", "--ig-steps", "2"],
    "simbert-pretrain": ["simbert", "pretrain", "--steps", "2", "--batch-size", "8", "--hidden-size", "32",
                         "--num-layers", "1", "--num-heads", "2"],
    "simbert-train": ["simbert", "train", "--steps", "2", "--batch-pairs", "4", "--no-eval"],
}


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_command_runs_under_torchrun(name, tmp_path):
    save = tmp_path / name
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", COLUMNS="100")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", SIMBOOK,
               *COMMANDS[name], "--device", "cpu", "--threads", "1", "--no-progress", "--save", str(save)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((save / "record.json").read_text())
    assert record["world_size"] == 2 and record["status"] == "finished"
    assert "--save" in record["command"]

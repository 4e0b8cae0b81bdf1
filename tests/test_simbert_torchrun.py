"""SimBERT's joint loss does not depend on the number of processes: `torchrun --nproc_per_node 2` (gloo, CPU) gives
the per-step losses of one process on the same global batch (within 1e-5), with and without hard negatives. The
similarity loss gathers its in-batch negatives from every process (`gather_with_grad`); the generation loss carries
the global batch's rows per target token (`with_global_scale`)."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent('''
    import json
    import sys

    import torch

    from simbook.experiments.simbert import SimBertTrainConfig, new_simbert, train_simbert
    from simbook.text import CharTokenizer
    from simbook.training import is_main_process, world_size

    out, hard = sys.argv[1], sys.argv[2] == "hard"
    torch.set_num_threads(1)
    groups = [[f"第{i}号房间很干净", f"第{i}号房间非常干净", f"{i}号房间挺干净呀"] for i in range(12)]
    tokenizer = CharTokenizer.build([s for g in groups for s in g] + ["很脏"])
    model = new_simbert(tokenizer, hidden_size=32, num_layers=1, num_heads=2, maxlen=16, seed=0)
    negatives = {s: [s.replace("干净", "脏")] for g in groups[::2] for s in g} if hard else None
    config = SimBertTrainConfig(steps=4, batch_pairs=4, lr=1e-3)
    history = train_simbert(model, groups, config, negatives=negatives, device="cpu", seed=0, progress=False)
    if is_main_process():
        with open(out, "w") as f:
            json.dump({"loss": history["loss"], "world_size": world_size()}, f)
''')


def _run(tmp_path, processes: int, mode: str) -> dict:
    script = tmp_path / "train.py"
    script.write_text(SCRIPT, encoding="utf-8")
    out = tmp_path / f"losses-{processes}-{mode}.json"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    launcher = ([sys.executable] if processes == 1 else
                [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"])
    done = subprocess.run([*launcher, str(script), str(out), mode], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("mode", ["plain", "hard"])
def test_two_processes_give_the_losses_of_one(tmp_path, mode):
    one = _run(tmp_path, 1, mode)
    two = _run(tmp_path, 2, mode)
    assert one["world_size"] == 1 and two["world_size"] == 2
    assert len(one["loss"]) == len(two["loss"]) == 4
    gap = max(abs(a - b) for a, b in zip(one["loss"], two["loss"]))
    print(f"{mode}: losses {one['loss']} vs {two['loss']}; largest difference {gap:.2e}")
    assert gap < 1e-5
    assert min(one["loss"][1:]) < one["loss"][0]                    # it trained

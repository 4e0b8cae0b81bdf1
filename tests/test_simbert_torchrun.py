"""SimBERT's joint loss does not depend on the number of processes: `torchrun --nproc_per_node 2` (gloo, CPU) gives
the per-step losses of one process on the same global batch (within 1e-5), with and without hard negatives. The
similarity loss gathers its in-batch negatives from every process (`gather_with_grad`); the generation loss carries
the global batch's rows per target token (`with_global_scale`)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

WORKER = Path(__file__).parent / "workers" / "train_simbert.py"


def _run(tmp_path, processes: int, mode: str) -> dict:
    out = tmp_path / f"losses-{processes}-{mode}.json"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]))
    launcher = ([sys.executable] if processes == 1 else
                [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"])
    done = subprocess.run([*launcher, str(WORKER), str(out), mode], env=env, cwd=tmp_path, capture_output=True,
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

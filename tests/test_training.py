"""simbook.training: the one trainer. Resume equals the uninterrupted run, micro-batches and processes agree with
one whole batch, checkpoints are atomic and refuse what they cannot restore, the command-line helpers round-trip."""
import argparse
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from torch import nn

from simbook.optim.clipping import GradientClipper
from simbook.training import (RunRecord, add_config_arguments, add_run_arguments, batch_rows, config_from_args, fit,
                              latest_checkpoint, load_record, resolve_device, schedule_factor, shard, start_run)

pytestmark = pytest.mark.usefixtures("one_thread")
WORKER = Path(__file__).parent / "workers" / "train_gpt.py"
sys.path.insert(0, str(WORKER.parent))
import train_gpt  # noqa: E402


def tiny_problem(seed: int = 0):
    data_x, data_keep = torch.randn(64, 5, 3, generator=torch.Generator().manual_seed(seed)), None
    data_keep = torch.rand(64, 5, generator=torch.Generator().manual_seed(seed + 1)) < 0.7

    def make():
        torch.manual_seed(1)
        return nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Dropout(0.1), nn.Linear(8, 1))

    def loss_fn(model, batch):
        return (model(batch["x"])[..., 0] ** 2)[batch["keep"]].mean()

    def batch_fn(step, generator):
        rows = torch.randint(64, (8,), generator=generator)
        return {"x": data_x[rows], "keep": data_keep[rows]}

    return make, loss_fn, batch_fn


def test_resume_equals_uninterrupted(tmp_path):
    make, loss_fn, batch_fn = tiny_problem()
    common = dict(steps=10, lr=1e-2, schedule="linear", warmup=2, progress=False, config={"c": 1},
                  clip=GradientClipper(0.5))
    straight = fit(make(), loss_fn, batch_fn, **common)

    def stop(model, batch, step):
        if step == 8:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        fit(make(), loss_fn, batch_fn, checkpoint_dir=tmp_path, checkpoint_every=3, before_update=stop,
            **{**common, "clip": GradientClipper(0.5)})
    assert latest_checkpoint(tmp_path).name == "step-6"
    resumed = fit(make(), loss_fn, batch_fn, checkpoint_dir=tmp_path, resume=True,
                  **{**common, "clip": GradientClipper(0.5)})
    assert resumed.losses == straight.losses[6:]                      # dropout masks included: RNG restored
    for p, q in zip(resumed.model.parameters(), straight.model.parameters()):
        assert torch.equal(p, q)


def test_micro_batches_equal_whole_batch():
    make, loss_fn, batch_fn = tiny_problem()
    model = make()
    model[2].p = 0.0                                                  # no dropout: the same masks are not drawn
    whole = fit(model, loss_fn, batch_fn, steps=5, weight_fn=lambda b: b["keep"].sum(), progress=False)
    model = make()
    model[2].p = 0.0
    split = fit(model, loss_fn, batch_fn, steps=5, weight_fn=lambda b: b["keep"].sum(), accumulate=4,
                progress=False)
    assert max(abs(a - b) for a, b in zip(whole.losses, split.losses)) < 1e-6


def test_shard_and_rows():
    batch = (torch.arange(6), {"m": torch.ones(6, 2)}, 3)
    assert batch_rows(batch) == 6
    assert shard(batch, 1, 3)[0].tolist() == [2, 3] and shard(batch, 1, 3)[2] == 3
    with pytest.raises(ValueError, match="cannot be split into 4 equal"):
        shard(batch, 0, 4)
    with pytest.raises(ValueError, match="disagree on the number of examples"):
        batch_rows({"a": torch.ones(3), "b": torch.ones(4)})


@pytest.mark.parametrize("device, message", [("tpu", "unknown device"), ("cuda:0", "no CUDA GPU"),
                                             ("gpu7", "unknown device")])
def test_bad_devices(device, message):
    if torch.cuda.is_available() and message == "no CUDA GPU":
        pytest.skip("CUDA is present")
    with pytest.raises(ValueError, match=message):
        resolve_device(device)


def test_bad_arguments():
    make, loss_fn, batch_fn = tiny_problem()
    with pytest.raises(ValueError, match="steps must be >= 1"):
        fit(make(), loss_fn, batch_fn, steps=0)
    with pytest.raises(ValueError, match="lr must be a positive"):
        fit(make(), loss_fn, batch_fn, steps=1, lr=-1.0)
    with pytest.raises(ValueError, match="schedule must be one of"):
        fit(make(), loss_fn, batch_fn, steps=1, schedule="step")
    with pytest.raises(TypeError, match="clip must be None or a callable"):
        fit(make(), loss_fn, batch_fn, steps=1, clip=1.0)
    with pytest.raises(ValueError, match="cannot be split into 3 equal micro-batches"):
        fit(make(), loss_fn, batch_fn, steps=1, accumulate=3, progress=False)
    with pytest.raises(ValueError, match="resume=True needs a checkpoint_dir"):
        fit(make(), loss_fn, batch_fn, steps=1, resume=True)
    with pytest.raises(FloatingPointError, match="at step 1"):
        fit(make(), lambda m, b: loss_fn(m, b) * float("nan"), batch_fn, steps=1, progress=False)


def test_resume_refusals(tmp_path):
    make, loss_fn, batch_fn = tiny_problem()
    with pytest.raises(ValueError, match="holds no checkpoint"):
        fit(make(), loss_fn, batch_fn, steps=2, checkpoint_dir=tmp_path, resume=True)
    fit(make(), loss_fn, batch_fn, steps=2, checkpoint_dir=tmp_path, config={"lr": 1}, progress=False)
    with pytest.raises(ValueError, match="another configuration .*lr: 1 in the checkpoint, 2 now"):
        fit(make(), loss_fn, batch_fn, steps=4, checkpoint_dir=tmp_path, resume=True, config={"lr": 2})
    with pytest.raises(ValueError, match="nothing left"):
        fit(make(), loss_fn, batch_fn, steps=2, checkpoint_dir=tmp_path, resume=True, config={"lr": 1})
    with pytest.raises(ValueError, match="holds a AdamW state, the run uses SGD"):
        fit(make(), loss_fn, batch_fn, steps=4, checkpoint_dir=tmp_path, resume=True, config={"lr": 1},
            optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    folder = latest_checkpoint(tmp_path)
    # a checkpoint of a model of another shape
    bigger = nn.Sequential(nn.Linear(3, 9), nn.Tanh(), nn.Dropout(0.1), nn.Linear(9, 1))
    with pytest.raises(ValueError, match="shape mismatches"):
        fit(bigger, loss_fn, batch_fn, steps=4, checkpoint_dir=tmp_path, resume=True, config={"lr": 1})
    # corrupt tensors, then a pickle in their place
    (folder / "trainer.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        fit(make(), loss_fn, batch_fn, steps=4, checkpoint_dir=tmp_path, resume=True, config={"lr": 1})
    torch.save({"w": torch.ones(2)}, folder / "trainer.safetensors")
    with pytest.raises(ValueError, match="pickled checkpoint"):
        fit(make(), loss_fn, batch_fn, steps=4, checkpoint_dir=tmp_path, resume=True, config={"lr": 1})
    (tmp_path / "latest.json").write_text("{not json")
    with pytest.raises(ValueError, match="latest.json is corrupt"):
        latest_checkpoint(tmp_path)


def test_failed_save_keeps_the_good_checkpoint(tmp_path, monkeypatch):
    make, loss_fn, batch_fn = tiny_problem()
    fit(make(), loss_fn, batch_fn, steps=2, checkpoint_dir=tmp_path, progress=False)
    good = (tmp_path / "step-2" / "trainer.safetensors").read_bytes()
    import safetensors.torch

    def broken(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        fit(make(), loss_fn, batch_fn, steps=4, checkpoint_dir=tmp_path, checkpoint_every=4, progress=False)
    assert latest_checkpoint(tmp_path).name == "step-2"
    assert (tmp_path / "step-2" / "trainer.safetensors").read_bytes() == good
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name]


def test_schedules():
    assert [schedule_factor(s, 4, "linear") for s in range(4)] == [1.0, 0.75, 0.5, 0.25]
    assert schedule_factor(0, 10, "constant", warmup=4) == 0.25
    with pytest.raises(ValueError):
        schedule_factor(0, 10, "exp")


@dataclass
class _Config:
    steps: int = field(default=300, metadata={"help": "training steps"})
    epsilons: tuple[float, ...] = (1e-2, 1e-3)
    clip: float | None = None
    mode: str = field(default="hard", metadata={"choices": ("hard", "soft")})
    fused: bool = False


def test_config_arguments_round_trip(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="x")
    add_config_arguments(parser, _Config)
    add_run_arguments(parser, name="x")
    assert config_from_args(_Config, parser.parse_args([])) == _Config()
    args = parser.parse_args(["--steps", "5", "--epsilons", "0.5", "--clip", "2", "--mode", "soft", "--fused",
                              "--save", str(tmp_path / "run"), "--device", "cpu"])
    assert config_from_args(_Config, args) == _Config(5, (0.5,), 2.0, "soft", True)
    with pytest.raises(SystemExit):
        parser.parse_args(["--mode", "medium"])
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    assert "training steps (default: 300)" in capsys.readouterr().out
    record = start_run(args, config_from_args(_Config, args), name="x")
    record.finish(loss=0.5)
    saved = load_record(tmp_path / "run")
    assert saved["config"]["epsilons"] == [0.5] and saved["final"] == {"loss": 0.5} and saved["status"] == "finished"
    assert saved["seed"] == 0 and saved["device"].startswith("cpu") and "torch" in saved["versions"]
    with pytest.raises(ValueError, match="holds no checkpoint to resume from"):
        start_run(parser.parse_args(["--resume", "--save", str(tmp_path / "none")]), name="x")
    with pytest.raises(ValueError, match="unknown device"):
        start_run(parser.parse_args(["--device", "tpu"]), name="x")


def test_record_is_inert_without_a_path():
    record = RunRecord.start(None, name="x", command="simbook x")
    record.log(1, a=1.0)
    record.finish(b=2.0)
    assert record.data["evaluations"] == [{"step": 1, "a": 1.0}]


def _run_worker(tmp_path, name, *args, processes=1):
    out = tmp_path / f"{name}.json"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(Path.cwd()), env.get("PYTHONPATH", "")]))
    if processes == 1:
        command = [sys.executable, str(WORKER), str(out), *args]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
                   str(WORKER), str(out), *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    return result, (json.loads(out.read_text()) if out.exists() else None)


def test_torchrun_two_processes_equal_one(tmp_path):
    """2 gloo processes and 1 process, same global batches (ragged token counts): the same per-step losses; the
    2-process checkpoint resumes in 1 process and continues like the 2-process run."""
    one_result, one = _run_worker(tmp_path, "one", "--steps", "6")
    assert one_result.returncode == 0, one_result.stderr[-2000:]
    two_result, two = _run_worker(tmp_path, "two", "--steps", "6", "--checkpoint", str(tmp_path / "ckpt"),
                                  processes=2)
    assert two_result.returncode == 0, two_result.stderr[-2000:]
    assert one["world_size"] == 1 and two["world_size"] == 2
    difference = max(abs(a - b) for a, b in zip(one["losses"], two["losses"]))
    print(f"largest per-step loss difference, 1 vs 2 processes: {difference:.2e}")
    assert len(two["losses"]) == 6 and difference < 1e-5
    # the 2-process run's last checkpoint (step 6) continues in one process like a straight 1-process run
    more_result, more = _run_worker(tmp_path, "more", "--steps", "8", "--checkpoint", str(tmp_path / "ckpt"),
                                    "--resume")
    assert more_result.returncode == 0, more_result.stderr[-2000:]
    straight_result, straight = _run_worker(tmp_path, "straight", "--steps", "8")
    assert straight_result.returncode == 0, straight_result.stderr[-2000:]
    assert len(more["losses"]) == 2
    assert max(abs(a - b) for a, b in zip(more["losses"], straight["losses"][6:])) < 1e-5
    assert all(abs(more["weights"][k] - straight["weights"][k]) < 1e-4 for k in straight["weights"])


def test_torchrun_refuses_an_indivisible_batch(tmp_path):
    result, _ = _run_worker(tmp_path, "odd", "--steps", "2", "--batch", "7", processes=2)
    assert result.returncode != 0
    assert "a global batch of 7 examples cannot be split into 2 equal processes" in result.stderr

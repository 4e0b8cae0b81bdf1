"""The `simbook` command, driven as a user would: through the installed console script."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from simbook.models.bert import BertLM
from simbook.text import CharTokenizer

SIMBOOK = shutil.which("simbook") or str(Path(sys.executable).parent / "simbook")


def run(*args, timeout=300):
    env = dict(os.environ, COLUMNS="100")
    return subprocess.run([SIMBOOK, *args], capture_output=True, text=True, timeout=timeout, env=env,
                          stdin=subprocess.DEVNULL)


def test_help_lists_subcommands():
    result = run("--help")
    assert result.returncode == 0
    assert "seq2seq" in result.stdout and "usage: simbook" in result.stdout
    assert run().returncode == 0                                    # no subcommand: help, success


def test_subcommand_help():
    result = run("seq2seq", "--help")
    assert result.returncode == 0
    for option in ("--mask", "--steps", "--save", "--no-progress", "--device", "--seed", "--resume"):
        assert option in result.stdout


@pytest.mark.parametrize("command, config_class", [("seq2seq", "Seq2SeqConfig"),
                                                   ("non-termination", "NonTerminationConfig")])
def test_help_shows_the_config_defaults(command, config_class):
    """One set of defaults: `--help` shows the dataclass's, which are the function's."""
    import dataclasses
    import importlib
    import re

    module = importlib.import_module("simbook.experiments." + ("seq2seq" if command == "seq2seq" else "decoding"))
    text = " ".join(run(command, "--help").stdout.split())
    for f in dataclasses.fields(getattr(module, config_class)):
        flag = "--" + f.name.replace("_", "-")
        assert re.search(re.escape(flag) + r"\b.*?\(default: " + re.escape(str(f.default)) + r"\)", text), flag


@pytest.mark.parametrize("args, message", [
    (["seq2seq", "--steps", "0", "--pairs", "100"], "steps must be >= 1"),
    (["seq2seq", "--batch-size", "64", "--pairs", "10", "--steps", "1", "--device", "cpu"], "need at least batch_size"),
    (["seq2seq", "--device", "tpu"], "unknown device"),
    (["non-termination", "--epsilon", "1.5"], "epsilon must be in (0, 1)"),
    (["seq2seq", "--mask", "leaky"], "invalid choice"),
    (["seq2seq", "--steps", "many"], "invalid int value"),
    (["no-such-command"], "invalid choice"),
])
def test_bad_arguments_give_one_line_errors(args, message, tmp_path):
    result = run(*args, "--save", str(tmp_path / "run")) if args[0] != "no-such-command" else run(*args)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


def test_short_training_run_saves_a_loadable_model_and_a_record(tmp_path):
    import json

    out = tmp_path / "run"
    args = ["seq2seq", "--steps", "20", "--pairs", "200", "--test-pairs", "20", "--eval-every", "10",
            "--checkpoint-every", "10", "--device", "cpu", "--save", str(out), "--no-progress"]
    result = run(*args)
    assert result.returncode == 0, result.stderr
    assert "exact match" in result.stdout and f"saved to {out}" in result.stdout
    assert {"config.json", "model.safetensors", "vocab.json", "record.json", "checkpoint"} <= {p.name for p in out.iterdir()}
    model = BertLM.from_pretrained(out)
    tokenizer = CharTokenizer.load(out / "vocab.json")
    assert isinstance(model, BertLM) and model.config.vocab_size == tokenizer.vocab_size
    record = json.loads((out / "record.json").read_text())
    assert record["status"] == "finished" and record["seed"] == 0 and record["config"]["steps"] == 20
    assert record["command"].startswith("simbook seq2seq") and "--steps 20" in record["command"]
    assert [e["step"] for e in record["evaluations"]] == [10, 20] and 0 <= record["final"]["exact_match"] <= 1
    again = run(*args, "--resume")                       # the run is complete: nothing is left to do
    assert again.returncode == 2 and "nothing left" in again.stderr and "Traceback" not in again.stderr
    fresh = run(*args[:-3], "--save", str(tmp_path / "empty"), "--resume")
    assert fresh.returncode == 2 and "no checkpoint" in fresh.stderr


def test_non_termination_runs_small_and_saves_both_models(tmp_path):
    import json

    from simbook.models.gpt import GPT

    out = tmp_path / "nt"
    result = run("non-termination", "--steps", "6", "--width", "16", "--layers", "1", "--cap", "8", "--prompts", "5",
                 "--max-chars", "20", "--vocab", "200", "--eval-every", "3", "--device", "cpu", "--save", str(out),
                 "--no-progress")
    assert result.returncode == 0, result.stderr
    assert "non-termination ratio at L=8" in result.stdout and "consistent nucleus 0.4" in result.stdout
    for name in ("vanilla", "self-terminating"):
        assert GPT.from_pretrained(out / name).config.hidden_size == 16
    record = json.loads((out / "record.json").read_text())
    assert record["status"] == "finished" and "vanilla greedy" in record["final"]
    assert sorted({e["model"] for e in record["evaluations"]}) == ["self-terminating", "vanilla"]
    again = run("non-termination", "--steps", "6", "--width", "16", "--layers", "1", "--cap", "8", "--prompts", "5",
                "--max-chars", "20", "--vocab", "200", "--eval-every", "3", "--device", "cpu", "--save", str(out),
                "--no-progress", "--resume")             # both models are done: they are loaded, not trained again
    assert again.returncode == 0, again.stderr
    assert again.stdout == result.stdout


def _torchrun(*args, processes=2):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", COLUMNS="100")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               "-m", "simbook.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("command, options, metric", [
    ("seq2seq", ["--steps", "6", "--batch-size", "8", "--pairs", "200", "--test-pairs", "20", "--eval-every", "3",
                 "--hidden", "16", "--layers", "1"], "held_out_loss"),
    ("non-termination", ["--steps", "6", "--batch-size", "8", "--width", "16", "--layers", "1", "--cap", "8",
                         "--prompts", "5", "--max-chars", "20", "--vocab", "200", "--eval-every", "3"], "perplexity"),
])
def test_two_processes_under_torchrun_equal_one(tmp_path, command, options, metric):
    """The same command under `torchrun --nproc_per_node 2` (gloo) and in one process: the same held-out metrics at
    every evaluation (the token-weighted losses make the two trainings the same), one record, written by rank 0."""
    import json

    common = [command, *options, "--device", "cpu", "--no-progress", "--threads", "1"]
    one = run(*common, "--save", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr[-2000:]
    two = _torchrun(*common, "--save", str(tmp_path / "two"))
    assert two.returncode == 0, two.stderr[-2000:]
    assert len(two.stdout.splitlines()) == len(one.stdout.splitlines()), (one.stdout, two.stdout)  # rank 0 prints
    a, b = (json.loads((tmp_path / name / "record.json").read_text()) for name in ("one", "two"))
    assert a["world_size"] == 1 and b["world_size"] == 2 and b["status"] == "finished"
    assert [e["step"] for e in a["evaluations"]] == [e["step"] for e in b["evaluations"]]
    gap = max(abs(x[metric] - y[metric]) / abs(x[metric]) for x, y in zip(a["evaluations"], b["evaluations"]))
    print(f"{command}: largest relative difference of {metric}, 1 vs 2 processes: {gap:.1e}")
    assert gap < 1e-4


def test_torchrun_refuses_a_batch_it_cannot_share(tmp_path):
    result = _torchrun("seq2seq", "--steps", "2", "--batch-size", "7", "--pairs", "50", "--test-pairs", "5",
                       "--device", "cpu", "--no-progress", "--save", str(tmp_path / "odd"))
    assert result.returncode != 0                      # each process exits with 2; torchrun reports the failure
    assert "error: a global batch of 7 examples cannot be split into 2 equal processes" in result.stderr


def test_readme_lists_every_command():
    """README's table of long runs names every `simbook` subcommand (the commands a user finds first)."""
    import argparse
    import re
    from pathlib import Path

    from simbook.cli import build_parser
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    listed = set(re.findall(r"`simbook ([a-z0-9-]+)", readme))
    assert set(commands) <= listed, sorted(set(commands) - listed)

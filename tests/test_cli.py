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

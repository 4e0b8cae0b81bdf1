"""The `simbook` command, driven as a user would: through the installed console script."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from simbook.models.bert import BertLM, load_model
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
    for option in ("--mask", "--steps", "--save", "--no-progress"):
        assert option in result.stdout


@pytest.mark.parametrize("args, message", [
    (["seq2seq", "--steps", "0", "--pairs", "100"], "steps must be >= 1"),
    (["seq2seq", "--batch-size", "64", "--pairs", "10", "--steps", "1"], "need at least batch_size"),
    (["seq2seq", "--mask", "leaky"], "invalid choice"),
    (["seq2seq", "--steps", "many"], "invalid int value"),
    (["no-such-command"], "invalid choice"),
])
def test_bad_arguments_give_one_line_errors(args, message):
    result = run(*args)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


def test_short_training_run_saves_a_loadable_checkpoint(tmp_path):
    out = tmp_path / "run"
    result = run("seq2seq", "--steps", "20", "--pairs", "200", "--save", str(out), "--no-progress")
    assert result.returncode == 0, result.stderr
    assert "exact match" in result.stdout and f"saved to {out}" in result.stdout
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "vocab.json"]
    model = load_model(out)
    tokenizer = CharTokenizer.load(out / "vocab.json")
    assert isinstance(model, BertLM) and model.config.vocab_size == tokenizer.vocab_size


def test_progress_bar_is_drawn_on_stderr(tmp_path):
    result = run("seq2seq", "--steps", "5", "--pairs", "100")
    assert result.returncode == 0 and "seq2seq (unilm)" in result.stderr

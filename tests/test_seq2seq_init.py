"""`simbook seq2seq-init` (chapter *Seq2seq in one stack: the experiment*): the summary against brute force, the
configuration's refusals, and the command on a tiny configuration (record, resume from members, refusal of a member
made with another configuration, bad values)."""
import json
import math
import statistics
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from simbook.experiments.seq2seq import (Seq2SeqInitConfig, format_seq2seq_init_table, steps_to_reach,
                                         summarize_seq2seq_init)

T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776}


def _member(init, seed, exact, loss=None):
    steps = [10 * (i + 1) for i in range(len(exact))]
    loss = loss or [1.0 / (i + 1) for i in range(len(exact))]
    return {"init": init, "seed": seed, "evaluations": [
        {"step": s, "train_loss": l, "held_out_loss": l, "exact_match": e} for s, e, l in zip(steps, exact, loss)]}


CURVE = st.lists(st.floats(0, 1, allow_nan=False), min_size=3, max_size=3)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(CURVE, CURVE), min_size=2, max_size=5), st.sampled_from([0.3, 0.5, 0.9]))
def test_summary_agrees_with_brute_force(curves, threshold):
    members = [m for seed, (a, b) in enumerate(curves) for m in (_member("bert", seed, a), _member("random-bert", seed, b))]
    summary = summarize_seq2seq_init(members, thresholds=(threshold,))
    n = len(curves)
    diffs = [a[-1] - b[-1] for a, b in curves]
    d = summary["differences"]["bert - random-bert"]["exact_match"]
    mean, sd = statistics.fmean(diffs), statistics.stdev(diffs)
    assert d["n"] == n and math.isclose(d["mean"], mean, abs_tol=1e-12) and math.isclose(d["sd"], sd, abs_tol=1e-12)
    half = T975[n - 1] * sd / math.sqrt(n)
    assert math.isclose(d["high"] - d["low"], 2 * half, abs_tol=1e-9)
    for init, column in (("bert", 0), ("random-bert", 1)):
        firsts = []
        for pair in curves:
            hits = [10 * (i + 1) for i, e in enumerate(pair[column]) if e >= threshold]
            firsts.append(hits[0] if hits else None)
        row = summary["inits"][init]["steps_to"][str(threshold)]
        assert row["per_seed"] == firsts and row["reached"] == sum(f is not None for f in firsts)
        if None in firsts:
            assert row["mean"] is None
        else:
            assert math.isclose(row["mean"], statistics.fmean(firsts))
        curve = summary["curves"][init]["exact_match"]
        assert curve["min"] == [min(p[column][i] for p in curves) for i in range(3)]
    assert "bert - random-bert (paired)" in format_seq2seq_init_table(summary)


def test_steps_to_reach_and_one_seed_without_interval():
    member = _member("scratch", 0, [0.1, 0.6, 0.95])
    assert steps_to_reach(member["evaluations"], 0.5) == 20 and steps_to_reach(member["evaluations"], 0.99) is None
    row = summarize_seq2seq_init([member])["inits"]["scratch"]
    assert row["exact_match"] == {"n": 1, "mean": 0.95, "sd": 0.0, "low": None, "high": None}
    assert summarize_seq2seq_init([member])["differences"] == {}


@pytest.mark.parametrize("changes, message", [
    ({"inits": ("gpt",)}, "unknown starts"), ({"inits": ()}, "at least one"), ({"seeds": ()}, "at least one"),
    ({"seeds": (1, 1)}, "repeated"), ({"seeds": (-1,)}, "seeds must be"), ({"steps": 0}, "steps must be"),
    ({"eval_every": 0}, "eval_every"), ({"lr": float("nan")}, "lr must be"), ({"test_pairs": 2.5}, "test_pairs")])
def test_config_refuses_bad_values(changes, message):
    with pytest.raises((ValueError, TypeError), match=message):
        Seq2SeqInitConfig(**changes)


def test_config_runs_and_member_config():
    config = Seq2SeqInitConfig()
    assert config.runs()[:3] == [(init, 0) for init in config.inits] and len(config.runs()) == 9
    assert config.run_config("minilm").vocabulary == "minilm" and config.run_config("bert").vocabulary == "any"
    assert "inits" not in config.member_config() and "seeds" not in config.member_config()


def _cli(tmp_path, *options):
    command = [sys.executable, "-m", "simbook.cli", "seq2seq-init", "--batch-size", "4", "--pairs", "50",
               "--test-pairs", "5", "--eval-every", "2", "--save", str(tmp_path), "--no-progress", "--threads", "1",
               "--device", "cpu", *options]
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


def test_cli_runs_resumes_and_refuses_another_configuration(tmp_path):
    stopped = _cli(tmp_path, "--steps", "3", "--inits", "scratch", "--seeds", "0", "--minutes", "0")
    assert stopped.returncode == 0 and "0 of 1 models done" in stopped.stdout, stopped.stderr
    assert not json.loads((tmp_path / "record.json").read_text(encoding="utf-8"))["final"]["complete"]
    first = _cli(tmp_path, "--steps", "3", "--inits", "scratch", "--seeds", "0")
    assert first.returncode == 0, first.stderr
    member = tmp_path / "members" / "scratch-seed0.json"
    written = member.stat().st_mtime_ns
    steps = [e["step"] for e in json.loads(member.read_text(encoding="utf-8"))["evaluations"]]
    assert steps == [2, 3]
    second = _cli(tmp_path, "--steps", "3", "--inits", "scratch", "--seeds", "0", "1")   # seed 0 is read back
    assert second.returncode == 0, second.stderr
    record = json.loads((tmp_path / "record.json").read_text(encoding="utf-8"))
    assert record["name"] == "seq2seq-init" and record["status"] == "finished"
    assert record["final"]["complete"] and record["final"]["members"] == 2 and member.stat().st_mtime_ns == written
    assert record["final"]["summary"]["inits"]["scratch"]["exact_match"]["n"] == 2
    assert (tmp_path / "curves.png").stat().st_size > 1000
    other = _cli(tmp_path, "--steps", "4", "--inits", "scratch", "--seeds", "0")
    assert other.returncode == 2 and "another configuration" in other.stderr


@pytest.mark.parametrize("options, message", [
    (["--inits", "gpt"], "invalid choice"), (["--seeds", "0", "0"], "repeated"), (["--steps", "0"], "steps must be"),
    (["--minutes", "-1"], "--minutes must be"), (["--device", "tpu"], "unknown device"),
    (["--eval-every", "x"], "invalid int value")])
def test_cli_refuses_bad_values_in_one_line(tmp_path, options, message):
    result = _cli(tmp_path, *options)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "members").exists()

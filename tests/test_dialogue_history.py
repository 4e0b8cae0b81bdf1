"""Does a dialogue model use its history? Tests of `history_conditions`, `reply_nlls` and `history_effect`
(simbook.dialogue, *Build a DialoGPT*, "Does a reply depend on its history?") on synthetic conversations where the
answer is known: a model trained where the reply repeats the history's letter must show a large effect, one trained
where the reply is independent of the history must not."""
import json
import random
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from simbook.dialogue import (HISTORY_CONDITIONS, encode_conversations, history_conditions, history_effect, mean_nll,
                              reply_example, reply_nlls, reply_pairs)
from simbook.experiments.dialogpt import (DialogueCompareConfig, format_comparison, new_dialogue_model,
                                          summarize_comparison, train_dialogue_model)
from simbook.text import SPEAKER_TOKENS, SPECIAL_TOKENS, ByteBPETokenizer, CharTokenizer

pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py
LETTERS = "abcdefghijklmnop"


def synthetic(echo: bool, n: int, seed: int) -> list[list[str]]:
    """Two-turn conversations: a letter said three times, then a reply of two letters — the same letter (echo) or
    an independent random one."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        said = rng.choice(LETTERS)
        answer = said if echo else rng.choice(LETTERS)
        out.append([said * 3, answer * 2])
    return out


@pytest.fixture(scope="module")
def tokenizer():
    return CharTokenizer.build([LETTERS])


@pytest.fixture(scope="module")
def bpe():
    """Byte-level BPE with the speaker tokens the CDial-GPT layout needs, and no merges: one token per letter."""
    return ByteBPETokenizer.train([LETTERS], vocab_size=len(SPECIAL_TOKENS) + len(SPEAKER_TOKENS) + 257)


def trained_effect(tokenizer, echo: bool) -> dict:
    train = encode_conversations(tokenizer, synthetic(echo, 400, seed=0))
    held_out = encode_conversations(tokenizer, synthetic(echo, 120, seed=1))
    model = new_dialogue_model(tokenizer.vocab_size, width=32, layers=1, heads=2, max_length=16, seed=0)
    train_dialogue_model(model, tokenizer, train, steps=150, batch_size=16, lr=1e-2, seed=0, device="cpu")
    return history_effect(model, tokenizer, reply_pairs(held_out, seed=0), max_length=16)


def test_a_model_that_copies_from_its_history_shows_it(tokenizer):
    effect = trained_effect(tokenizer, echo=True)
    # the reply's two letters and its [SEP]: with the right history the letters are nearly certain, with another
    # conversation's history they are a wrong guess; ln 16 = 2.77 nats for a uniform guess
    assert effect["shuffled - true"]["low"] > 1.0, effect
    assert effect["none - true"]["low"] > 0.5, effect
    assert effect["true"] < 0.3, effect


def test_a_model_whose_replies_ignore_the_history_shows_no_effect(tokenizer):
    effect = trained_effect(tokenizer, echo=False)
    row = effect["shuffled - true"]
    assert row["low"] < 0 < row["high"] or abs(row["mean"]) < 0.02, row
    assert abs(row["mean"]) < 0.05, row
    # the reply's first letter costs about ln 16 = 2.77 nats, its repeat and [SEP] nothing: ~0.92 per token
    assert 0.8 < effect["true"] < 1.1, effect


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 40), seed=st.integers(0, 10**6))
def test_shuffled_histories_are_a_derangement(n, seed):
    pairs = [([[i, i + 1]], [100 + i]) for i in range(n)]
    conditions = history_conditions(pairs, seed=seed)
    assert set(conditions) == set(HISTORY_CONDITIONS)
    donors = [h[0][0] for h, _ in conditions["shuffled"]]
    assert sorted(donors) == list(range(n))                              # every history used once
    assert all(donors[i] != i for i in range(n))                         # none stays with its own reply
    assert [r for _, r in conditions["none"]] == [r for _, r in pairs] == [r for _, r in conditions["shuffled"]]
    assert all(h == [] for h, _ in conditions["none"])


def test_reply_nlls_add_up_to_mean_nll_and_intervals_match_the_formula(bpe):
    tokenizer = bpe
    held_out = encode_conversations(tokenizer, synthetic(True, 30, seed=2))
    model = new_dialogue_model(tokenizer.vocab_size, width=16, layers=1, heads=2, max_length=16, seed=3)
    pairs = reply_pairs(held_out, seed=0)
    for fmt in ("dialogpt", "cdial"):
        examples = [reply_example(h, r, tokenizer, max_length=16, fmt=fmt) for h, r in pairs]
        sums, counts = reply_nlls(model, examples, tokenizer.pad_id, batch_size=7)
        assert torch.allclose(sums.sum() / counts.sum(), torch.tensor(mean_nll(model, examples, tokenizer.pad_id),
                                                                      dtype=torch.float64), atol=1e-5)
        effect = history_effect(model, tokenizer, pairs, max_length=16, fmt=fmt)
        assert effect["pairs"] == 30 and effect["tokens"] == int(counts.sum())
        # brute force: loss of each condition from its own examples
        conditions = history_conditions(pairs, seed=0)
        for name in HISTORY_CONDITIONS:
            ex = [reply_example(h, r, tokenizer, max_length=16, fmt=fmt) for h, r in conditions[name]]
            assert abs(effect[name] - mean_nll(model, ex, tokenizer.pad_id)) < 1e-5
        assert abs(effect["shuffled - true"]["mean"] - (effect["shuffled"] - effect["true"])) < 1e-9


def test_an_empty_history_scores_the_reply_as_an_opening(bpe):
    tokenizer = bpe
    reply = tokenizer.encode("ab")
    for fmt in ("dialogpt", "cdial"):
        example = reply_example([], reply, tokenizer, max_length=16, fmt=fmt)
        assert example.input_ids[0] == tokenizer.cls_id and example.input_ids[-1] == tokenizer.sep_id
        assert sum(example.supervised) == len(reply) + 1 and example.turns == 1


@pytest.mark.parametrize("pairs, error", [([], ValueError), ([([[1]], [2])], ValueError), ("ab", ValueError)])
def test_bad_pairs_are_refused(pairs, error):
    with pytest.raises(error, match="at least 2"):
        history_conditions(pairs)


def test_compare_config_refuses_bad_values():
    with pytest.raises(ValueError, match="formats"):
        DialogueCompareConfig(formats=("dialogpt", "whole"))
    with pytest.raises(ValueError, match="seeds"):
        DialogueCompareConfig(seeds=(1, 1))
    with pytest.raises(ValueError, match="steps"):
        DialogueCompareConfig(steps=0)
    assert DialogueCompareConfig().runs()[:2] == [("dialogpt", 0), ("cdial", 0)]     # seed-major


def test_summary_pairs_the_layouts_by_seed():
    def member(fmt, seed, loss):
        effect = {"mean": 0.1 * seed}
        return {"format": fmt, "seed": seed, "reply_loss": loss, "positions": 100, "supervised": 50,
                "history": {"shuffled - true": effect, "none - true": effect}}

    members = [member("dialogpt", 0, 4.0), member("cdial", 0, 4.5), member("dialogpt", 1, 5.0),
               member("cdial", 1, 5.2), member("dialogpt", 2, 3.0)]              # seed 2 has no cdial model
    summary = summarize_comparison(members)
    assert summary["difference"]["n"] == 2 and abs(summary["difference"]["mean"] - (-0.35)) < 1e-12
    assert summary["formats"]["dialogpt"]["reply_loss"]["n"] == 3
    assert "dialogpt - cdial (paired by seed, n = 2)" in format_comparison(summary)


def test_compare_cli_runs_resumes_and_refuses_another_configuration(tmp_path):
    def run(*options):
        command = [sys.executable, "-m", "simbook.cli", "dialogpt-compare", "--conversations", "40", "--held-out",
                   "8", "--vocab-size", "300", "--batch-size", "4", "--width", "16", "--layers", "1", "--heads", "2",
                   "--max-length", "48", "--evaluations", "1", "--save", str(tmp_path), "--no-progress",
                   "--threads", "1", *options]
        return subprocess.run(command, capture_output=True, text=True, timeout=600)

    stopped = run("--steps", "2", "--seeds", "0", "--minutes", "0")
    assert stopped.returncode == 0 and "0 of 2 models done" in stopped.stdout, stopped.stderr
    first = run("--steps", "2", "--seeds", "0")
    assert first.returncode == 0 and "dialogpt - cdial (paired by seed, n = 1)" in first.stdout, first.stderr
    member = tmp_path / "members" / "cdial-seed0.json"
    written = member.stat().st_mtime_ns
    second = run("--steps", "2", "--seeds", "0", "1")                     # seed 0's models are read back
    assert second.returncode == 0, second.stderr
    record = json.loads((tmp_path / "record.json").read_text(encoding="utf-8"))
    assert record["final"]["complete"] and record["final"]["members"] == 4 and member.stat().st_mtime_ns == written
    assert record["final"]["summary"]["difference"]["n"] == 2
    saved = json.loads(member.read_text(encoding="utf-8"))
    assert saved["history"]["pairs"] == 8 and set(saved["history"]) >= {"true", "shuffled", "none"}
    other = run("--steps", "3", "--seeds", "0")
    assert other.returncode == 2 and "another configuration" in other.stderr
    bad = run("--steps", "0")
    assert bad.returncode == 2 and "steps" in bad.stderr

"""Does a dialogue model use its history? Tests of `history_conditions`, `reply_nlls` and `history_effect`
(simbook.dialogue, *Build a DialoGPT*, "Does a reply depend on its history?") on synthetic conversations where the
answer is known: a model trained where the reply repeats the history's letter must show a large effect, one trained
where the reply is independent of the history must not."""
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from simbook.dialogue import (HISTORY_CONDITIONS, encode_conversations, history_conditions, history_effect, mean_nll,
                              reply_example, reply_nlls, reply_pairs)
from simbook.experiments.dialogpt import new_dialogue_model, train_dialogue_model
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

"""simbook.seq2seq: the loss against a brute-force loop, cached greedy decoding against uncached re-runs."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from simbook.attention.masks import bidirectional_mask, causal_mask, unilm_mask
from simbook.seq2seq import (evaluate, greedy_generate, new_seq2seq_model, reversal_pairs, seq2seq_loss,
                             seq2seq_mask, train_seq2seq)
from simbook.text import CharTokenizer

SENTENCES = ["今天天气不错。", "我们一起去吃饭吧！", "人民日报发表社论。", "这是一个测试句子。", "白切鸡很好吃。"] * 8


@pytest.fixture(scope="module")
def tokenizer():
    return CharTokenizer.build(SENTENCES)


def _brute_force_loss(logits, ids, segs, valid):
    total, count = 0.0, 0
    for b in range(ids.shape[0]):
        for t in range(ids.shape[1] - 1):
            if segs[b, t + 1] == 1 and valid[b, t + 1]:
                total += -torch.log_softmax(logits[b, t], -1)[ids[b, t + 1]].item()
                count += 1
    return total / count


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000))
def test_loss_equals_brute_force(seed):
    tok = CharTokenizer.build(SENTENCES)
    g = torch.Generator().manual_seed(seed)
    pairs = reversal_pairs(SENTENCES, 3, max_len=6, seed=seed)
    batch = tok.batch_encode([a for a, _ in pairs], [b for _, b in pairs])
    logits = torch.randn(*batch["input_ids"].shape, tok.vocab_size, generator=g, dtype=torch.float64)
    expected = _brute_force_loss(logits, batch["input_ids"], batch["segment_ids"], batch["valid"])
    assert abs(seq2seq_loss(logits, **batch).item() - expected) < 1e-9


def test_loss_rejects_bad_input(tokenizer):
    batch = tokenizer.batch_encode(["今天"], ["天今"])
    logits = torch.zeros(1, batch["input_ids"].shape[1], tokenizer.vocab_size)
    with pytest.raises(ValueError, match="no target token"):
        seq2seq_loss(logits, batch["input_ids"], torch.zeros_like(batch["segment_ids"]), batch["valid"])
    with pytest.raises(ValueError, match="input_ids has size"):
        seq2seq_loss(logits[:, :-1], **batch)
    with pytest.raises(TypeError, match="valid"):
        seq2seq_loss(logits, batch["input_ids"], batch["segment_ids"], batch["valid"].long())


def test_masks_by_name(tokenizer):
    batch = tokenizer.batch_encode(["今天天气"], ["气天"])
    segs, valid = batch["segment_ids"], batch["valid"]
    assert torch.equal(seq2seq_mask("unilm", segs, valid), unilm_mask(segs, valid))
    assert torch.equal(seq2seq_mask("causal", segs, valid), causal_mask(valid))
    assert torch.equal(seq2seq_mask("bidirectional", segs, valid), bidirectional_mask(valid))
    with pytest.raises(ValueError, match="mask must be one of"):
        seq2seq_mask("prefix", segs, valid)


def _uncached_greedy(model, tok, source, mask, max_new):
    ids, segs = tok.encode_pair(source)
    ids, segs, out = torch.tensor([ids]), torch.tensor([segs]), []
    for _ in range(max_new):
        valid = torch.ones_like(ids, dtype=torch.bool)
        with torch.no_grad():
            logits = model(ids, segs, seq2seq_mask(mask, segs, valid))
        nxt = int(logits[0, -1].argmax())
        out.append(nxt)
        if nxt == tok.sep_id:
            break
        ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
        segs = torch.cat([segs, torch.tensor([[1]])], 1)
    return tok.decode(out)


@pytest.mark.parametrize("mask", ["unilm", "causal", "bidirectional"])
def test_cached_batched_greedy_equals_uncached_one_by_one(tokenizer, mask):
    model = new_seq2seq_model(tokenizer, hidden_size=32, seed=3).double()
    with torch.no_grad():                       # sharpen the random model so that argmax ties cannot happen
        model.lm_head.bias.add_(torch.randn(tokenizer.vocab_size, dtype=torch.float64))
    sources = ["今天天气", "我们一起去", "人民", "白切鸡很好", "今天天气"]
    got = greedy_generate(model, tokenizer, sources, mask=mask, max_new_tokens=7)
    expected = [_uncached_greedy(model, tokenizer, s, mask, 7) for s in sources]
    assert got == expected


def test_greedy_rejects_bad_input(tokenizer):
    model = new_seq2seq_model(tokenizer, hidden_size=32, max_position=12)
    with pytest.raises(ValueError, match="non-empty list"):
        greedy_generate(model, tokenizer, [])
    with pytest.raises(ValueError, match="non-empty list"):
        greedy_generate(model, tokenizer, "今天")
    with pytest.raises(ValueError, match="positions"):
        greedy_generate(model, tokenizer, ["今天天气不错"], max_new_tokens=10)
    with pytest.raises(ValueError, match="max_new_tokens"):
        greedy_generate(model, tokenizer, ["今天"], max_new_tokens=0)
    with pytest.raises(ValueError, match="text is empty"):
        greedy_generate(model, tokenizer, [""])


@given(st.integers(0, 1000), st.integers(1, 4), st.integers(0, 4))
@settings(max_examples=30, deadline=None)
def test_reversal_pairs_properties(seed, min_len, extra):
    pairs = reversal_pairs(SENTENCES, 20, min_len=min_len, max_len=min_len + extra, seed=seed)
    assert pairs == reversal_pairs(SENTENCES, 20, min_len=min_len, max_len=min_len + extra, seed=seed)
    for source, target in pairs:
        assert target == source[::-1] and min_len <= len(source) <= min_len + extra
        assert any(source in s for s in SENTENCES)


def test_reversal_pairs_bad_input():
    with pytest.raises(ValueError, match="max_len"):
        reversal_pairs(SENTENCES, 5, min_len=4, max_len=3)
    with pytest.raises(ValueError, match="no sentence"):
        reversal_pairs(["短"], 5, min_len=3)
    with pytest.raises(ValueError, match="could not cut"):
        reversal_pairs(SENTENCES, 5, charset={"今"})
    with pytest.raises(ValueError, match="count"):
        reversal_pairs(SENTENCES, 0)


def test_training_reduces_loss_and_is_deterministic(tokenizer):
    pairs = reversal_pairs(SENTENCES, 200, max_len=5, seed=0)
    runs = []
    for _ in range(2):
        model = new_seq2seq_model(tokenizer, hidden_size=32, seed=0)
        runs.append(train_seq2seq(model, tokenizer, pairs, steps=60, batch_size=16, seed=0))
    assert runs[0] == runs[1]
    assert sum(runs[0][-10:]) < 0.7 * sum(runs[0][:10])
    result = evaluate(model, tokenizer, pairs[:20])
    assert 0 <= result["exact_match"] <= 1 and len(result["outputs"]) == 20


def test_training_rejects_bad_input(tokenizer):
    model = new_seq2seq_model(tokenizer, hidden_size=32)
    pairs = reversal_pairs(SENTENCES, 10, seed=0)
    with pytest.raises(ValueError, match="batch_size"):
        train_seq2seq(model, tokenizer, pairs, steps=1, batch_size=32)
    with pytest.raises(ValueError, match="steps"):
        train_seq2seq(model, tokenizer, pairs, steps=0, batch_size=4)
    with pytest.raises(ValueError, match="mask"):
        train_seq2seq(model, tokenizer, pairs, mask="full", steps=1, batch_size=4)


def test_nan_loss_stops_with_the_step(tokenizer):
    model = new_seq2seq_model(tokenizer, hidden_size=32)
    with torch.no_grad():
        model.lm_head.bias.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="step 0"):
        train_seq2seq(model, tokenizer, reversal_pairs(SENTENCES, 10, seed=0), steps=3, batch_size=4)

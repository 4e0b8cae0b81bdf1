"""Tests of simbook.decoding: the step decoder (cached vs brute force, causal and UniLM layouts), greedy and beam
search against Hugging Face transformers' `generate` on the same GPT-2 weights, the filters (top-k, nucleus,
consistent) by brute force and by a chi-square test of `sample`, the self-terminating layer, the metrics, and the
argument checks."""
import functools
import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from simbook.attention.masks import causal_mask, unilm_mask
from simbook.decoding import (DecodingOutput, StepDecoder, _candidates, beam_search, filter_log_probs, greedy,
                              non_termination_ratio, repetition_stats, sample, self_terminating_log_probs, stream)
from simbook.models.bert import BertLM
from simbook.models.transformer import TransformerConfig

PROPERTY = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


# --------------------------------------------------------------------------------------------------- helpers

def _bert_lm(seed=0, vocab=50, max_position=64):
    torch.manual_seed(seed)
    config = TransformerConfig(vocab_size=vocab, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                               max_position=max_position, dropout=0.0)
    return BertLM(config).eval()


@pytest.fixture(scope="module")
def bert():
    return _bert_lm()


def _ids(B, T, vocab=50, seed=0, low=0):
    return torch.randint(low, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def _pad_batch(prompts, pad=0):
    """Right-pad a list of token lists: (ids [B, T], valid [B, T])."""
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad, dtype=torch.long)
    valid = torch.zeros((len(prompts), T), dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, :len(p)], valid[i, :len(p)] = torch.tensor(p), True
    return ids, valid


def _most_frequent(rows, exclude=()):
    counts = {}
    for row in rows:
        for tok in row:
            if tok not in exclude:
                counts[tok] = counts.get(tok, 0) + 1
    return max(sorted(counts), key=lambda tok: counts[tok])


@torch.no_grad()
def _brute_force_greedy(next_logits, prompt, max_new_tokens, eos_id=None, min_new_tokens=0):
    """Greedy without a cache: `next_logits(prompt + generated)` re-reads the whole sequence at every step."""
    generated = []
    for t in range(max_new_tokens):
        logits = next_logits(prompt, generated).float()
        if eos_id is not None and t < min_new_tokens:
            logits[eos_id] = float("-inf")
        token = int(logits.argmax())
        generated.append(token)
        if token == eos_id:
            break
    return generated


def _causal_next_logits(model):
    def next_logits(prompt, generated):
        ids = torch.tensor([prompt + generated])
        valid = torch.ones_like(ids, dtype=torch.bool)
        return model(ids, mask=causal_mask(valid))[0, -1]
    return next_logits


def _unilm_next_logits(model):
    def next_logits(source, generated):
        ids = torch.tensor([source + generated])
        segments = torch.tensor([[0] * len(source) + [1] * len(generated)])
        return model(ids, segments, unilm_mask(segments))[0, -1]
    return next_logits


# ------------------------------------------------------------------------ step decoder: cache vs brute force

def test_greedy_causal_bert_equals_uncached_loop(bert):
    prompts = [[3, 14, 15, 9, 26], [5, 35], [8, 9, 7, 9, 3, 2, 38, 4], [46]]
    ids, valid = _pad_batch(prompts)
    out = greedy(StepDecoder(bert), ids, valid, max_new_tokens=12)
    eos = _most_frequent(out.to_lists())
    out = greedy(StepDecoder(bert), ids, valid, max_new_tokens=12, eos_id=eos, pad_id=49)
    assert out.finished.any()
    for prompt, got in zip(prompts, out.to_lists()):
        assert got == _brute_force_greedy(_causal_next_logits(bert), prompt, 12, eos_id=eos)


def test_greedy_unilm_equals_brute_force_with_unilm_mask(bert):
    sources = [[4, 8, 15, 16, 23, 42], [7, 1], [9, 9, 9, 2, 31], [12, 30, 44, 5, 6, 7, 8, 2, 1]]
    ids, valid = _pad_batch(sources)
    decoder = StepDecoder(bert, layout="unilm")
    plain = greedy(decoder, ids, valid, max_new_tokens=10)
    next_logits = _unilm_next_logits(bert)
    for source, got in zip(sources, plain.to_lists()):
        assert got == _brute_force_greedy(next_logits, source, 10)
    eos = _most_frequent(plain.to_lists())
    ended = greedy(decoder, ids, valid, max_new_tokens=10, eos_id=eos, min_new_tokens=2)
    assert ended.finished.any()
    for source, got in zip(sources, ended.to_lists()):
        assert got == _brute_force_greedy(next_logits, source, 10, eos_id=eos, min_new_tokens=2)
    # the layouts really differ: the causal reading of the same prompts gives other tokens
    assert greedy(StepDecoder(bert), ids, valid, max_new_tokens=10).to_lists() != plain.to_lists()


def test_prefill_and_step_log_probs_equal_full_forward(bert):
    """The log-probs of every step (not just their argmax) equal log_softmax of an uncached forward."""
    ids, valid = _pad_batch([[1, 2, 3, 4, 5, 6], [7, 8, 9]])
    decoder = StepDecoder(bert)
    log_probs = decoder.prefill(ids, valid)
    sequences = [[1, 2, 3, 4, 5, 6], [7, 8, 9]]
    for step in range(5):
        for b, seq in enumerate(sequences):
            ref = bert(torch.tensor([seq]), mask=causal_mask(torch.ones(1, len(seq), dtype=torch.bool)))[0, -1]
            torch.testing.assert_close(log_probs[b], ref.log_softmax(-1), atol=1e-5, rtol=0)
        nxt = torch.tensor([10 + step, 20 + step])
        for b in range(2):
            sequences[b].append(int(nxt[b]))
        log_probs = decoder.step(nxt)
    assert log_probs.shape == (2, 50)


def test_reorder_keeps_rows(bert):
    ids, valid = _pad_batch([[1, 2, 3], [4, 5], [6, 7, 8]])
    decoder = StepDecoder(bert)
    decoder.prefill(ids, valid)
    decoder.reorder(torch.tensor([2, 2, 1]))
    got = decoder.step(torch.tensor([9, 9, 9]))
    ref = StepDecoder(bert)
    ids2, valid2 = _pad_batch([[6, 7, 8], [6, 7, 8], [4, 5]])
    ref.prefill(ids2, valid2)
    torch.testing.assert_close(got, ref.step(torch.tensor([9, 9, 9])), atol=1e-5, rtol=0)


def test_stream_yields_the_greedy_columns_and_pads_ended_rows(bert):
    ids, valid = _pad_batch([[3, 1, 4, 1, 5], [9, 2, 6], [5, 3, 5, 8, 9, 7]])
    eos = _most_frequent(greedy(StepDecoder(bert), ids, valid, max_new_tokens=8).to_lists())
    columns = list(stream(StepDecoder(bert), ids, valid, max_new_tokens=8, eos_id=eos, pad_id=47))
    out = greedy(StepDecoder(bert), ids, valid, max_new_tokens=8, eos_id=eos, pad_id=47)
    assert all(c.shape == (3,) for c in columns)
    assert torch.equal(torch.stack(columns, 1), out.tokens)
    for row, n, done in zip(out.tokens, out.lengths, out.finished):
        assert (row[n:] == 47).all()
        assert bool(done) == (int(row[n - 1]) == eos)
        assert not (row[:n - 1] == eos).any()


def test_generation_fits_the_position_table_exactly():
    model = _bert_lm(max_position=16)
    out = greedy(StepDecoder(model), _ids(2, 12), max_new_tokens=5)   # positions 0..15: the last is used
    assert out.tokens.shape == (2, 5)
    with pytest.raises(ValueError, match="positions"):
        greedy(StepDecoder(model), _ids(2, 12), max_new_tokens=6)
    decoder = StepDecoder(model)
    decoder.prefill(_ids(1, 16))
    with pytest.raises(ValueError, match="positions"):
        decoder.step(torch.tensor([1]))


# ---------------------------------------------------------------------- Hugging Face GPT-2 as the reference

PAD = 1      # not 0: for pad_token_id=0, Hugging Face's beam search fills finished rows with eos (`pad or eos`)


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """A tiny random GPT-2 in Hugging Face and the same weights loaded into simbook; eos is a frequent token."""
    transformers = pytest.importorskip("transformers")
    from simbook.models.gpt import load_hf_gpt2

    transformers.logging.set_verbosity_error()
    config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=101, n_positions=64,
                                     initializer_range=0.2, bos_token_id=0, eos_token_id=0, pad_token_id=PAD)
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(config).eval()
    path = tmp_path_factory.mktemp("tiny_gpt2")
    hf.save_pretrained(path, safe_serialization=True)
    ours = load_hf_gpt2(path)
    prompts = _ids(6, 5, vocab=101, seed=1, low=2)
    first = greedy(StepDecoder(ours), prompts, max_new_tokens=16).to_lists()
    eos = _most_frequent(first, exclude=(PAD,))
    return hf, ours, eos


def _hf_generate(hf, ids, **kw):
    with torch.no_grad():
        return hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pad_token_id=PAD, **kw)


def _same_rows(ours: torch.Tensor, theirs: torch.Tensor):
    width = max(ours.shape[1], theirs.shape[1])
    pad = lambda x: torch.cat([x, torch.full((x.shape[0], width - x.shape[1]), PAD, dtype=x.dtype)], 1)
    assert pad(ours).tolist() == pad(theirs).tolist()


def test_gpt2_logits_equal_transformers(gpt2):
    hf, ours, _ = gpt2
    ids = _ids(3, 9, vocab=101, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("fast", [True, False], ids=["packed", "general"])
@pytest.mark.parametrize("min_new_tokens", [0, 4])
def test_greedy_equals_transformers_generate(gpt2, min_new_tokens, fast):
    hf, ours, eos = gpt2
    ids = _ids(6, 5, vocab=101, seed=1, low=2)
    out = greedy(StepDecoder(ours, fast=fast), ids, max_new_tokens=16, eos_id=eos, min_new_tokens=min_new_tokens, pad_id=PAD)
    ref = _hf_generate(hf, ids, max_new_tokens=16, min_new_tokens=min_new_tokens, do_sample=False, num_beams=1,
                       eos_token_id=eos)
    assert out.tokens.tolist() == ref[:, ids.shape[1]:].tolist()
    # the test has power: some rows end with eos, some run to the cap
    assert out.finished.any() and not out.finished.all()
    if min_new_tokens:
        assert (out.lengths > min_new_tokens).all()


def test_greedy_without_eos_equals_transformers_and_uncached_loop(gpt2):
    hf, ours, _ = gpt2
    ids = _ids(4, 7, vocab=101, seed=2, low=2)
    out = greedy(StepDecoder(ours), ids, max_new_tokens=20)
    ref = _hf_generate(hf, ids, max_new_tokens=20, min_new_tokens=20, do_sample=False, num_beams=1,
                       eos_token_id=None)
    assert out.tokens.tolist() == ref[:, 7:].tolist()
    assert not out.finished.any() and (out.lengths == 20).all()
    next_logits = lambda prompt, generated: ours(torch.tensor([prompt + generated]))[0, -1]
    for prompt, got in zip(ids.tolist(), out.to_lists()):
        assert got == _brute_force_greedy(next_logits, prompt, 20)


@pytest.mark.parametrize("fast", [True, False], ids=["packed", "general"])
def test_greedy_padded_batch_equals_each_prompt_alone(gpt2, fast):
    hf, ours, eos = gpt2
    prompts = [[5, 17, 88, 3], [42], [7, 7, 60, 23, 99, 11, 4], [30, 31]]
    ids, valid = _pad_batch(prompts, pad=PAD)
    batch = greedy(StepDecoder(ours, fast=fast), ids, valid, max_new_tokens=14, eos_id=eos, pad_id=PAD)
    for prompt, got in zip(prompts, batch.to_lists()):
        alone = torch.tensor([prompt])
        assert got == greedy(StepDecoder(ours), alone, max_new_tokens=14, eos_id=eos, pad_id=PAD).to_lists()[0]
        ref = _hf_generate(hf, alone, max_new_tokens=14, do_sample=False, num_beams=1, eos_token_id=eos)
        assert got == ref[0, len(prompt):].tolist()


@pytest.mark.parametrize("num_return", ["one", "all"])
@pytest.mark.parametrize("early_stopping", [False, True, "never"])
@pytest.mark.parametrize("length_penalty", [1.0, 0.0, 2.0])
@pytest.mark.parametrize("width", [2, 4])
@pytest.mark.parametrize("fast", [True, False], ids=["packed", "general"])
def test_beam_search_equals_transformers_generate(gpt2, fast, width, length_penalty, early_stopping, num_return):
    hf, ours, eos = gpt2
    R = 1 if num_return == "one" else width
    ids = _ids(3, 5, vocab=101, seed=1, low=2)
    out = beam_search(StepDecoder(ours, fast=fast), ids, beam_width=width, max_new_tokens=12, eos_id=eos,
                      length_penalty=length_penalty, early_stopping=early_stopping, num_return=R, pad_id=PAD)
    ref = _hf_generate(hf, ids, max_new_tokens=12, do_sample=False, num_beams=width, num_return_sequences=R,
                       length_penalty=length_penalty, early_stopping=early_stopping, eos_token_id=eos,
                       output_scores=True, return_dict_in_generate=True)
    assert out.tokens.shape[0] == ids.shape[0] * R
    _same_rows(out.tokens, ref.sequences[:, 5:])
    torch.testing.assert_close(out.scores, ref.sequences_scores, atol=1e-4, rtol=0)
    # lengths and finished agree with the tokens
    for row, n, done in zip(out.tokens, out.lengths, out.finished):
        assert (row[n:] == PAD).all() and bool(done) == (int(row[n - 1]) == eos)


def test_beam_search_with_min_new_tokens_equals_transformers(gpt2):
    hf, ours, eos = gpt2
    ids = _ids(3, 5, vocab=101, seed=4, low=2)
    out = beam_search(StepDecoder(ours), ids, beam_width=3, max_new_tokens=10, eos_id=eos, min_new_tokens=5,
                      num_return=3, pad_id=PAD)
    ref = _hf_generate(hf, ids, max_new_tokens=10, min_new_tokens=5, do_sample=False, num_beams=3,
                       num_return_sequences=3, eos_token_id=eos, output_scores=True, return_dict_in_generate=True)
    _same_rows(out.tokens, ref.sequences[:, 5:])
    torch.testing.assert_close(out.scores, ref.sequences_scores, atol=1e-4, rtol=0)
    assert (out.lengths > 5).all()


def test_beam_search_finds_finished_hypotheses_and_scores_them(gpt2):
    """The scores are summed log-probs / generated_len ** length_penalty of the returned tokens."""
    _, ours, eos = gpt2
    ids = _ids(3, 5, vocab=101, seed=1, low=2)
    for lp in (0.0, 1.0, 2.0):
        out = beam_search(StepDecoder(ours), ids, beam_width=4, max_new_tokens=12, eos_id=eos, num_return=4,
                          length_penalty=lp, pad_id=PAD)
        assert out.finished.any()
        for b, (row, n) in enumerate(zip(out.tokens, out.lengths)):
            seq = ids[b // 4].tolist() + row[:n].tolist()
            with torch.no_grad():
                log_probs = ours(torch.tensor([seq]))[0].float().log_softmax(-1)
            total = sum(float(log_probs[5 + i - 1, seq[5 + i]]) for i in range(int(n)))
            assert abs(total / int(n) ** lp - float(out.scores[b])) < 1e-4
        # hypotheses of each prompt are sorted best first
        assert (out.scores.view(3, 4).diff(dim=1) <= 1e-6).all()


def test_beam_search_padded_batch_equals_each_prompt_alone(gpt2):
    _, ours, eos = gpt2
    prompts = [[5, 17, 88, 3], [42], [7, 7, 60, 23, 99, 11, 4]]
    ids, valid = _pad_batch(prompts, pad=PAD)
    kw = dict(beam_width=3, max_new_tokens=10, eos_id=eos, num_return=2, pad_id=PAD, length_penalty=1.0)
    batch = beam_search(StepDecoder(ours), ids, valid, **kw)
    for i, prompt in enumerate(prompts):
        alone = beam_search(StepDecoder(ours), torch.tensor([prompt]), **kw)
        assert batch.to_lists()[2 * i:2 * i + 2] == alone.to_lists()
        torch.testing.assert_close(batch.scores[2 * i:2 * i + 2], alone.scores, atol=1e-5, rtol=0)


def test_beam_width_one_is_greedy(gpt2):
    _, ours, eos = gpt2
    ids = _ids(4, 5, vocab=101, seed=3, low=2)
    beam = beam_search(StepDecoder(ours), ids, beam_width=1, max_new_tokens=12, eos_id=eos, pad_id=PAD)
    assert beam.to_lists() == greedy(StepDecoder(ours), ids, max_new_tokens=12, eos_id=eos, pad_id=PAD).to_lists()


# ------------------------------------------------------------------------------------- filter_log_probs

@st.composite
def _distributions(draw):
    """Normalised float64 log-probs [B, V]; small integer logits make many ties, large scales near-zero masses."""
    B, V = draw(st.integers(1, 4)), draw(st.integers(1, 24))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    if draw(st.booleans()):
        logits = torch.randint(0, draw(st.integers(1, 4)), (B, V), generator=g).double()
    else:
        logits = torch.randn(B, V, generator=g, dtype=torch.float64) * draw(st.sampled_from([0.1, 1.0, 5.0, 30.0]))
    return logits.log_softmax(-1)


def _order(row):
    """Brute-force descending order, ties by token id (simbook's rule)."""
    return sorted(range(len(row)), key=lambda i: (-row[i], i))


def _nucleus_prefix(row, p, k=None):
    """The smallest prefix of `_order` (cut to its first k tokens and renormalised when k is given) whose mass is
    >= p: its length and the masses before each of its tokens."""
    order = _order(row)[:k]
    probs = [math.exp(row[i]) for i in order]
    total = sum(probs)
    before, mass = [], 0.0
    for q in probs:
        before.append(mass)
        mass += q / total
    return sum(m < p for m in before), before


def _assert_most_probable(kept, row):
    """Every kept token is at least as probable as every dropped one."""
    dropped = set(range(len(row))) - kept
    if kept and dropped:
        assert min(float(row[i]) for i in kept) >= max(float(row[i]) for i in dropped)


def _support(x):
    return set(torch.isfinite(x).nonzero()[:, 0].tolist())


def _assert_normalised_on_support(filtered, log_probs):
    finite = torch.isfinite(filtered)
    assert torch.allclose(filtered.logsumexp(-1), torch.zeros(filtered.shape[0], dtype=filtered.dtype), atol=1e-9)
    for out_row, in_row, keep in zip(filtered, log_probs, finite):
        shift = out_row[keep] - in_row[keep]                      # renormalising only shifts the kept log-probs
        assert torch.allclose(shift, shift[0].expand_as(shift), atol=1e-9)


@PROPERTY
@given(_distributions(), st.integers(1, 30))
def test_top_k_keeps_exactly_k(log_probs, k):
    out = filter_log_probs(log_probs, top_k=k)
    _assert_normalised_on_support(out, log_probs)
    for out_row, row in zip(out, log_probs):
        kept = _support(out_row)
        assert len(kept) == min(k, len(row))
        _assert_most_probable(kept, row)
        assert kept == set(_order(row.tolist())[:k])              # ties by token id


@PROPERTY
@given(_distributions(), st.floats(0.01, 1.0))
def test_nucleus_keeps_the_smallest_prefix_with_mass_p(log_probs, p):
    out = filter_log_probs(log_probs, top_p=p)
    _assert_normalised_on_support(out, log_probs)
    for out_row, row in zip(out, log_probs):
        n, before = _nucleus_prefix(row.tolist(), p)
        assume(all(abs(m - p) > 1e-9 for m in before))           # no mass within rounding of the threshold
        kept = _support(out_row)
        _assert_most_probable(kept, row)                          # a prefix of the most probable tokens
        probs = row.exp()
        mass = float(probs[sorted(kept)].sum())
        assert mass >= p - 1e-9 or len(kept) == len(row)
        smallest = min(float(probs[i]) for i in kept)
        assert mass - smallest < p                                # one token fewer would not reach p
        assert len(kept) == n
        assert kept == set(_order(row.tolist())[:n])              # ties by token id


@PROPERTY
@given(_distributions(), st.integers(1, 30), st.floats(0.01, 1.0))
def test_top_k_then_nucleus_keeps_the_nucleus_of_the_renormalised_top_k(log_probs, k, p):
    for row in log_probs.tolist():
        assume(all(abs(m - p) > 1e-9 for m in _nucleus_prefix(row, p, k)[1]))
    both = filter_log_probs(log_probs, top_k=k, top_p=p)
    _assert_normalised_on_support(both, log_probs)
    for both_row, row in zip(both, log_probs):
        n, _ = _nucleus_prefix(row.tolist(), p, k)
        kept = _support(both_row)
        assert kept == set(_order(row.tolist())[:n])
        # a subset of the intersection of the two filters applied separately
        assert kept <= _support(filter_log_probs(row[None], top_k=k)[0]) & _support(filter_log_probs(row[None], top_p=p)[0])


@PROPERTY
@given(_distributions(), st.data())
def test_consistent_filters_add_eos_and_renormalise(log_probs, data):
    V = log_probs.shape[1]
    eos = data.draw(st.integers(0, V - 1))
    k = data.draw(st.one_of(st.none(), st.integers(1, 30)))
    p = data.draw(st.one_of(st.none(), st.floats(0.01, 1.0)))
    assume(k is not None or p is not None)
    plain = filter_log_probs(log_probs, top_k=k, top_p=p)
    out = filter_log_probs(log_probs, top_k=k, top_p=p, consistent=True, eos_id=eos)
    _assert_normalised_on_support(out, log_probs)
    for out_row, plain_row, row in zip(out, plain, log_probs):
        assert _support(out_row) == _support(plain_row) | {eos}
        kept = sorted(_support(out_row))
        torch.testing.assert_close(out_row[kept], row[kept] - row[kept].logsumexp(0))


def test_filters_leave_the_distribution_alone_when_nothing_is_cut():
    log_probs = torch.randn(3, 12, generator=torch.Generator().manual_seed(0)).log_softmax(-1)
    torch.testing.assert_close(filter_log_probs(log_probs), log_probs)
    torch.testing.assert_close(filter_log_probs(log_probs, top_k=12), log_probs)
    torch.testing.assert_close(filter_log_probs(log_probs, top_k=50), log_probs)
    assert filter_log_probs(log_probs, top_k=1).isfinite().sum(-1).tolist() == [1, 1, 1]
    assert (filter_log_probs(log_probs, top_k=1).argmax(-1) == log_probs.argmax(-1)).all()
    # a tiny nucleus keeps only the most probable token
    assert filter_log_probs(log_probs, top_p=1e-6).isfinite().sum(-1).tolist() == [1, 1, 1]


# --------------------------------------------- the filters at exact ties and boundaries, against transformers

def _hf_kept(logits: torch.Tensor, top_k=None, top_p=None) -> list[set[int]]:
    """The tokens Hugging Face's warpers keep (top-k first, then top-p, as `generate` orders them)."""
    logits_process = pytest.importorskip("transformers.generation.logits_process")
    scores = logits.clone()
    if top_k is not None:
        scores = logits_process.TopKLogitsWarper(top_k)(None, scores)
    if top_p is not None:
        scores = logits_process.TopPLogitsWarper(top_p)(None, scores)
    return [_support(row) for row in scores]


def _kept(logits: torch.Tensor, top_k=None, top_p=None) -> list[set[int]]:
    """simbook's kept sets, by `filter_log_probs` and by the candidates `sample` draws from; they must agree."""
    filtered = [_support(row) for row in filter_log_probs(logits, top_k=top_k, top_p=top_p)]
    values, index = _candidates(logits, top_k, top_p, False, None)
    drawn = [set(i[torch.isfinite(v)].tolist()) for v, i in zip(values, index)]
    assert filtered == drawn
    return filtered


@pytest.mark.parametrize("V", [2, 4, 8, 64])
def test_nucleus_at_the_exact_boundary_keeps_the_token_that_reaches_p(V):
    """V equal logits: every probability is 1/V and every prefix mass j/V is exact in binary for these V. A nucleus
    of p = j/V is reached by the j-th token, so exactly j tokens are kept (a `>` in place of `>=` would keep j + 1),
    the j lowest ids; Hugging Face keeps j tokens too (which of the tied tokens is its sort's choice)."""
    logits = torch.zeros(1, V)
    for j in range(1, V):
        ours, theirs = _kept(logits, top_p=j / V)[0], _hf_kept(logits, top_p=j / V)[0]
        assert ours == set(range(j)) and len(theirs) == j, (j, ours, theirs)
        # just above the boundary the next token is needed
        assert _kept(logits, top_p=j / V + 1e-3)[0] == set(range(j + 1)) and len(_hf_kept(logits, top_p=j / V + 1e-3)[0]) == j + 1


def test_half_and_half_with_nucleus_one_half_keeps_one_token():
    ours, theirs = _kept(torch.zeros(1, 2), top_p=0.5)[0], _hf_kept(torch.zeros(1, 2), top_p=0.5)[0]
    assert ours == {0} and len(theirs) == 1


TOP_K_TIES = [  # logits, k, simbook's set, Hugging Face's set
    ([2.0, 1.0, 1.0, 0.0], 2, {0, 1}, {0, 1, 2}),          # a tie at the k-th probability: HF keeps both tied tokens
    ([2.0, 1.0, 1.0, 0.0], 3, {0, 1, 2}, {0, 1, 2}),       # the k-th and the next differ: both keep k
    ([2.0, 1.0, 1.0, 0.0], 1, {0}, {0}),
    ([0.0, 0.0, 0.0, 0.0], 2, {0, 1}, {0, 1, 2, 3}),
    ([0.0, 3.0, 0.0, 3.0, 0.0], 1, {1}, {1, 3}),           # top-1 = greedy: argmax's lowest id
    ([0.0, 3.0, 0.0, 3.0, 0.0], 2, {1, 3}, {1, 3}),
    ([0.0, 3.0, 0.0, 3.0, 0.0], 3, {0, 1, 3}, {0, 1, 2, 3, 4}),
]


@pytest.mark.parametrize("logits, k, ours, theirs", TOP_K_TIES)
def test_top_k_ties_keep_exactly_k_by_token_id(logits, k, ours, theirs):
    logits = torch.tensor([logits])
    assert _kept(logits, top_k=k)[0] == ours
    assert _hf_kept(logits, top_k=k)[0] == theirs
    if k == 1:
        assert ours == {int(logits.argmax())}


def test_ties_are_broken_by_token_id_in_long_rows():
    """torch's unstable sort and topk order tied values arbitrarily in long rows; the filters must not."""
    logits = torch.zeros(3, 64)
    logits[1, :32] = float("-inf")            # row 1: tokens 32..63, probability 1/32 each (exact masses)
    assert _kept(logits, top_k=7) == [set(range(7)), set(range(32, 39)), set(range(7))]
    assert _kept(logits, top_p=0.25) == [set(range(16)), set(range(32, 40)), set(range(16))]


def test_top_k_then_nucleus_takes_the_renormalised_top_k_distribution():
    """Logits 1, 1, 1, 1, 0, 0, 0, 0, top-k 4 then nucleus 0.5: in the renormalised top-4 each token has 1/4, so two
    reach 0.5 (as Hugging Face's warpers do); a nucleus of the whole row (0.18 each) would keep three."""
    logits = torch.tensor([[1.0] * 4 + [0.0] * 4])
    assert _kept(logits, top_p=0.5)[0] == {0, 1, 2}
    assert _kept(logits, top_k=4, top_p=0.5)[0] == {0, 1}
    assert len(_hf_kept(logits, top_k=4, top_p=0.5)[0]) == 2


def test_sample_draws_only_the_kept_tied_tokens():
    cases = [([0.25] * 4, dict(top_k=2), {0, 1}), ([0.25] * 4, dict(top_p=0.5), {0, 1}),
             ([0.5, 0.5], dict(top_p=0.5), {0}), ([0.4, 0.2, 0.2, 0.2], dict(top_k=2), {0, 1})]
    for probs, options, expected in cases:
        out = sample(FixedDecoder(probs), torch.zeros(400, 1, dtype=torch.long), max_new_tokens=1,
                     generator=torch.Generator().manual_seed(0), **options)
        assert set(out.tokens[:, 0].tolist()) == expected, (probs, options)


@PROPERTY
@given(_distributions(), st.one_of(st.none(), st.integers(1, 30)), st.one_of(st.none(), st.floats(0.01, 1.0)),
       st.sampled_from([1.0, 0.5, 3.0]))
def test_kept_sets_against_transformers_warpers(log_probs, k, p, scale):
    """simbook's kept set against Hugging Face's TopK/TopP warpers on the same logits (many of them tied). Both
    order by probability; they differ only at ties: simbook keeps exactly k at a tie at the k-th probability
    (Hugging Face keeps every tied token) and picks tied tokens by id (Hugging Face by its sort's order)."""
    assume(k is not None or p is not None)
    logits = log_probs * scale                                # unnormalised logits: a temperature of 1 / scale
    rows = logits.log_softmax(-1).tolist()
    if p is not None:                                         # no prefix mass within rounding of p
        for row in rows:
            assume(all(abs(m - p) > 1e-9 for m in _nucleus_prefix(row, p, k)[1]))
    ours, theirs = _kept(logits, top_k=k, top_p=p), _hf_kept(logits, top_k=k, top_p=p)
    for row, S, H in zip(rows, ours, theirs):
        order = _order(row)
        kept_probs = lambda s: sorted((row[i] for i in s), reverse=True)
        tie_at_k = k is not None and k < len(row) and row[order[k - 1]] == row[order[k]]
        assert S == set(order[:len(S)])                       # a prefix of the order, ties by id
        assert kept_probs(S) == kept_probs(H)[:len(S)]        # the same probabilities, Hugging Face's maybe more
        if not tie_at_k:
            assert len(S) == len(H)                           # same size: equal as multisets of probabilities
            smallest, dropped = min(row[i] for i in S), [row[i] for i in set(range(len(row))) - S]
            if smallest not in dropped:                       # no tie across the cut: the very same tokens
                assert S == H
        elif p is None:                                       # top-k alone: HF keeps every tie of the k-th
            assert len(S) == k and H == {i for i in range(len(row)) if row[i] >= row[order[k - 1]]}


# ---------------------------------------------------------------- sampling: a chi-square goodness-of-fit test

# 0.999 quantiles of the chi-square distribution (degrees of freedom 1..9), from a table
CHI2_999 = {1: 10.828, 2: 13.816, 3: 16.266, 4: 18.467, 5: 20.515, 6: 22.458, 7: 24.322, 8: 26.124, 9: 27.877}
PROBS = [0.25, 0.18, 0.14, 0.11, 0.09, 0.07, 0.06, 0.05, 0.03, 0.02]
EOS = 9


class FixedDecoder:
    """The StepDecoder interface around a model whose next-token distribution never changes."""

    def __init__(self, probs, max_position=100):
        self.fixed = torch.tensor(probs, dtype=torch.float32).log()
        self.vocab_size, self.max_position, self.device = len(probs), max_position, torch.device("cpu")
        self.calls = []

    def prefill(self, input_ids, valid=None, *, eos_id=None):
        self.rows = input_ids.shape[0]
        self.calls.append(("prefill", tuple(input_ids.shape)))
        return self.fixed.expand(self.rows, -1).clone()

    def step(self, next_ids, *, eos_id=None):
        assert next_ids.shape == (self.rows,)
        self.calls.append(("step", tuple(next_ids.shape)))
        return self.fixed.expand(self.rows, -1).clone()

    def reorder(self, index):
        self.rows = index.shape[0]


def _chi_square(counts, expected_probs):
    n = sum(counts)
    support = [i for i, q in enumerate(expected_probs) if q > 0]
    assert all(counts[i] == 0 for i in range(len(counts)) if i not in support), "a sample outside the support"
    return sum((counts[i] - n * expected_probs[i]) ** 2 / (n * expected_probs[i]) for i in support), len(support) - 1


def _renormalised(weights):
    total = sum(weights)
    return [w / total for w in weights]


def test_chi_square_table():
    scipy_stats = pytest.importorskip("scipy.stats")
    for df, value in CHI2_999.items():
        assert abs(scipy_stats.chi2.ppf(0.999, df) - value) < 1e-3


CASES = {  # options of `sample` -> the filtered distribution, worked out by hand from PROBS
    "top-k 4": (dict(top_k=4), _renormalised(PROBS[:4] + [0] * 6)),
    "nucleus 0.7": (dict(top_p=0.7), _renormalised(PROBS[:5] + [0] * 5)),                 # 0.68 < 0.7 <= 0.77
    "consistent nucleus 0.3": (dict(top_p=0.3, consistent=True), _renormalised(PROBS[:2] + [0] * 7 + [PROBS[9]])),
    "top-k 4, temperature 2": (dict(top_k=4, temperature=2.0), _renormalised([q ** 0.5 for q in PROBS[:4]] + [0] * 6)),
    "ancestral": (dict(), PROBS),
}


@pytest.mark.parametrize("case", list(CASES))
def test_sample_matches_the_filtered_distribution(case):
    options, expected = CASES[case]
    decoder = FixedDecoder(PROBS)
    out = sample(decoder, torch.zeros(20_000, 1, dtype=torch.long), max_new_tokens=1, eos_id=EOS,
                 generator=torch.Generator().manual_seed(1234), **options)
    counts = torch.bincount(out.tokens[:, 0], minlength=10).tolist()
    statistic, df = _chi_square(counts, expected)
    assert statistic < CHI2_999[df], (counts, statistic)
    # a deliberately wrong distribution (0.02 of mass moved from the first token to the second) is rejected
    wrong = list(expected)
    wrong[0], wrong[1] = wrong[0] - 0.02, wrong[1] + 0.02
    assert _chi_square(counts, wrong)[0] > CHI2_999[df]


def test_nucleus_under_min_new_tokens_is_taken_from_the_renormalised_distribution():
    """While <eos> is forbidden, the nucleus is the smallest prefix of the distribution *without* <eos> (renormalised,
    as Hugging Face's processors do): with eos = token 0 (p = 0.5) removed, 0.3 / 0.5 = 0.6 >= p=0.55 keeps only
    token 1; a nucleus computed on the unrenormalised row would keep tokens 1 and 2 (0.3 < 0.55)."""
    decoder = FixedDecoder([0.5, 0.3, 0.15, 0.05])
    out = sample(decoder, torch.zeros(2000, 1, dtype=torch.long), max_new_tokens=1, eos_id=0, min_new_tokens=1,
                 top_p=0.55, generator=torch.Generator().manual_seed(0))
    assert (out.tokens[:, 0] == 1).all()


def test_sample_over_many_steps_uses_step_and_respects_min_new_tokens():
    decoder = FixedDecoder([0.1, 0.1, 0.8])           # eos (2) is the likely token
    out = sample(decoder, torch.zeros(500, 3, dtype=torch.long), max_new_tokens=8, eos_id=2, min_new_tokens=3,
                 pad_id=0, generator=torch.Generator().manual_seed(0))
    assert (out.lengths >= 4).all() and out.finished.float().mean() > 0.9
    first = [row[:3] for row in out.to_lists()]
    assert all(2 not in row for row in first)
    assert decoder.calls[0] == ("prefill", (500, 3)) and all(c == ("step", (500,)) for c in decoder.calls[1:])
    # after min_new_tokens the eos share of the fourth token is 0.8
    assert abs(float((out.tokens[:, 3] == 2).float().mean()) - 0.8) < 0.06


def test_sample_is_reproducible_with_a_generator(bert):
    ids = _ids(3, 4)
    kw = dict(max_new_tokens=10, top_k=5, top_p=0.9, temperature=0.8)
    a = sample(StepDecoder(bert), ids, generator=torch.Generator().manual_seed(7), **kw)
    b = sample(StepDecoder(bert), ids, generator=torch.Generator().manual_seed(7), **kw)
    c = sample(StepDecoder(bert), ids, generator=torch.Generator().manual_seed(8), **kw)
    assert torch.equal(a.tokens, b.tokens) and not torch.equal(a.tokens, c.tokens)


def test_sample_top_k_one_is_greedy(bert):
    ids, valid = _pad_batch([[1, 2, 3], [4, 5, 6, 7, 8], [9]])
    got = sample(StepDecoder(bert), ids, valid, max_new_tokens=9, top_k=1, generator=torch.Generator().manual_seed(0))
    assert got.to_lists() == greedy(StepDecoder(bert), ids, valid, max_new_tokens=9).to_lists()


# ------------------------------------------------------------------------------- the self-terminating layer

@st.composite
def _st_inputs(draw):
    B, T, V = draw(st.integers(1, 3)), draw(st.integers(1, 12)), draw(st.integers(2, 20))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    scale = draw(st.sampled_from([0.1, 1.0, 5.0, 30.0]))
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64) * scale
    return logits, draw(st.integers(0, V - 1)), draw(st.floats(1e-3, 0.999))


@PROPERTY
@given(_st_inputs())
def test_self_terminating_eos_probability_bound_and_normalisation(inputs):
    logits, eos, eps = inputs
    log_probs, log_keep = self_terminating_log_probs(logits, eos, eps)
    assert log_probs.shape == logits.shape and log_keep.shape == logits.shape[:2]
    T = logits.shape[1]
    bound = 1 - (1 - eps) ** torch.arange(1, T + 1, dtype=torch.float64)
    p_eos = log_probs[..., eos].exp()
    assert (p_eos >= bound - 1e-12).all()
    assert (p_eos[:, 1:] >= p_eos[:, :-1] - 1e-12).all()                 # p(eos) only grows
    torch.testing.assert_close(log_probs.logsumexp(-1), torch.zeros(logits.shape[:2], dtype=torch.float64),
                               atol=1e-9, rtol=0)
    # the product of alpha_t = (1 - eps) sigmoid(z_eos), and the other tokens in proportion to exp(z)
    alpha = (1 - eps) * torch.sigmoid(logits[..., eos])
    torch.testing.assert_close(log_keep, alpha.log().cumsum(1))
    others = [v for v in range(logits.shape[2]) if v != eos]
    if others:
        rel = log_probs[..., others] - logits[..., others]
        torch.testing.assert_close(rel, rel[..., :1].expand_as(rel), atol=1e-7, rtol=0)


@PROPERTY
@given(_st_inputs(), st.data())
def test_self_terminating_initial_log_keep_continues_a_sequence(inputs, data):
    logits, eos, eps = inputs
    T = logits.shape[1]
    assume(T >= 2)
    split = data.draw(st.integers(1, T - 1))
    full, keep_full = self_terminating_log_probs(logits, eos, eps)
    head, keep_head = self_terminating_log_probs(logits[:, :split], eos, eps)
    tail, keep_tail = self_terminating_log_probs(logits[:, split:], eos, eps, keep_head[:, -1])
    torch.testing.assert_close(torch.cat([head, tail], 1), full)
    torch.testing.assert_close(torch.cat([keep_head, keep_tail], 1), keep_full)


def test_self_terminating_float32_rows_are_normalised():
    logits = torch.randn(4, 30, 40, generator=torch.Generator().manual_seed(0)) * 8
    log_probs, _ = self_terminating_log_probs(logits, 3, 0.05)
    assert log_probs.dtype == torch.float32
    torch.testing.assert_close(log_probs.logsumexp(-1), torch.zeros(4, 30), atol=1e-5, rtol=0)


def _st_greedy_bound(eps):
    """The smallest t with 1 - (1 - eps)^t > 0.5: p(eos) > 0.5 from that step on, so argmax picks eos."""
    t = 1
    while 1 - (1 - eps) ** t <= 0.5:
        t += 1
    return t


@pytest.mark.parametrize("eps", [0.3, 0.1, 0.05, 0.02])
def test_self_terminating_greedy_always_ends_within_the_bound(bert, eps):
    bound = _st_greedy_bound(eps)
    prompts = [list(range(1 + i, 4 + 2 * i)) for i in range(6)]
    ids, valid = _pad_batch(prompts)
    plain = greedy(StepDecoder(bert), ids, valid, max_new_tokens=bound + 10)
    never = sorted(set(range(50)) - {tok for row in plain.to_lists() for tok in row})
    for eos in never[:3] + [_most_frequent(plain.to_lists())]:   # eos greedy never or often picks without the layer
        out = greedy(StepDecoder(bert, self_terminating=eps), ids, valid, max_new_tokens=bound + 10, eos_id=eos)
        assert out.finished.all() and (out.lengths <= bound).all(), (eos, out.lengths.tolist())


class FixedLM(torch.nn.Module):
    """A "model" whose logits never change: eos (0) and one other token (5) far above the rest."""

    def __init__(self, vocab=50, eos_logit=20.0, other_logit=30.0):
        super().__init__()
        self.config = TransformerConfig(vocab_size=vocab, hidden_size=4, num_heads=1, max_position=200)
        self.logits = torch.nn.Parameter(torch.zeros(vocab), requires_grad=False)
        self.logits[0], self.logits[5] = eos_logit, other_logit

    def new_cache(self):
        return None

    def forward(self, input_ids, mask=None, **kw):
        return self.logits.expand(*input_ids.shape, -1)


@pytest.mark.parametrize("eps", [0.3, 0.1, 0.05, 0.02])
def test_self_terminating_greedy_reaches_the_bound_exactly(eps):
    """With sigmoid(z_eos) ~ 1 and one dominant other token, p(other) = (1 - eps)^t: greedy picks eos exactly at
    the bound, counting generated tokens only (the prompt does not enter the product)."""
    bound = _st_greedy_bound(eps)
    ids, valid = _pad_batch([[7] * 9, [8] * 2, [9]])
    out = greedy(StepDecoder(FixedLM(), self_terminating=eps), ids, valid, max_new_tokens=bound + 5, eos_id=0)
    assert out.lengths.tolist() == [bound] * 3 and out.finished.all()
    assert out.to_lists() == [[5] * (bound - 1) + [0]] * 3


def test_self_terminating_decoder_equals_brute_force(bert):
    """The decoder's cached ST log-probs equal the layer applied to an uncached forward of the generated tokens
    (the product starts with the first generated token)."""
    eps, eos = 0.05, 17
    prompts = [[3, 14, 15, 9, 26], [5, 35], [8, 9, 7, 9, 3, 2, 38, 4]]
    ids, valid = _pad_batch(prompts)
    out = greedy(StepDecoder(bert, self_terminating=eps), ids, valid, max_new_tokens=30, eos_id=eos)
    for prompt, got in zip(prompts, out.to_lists()):
        seq = prompt + got
        with torch.no_grad():
            logits = bert(torch.tensor([seq]), mask=causal_mask(torch.ones(1, len(seq), dtype=torch.bool)))
        log_probs, _ = self_terminating_log_probs(logits[:, len(prompt) - 1:-1], eos, eps)
        assert log_probs[0].argmax(-1).tolist() == got
    assert out.finished.all()


# ----------------------------------------------------------------------------------------------- metrics

def test_non_termination_ratio():
    out = DecodingOutput(torch.zeros(4, 3, dtype=torch.long), torch.tensor([3, 1, 3, 2]),
                         torch.tensor([False, True, False, True]))
    assert non_termination_ratio(out) == 0.5
    all_done = DecodingOutput(torch.zeros(2, 1, dtype=torch.long), torch.ones(2, dtype=torch.long),
                              torch.tensor([True, True]))
    assert non_termination_ratio(all_done) == 0.0


def test_non_termination_ratio_of_greedy(bert):
    ids, valid = _pad_batch([[1, 2, 3], [4, 5, 6, 7, 8], [9], [10, 11]])
    plain = greedy(StepDecoder(bert), ids, valid, max_new_tokens=6)
    assert non_termination_ratio(plain) == 1.0
    eos = plain.to_lists()[0][1]
    out = greedy(StepDecoder(bert), ids, valid, max_new_tokens=6, eos_id=eos)
    assert non_termination_ratio(out) == pytest.approx(1 - out.finished.float().mean().item())
    assert 0 < non_termination_ratio(out) < 1 or out.finished.all()


def test_repetition_stats_by_hand():
    stats = repetition_stats([[1, 2, 3, 1, 2, 3, 1, 2, 3], [4, 4]], n=3)
    # trigrams of the first sequence: 123 231 312 123 231 312 123 -> 7, of which 4 repeat an earlier one;
    # the second sequence has none. Unigrams {1,2,3,4} over 11 tokens; bigrams {12,23,31,44} over 8 + 1.
    assert stats == {"repeated_3grams": pytest.approx(4 / 7), "distinct_1": pytest.approx(4 / 11),
                     "distinct_2": pytest.approx(4 / 9)}


def test_repetition_stats_counts_repeats_within_a_sequence_only():
    stats = repetition_stats([[5, 6, 7, 8], [5, 6, 7, 8]])               # n=4 by default
    assert stats == {"repeated_4grams": 0.0, "distinct_1": 0.5, "distinct_2": 0.5}
    loop = repetition_stats([[9] * 10], n=2)
    assert loop == {"repeated_2grams": pytest.approx(8 / 9), "distinct_1": 0.1, "distinct_2": pytest.approx(1 / 9)}


def test_repetition_stats_of_short_and_empty_sequences():
    assert repetition_stats([[1, 2], []], n=4) == {"repeated_4grams": 0.0, "distinct_1": 1.0, "distinct_2": 1.0}
    assert repetition_stats([]) == {"repeated_4grams": 0.0, "distinct_1": 0.0, "distinct_2": 0.0}
    with pytest.raises(ValueError, match="n"):
        repetition_stats([[1, 2]], n=0)
    with pytest.raises(TypeError, match="n"):
        repetition_stats([[1, 2]], n=2.0)


# ------------------------------------------------------------------- the fast path (PackedGPT) vs the general one

def _gpt(seed=0, vocab=37, width=32, heads=4, layers=2, max_position=48, segments=False, activation="gelu_tanh"):
    from simbook.models.gpt import GPT
    torch.manual_seed(seed)
    config = TransformerConfig(vocab_size=vocab, hidden_size=width, num_layers=layers, num_heads=heads,
                               intermediate_size=2 * width, max_position=max_position, dropout=0.0, pre_norm=True,
                               activation=activation)
    model = GPT(config, segments=segments).eval()
    with torch.no_grad():                                    # wider logits than the default init: fewer near-ties
        model.token.weight.mul_(8)
    return model


@st.composite
def _fast_path_cases(draw):
    heads = draw(st.sampled_from([1, 2, 4]))
    model_kw = dict(seed=draw(st.integers(0, 2**16)), vocab=draw(st.integers(5, 40)), width=heads * draw(st.sampled_from([4, 8])),
                    heads=heads, layers=draw(st.integers(1, 3)), segments=draw(st.booleans()),
                    activation=draw(st.sampled_from(["gelu", "gelu_tanh", "relu"])))
    lengths = draw(st.lists(st.integers(1, 9), min_size=1, max_size=4))
    prompts = [draw(st.lists(st.integers(0, model_kw["vocab"] - 1), min_size=n, max_size=n)) for n in lengths]
    return model_kw, prompts, draw(st.integers(1, 12)), draw(st.sampled_from([None, 1, 7]))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_fast_path_cases())
def test_fast_path_log_probs_equal_the_general_path(case):
    """prefill/step/reorder of the packed path give the general path's log-probs, with padding, any layer count,
    activation, segment embeddings, and a cache that must grow (capacity 1)."""
    model_kw, prompts, steps, capacity = case
    model = _gpt(**model_kw)
    ids, valid = _pad_batch(prompts)
    fast, general = StepDecoder(model, fast=True), StepDecoder(model, fast=False)
    a, b = fast.prefill(ids, valid, capacity=capacity), general.prefill(ids, valid)
    torch.testing.assert_close(a, b, atol=2e-5, rtol=0)
    generator = torch.Generator().manual_seed(model_kw["seed"])
    for t in range(steps):
        token = torch.multinomial(b.exp(), 1, generator=generator)[:, 0]       # any tokens, not only likely ones
        a, b = fast.step(token), general.step(token)
        torch.testing.assert_close(a, b, atol=2e-5, rtol=0)
        if t % 2 == 0:                               # beam search's row shuffling, repeated (rows copied in place)
            index = torch.randint(len(prompts), (len(prompts),), generator=generator)
            fast.reorder(index)
            general.reorder(index)
    assert fast.packed is not None and general.packed is None


@pytest.mark.parametrize("self_terminating", [None, 0.2])
def test_fast_path_tokens_equal_the_general_path_for_every_decoder(self_terminating):
    model = _gpt(seed=3, vocab=23)
    ids, valid = _pad_batch([[4, 9, 1], [7], [2, 2, 2, 2, 5]])
    for run in (lambda d: greedy(d, ids, valid, max_new_tokens=15, eos_id=3),
                lambda d: beam_search(d, ids, valid, beam_width=3, max_new_tokens=15, eos_id=3, num_return=3),
                lambda d: sample(d, ids, valid, max_new_tokens=15, eos_id=3, top_k=5, top_p=0.9,
                                 generator=torch.Generator().manual_seed(0))):
        fast = run(StepDecoder(model, self_terminating=self_terminating))
        general = run(StepDecoder(model, self_terminating=self_terminating, fast=False))
        assert fast.tokens.tolist() == general.tokens.tolist()
        assert fast.lengths.tolist() == general.lengths.tolist()


def test_fast_path_is_taken_only_where_it_applies(bert):
    model = _gpt()
    ids = _ids(2, 3, vocab=37)
    decoder = StepDecoder(model)
    decoder.prefill(ids)
    assert decoder.packed is not None                               # default: a GPT in eval mode goes fast
    decoder = StepDecoder(bert)
    decoder.prefill(_ids(2, 3))
    assert decoder.packed is None                                   # a BertLM takes the general road
    with pytest.raises(ValueError, match="only a simbook GPT"):
        StepDecoder(bert, fast=True).prefill(_ids(2, 3))
    with pytest.raises(ValueError, match="unilm layout"):
        StepDecoder(model, layout="unilm", fast=True).prefill(ids)
    model.train()
    try:
        decoder = StepDecoder(model)
        decoder.prefill(ids)
        assert decoder.packed is None                               # dropout is live: the general road
        with pytest.raises(ValueError, match="training mode"):
            StepDecoder(model, fast=True).prefill(ids)
    finally:
        model.eval()
    with pytest.raises(TypeError, match="fast"):
        StepDecoder(model, fast="yes")
    with pytest.raises(ValueError, match="capacity"):
        StepDecoder(model).prefill(ids, capacity=0)


def test_fast_path_reads_the_weights_afresh_at_each_prefill():
    """Packing copies q/k/v into one matrix: a model trained between two calls must be decoded with its new weights."""
    model = _gpt(seed=1)
    ids = _ids(2, 4, vocab=37)
    decoder = StepDecoder(model)
    before = decoder.prefill(ids)
    with torch.no_grad():
        for layer in model.stack.layers:
            layer.attention.value.weight.normal_(generator=torch.Generator().manual_seed(5))
    after = decoder.prefill(ids)
    torch.testing.assert_close(after, StepDecoder(model, fast=False).prefill(ids), atol=2e-5, rtol=0)
    assert (after - before).abs().max() > 1e-2


def test_fast_path_stops_at_the_position_table():
    model = _gpt(max_position=10)
    decoder = StepDecoder(model, fast=True)
    log_probs = decoder.prefill(_ids(1, 9, vocab=37))
    log_probs = decoder.step(log_probs.argmax(-1))                  # position 9: the last one
    with pytest.raises(ValueError, match="10 positions"):
        decoder.step(log_probs.argmax(-1))


# ------------------------------------------------------------------------------------------ argument checks

@pytest.fixture(scope="module")
def dec(bert):
    return StepDecoder(bert)


IDS = _ids(2, 4)


@pytest.mark.parametrize("fn", ["greedy", "sample", "beam"])
@pytest.mark.parametrize("kw,err,match", [
    (dict(max_new_tokens=0), ValueError, "max_new_tokens"),
    (dict(max_new_tokens=-3), ValueError, "max_new_tokens"),
    (dict(max_new_tokens=2.0), TypeError, "max_new_tokens"),
    (dict(max_new_tokens=True), TypeError, "max_new_tokens"),
    (dict(eos_id=50), ValueError, "eos_id"),
    (dict(eos_id=-1), ValueError, "eos_id"),
    (dict(min_new_tokens=4), ValueError, "min_new_tokens"),
    (dict(min_new_tokens=-1), ValueError, "min_new_tokens"),
    (dict(max_new_tokens=62), ValueError, "positions"),               # prompt 4 + 62 - 1 > 64 positions
])
def test_decoders_refuse_bad_lengths_and_ids(dec, fn, kw, err, match):
    args = dict(max_new_tokens=3, eos_id=1)
    args.update(kw)
    with pytest.raises(err, match=match):
        _run(fn, dec, IDS, **args)


def _run(fn, decoder, ids, valid=None, **kw):
    if fn == "greedy":
        return greedy(decoder, ids, valid, **kw)
    if fn == "sample":
        return sample(decoder, ids, valid, generator=torch.Generator().manual_seed(0), **kw)
    return beam_search(decoder, ids, valid, beam_width=2, **kw)


@pytest.mark.parametrize("fn", ["greedy", "sample", "beam"])
@pytest.mark.parametrize("ids,valid,err,match", [
    (torch.zeros(0, 4, dtype=torch.long), None, ValueError, "input_ids"),           # empty batch
    (torch.zeros(2, 0, dtype=torch.long), None, ValueError, "input_ids"),           # empty prompts
    (IDS.float(), None, TypeError, "input_ids"),
    (IDS[0], None, ValueError, "input_ids"),
    (IDS, torch.ones(2, 4, dtype=torch.long), TypeError, "valid"),                  # non-bool valid
    (IDS, torch.ones(2, 4).float(), TypeError, "valid"),
    (IDS, torch.ones(2, 3, dtype=torch.bool), ValueError, "valid"),
    (IDS, torch.tensor([[False, True, True, True], [True] * 4]), ValueError, "valid"),  # left padding
    (IDS + 50, None, ValueError, "input_ids"),                                      # outside the vocabulary
    (IDS, torch.tensor([[False] * 4, [True] * 4]), ValueError, "at least one token"),  # an empty row
])
def test_decoders_refuse_bad_prompts(dec, fn, ids, valid, err, match):
    with pytest.raises(err, match=match):
        _run(fn, dec, ids, valid, max_new_tokens=3, eos_id=1)


def test_prompt_too_long_for_the_position_table(dec):
    with pytest.raises(ValueError, match="positions"):
        greedy(dec, _ids(1, 70), max_new_tokens=1)
    ids, valid = _pad_batch([[1] * 60, [2] * 3])
    with pytest.raises(ValueError, match="positions"):            # the longest prompt counts
        greedy(dec, ids, valid, max_new_tokens=6)
    assert greedy(dec, ids, valid, max_new_tokens=5).tokens.shape == (2, 5)


@pytest.mark.parametrize("kw,err,match", [
    (dict(top_p=0.0), ValueError, "top_p"), (dict(top_p=-0.1), ValueError, "top_p"),
    (dict(top_p=1.01), ValueError, "top_p"), (dict(top_p=float("nan")), ValueError, "top_p"),
    (dict(top_k=0), ValueError, "top_k"), (dict(top_k=-2), ValueError, "top_k"), (dict(top_k=2.5), TypeError, "top_k"),
    (dict(temperature=0.0), ValueError, "temperature"), (dict(temperature=-1.0), ValueError, "temperature"),
    (dict(temperature=float("nan")), ValueError, "temperature"),
    (dict(temperature=float("inf")), ValueError, "temperature"),
    (dict(consistent=True), ValueError, "consistent"),                      # without top_k / top_p
    (dict(top_k=3, consistent=True, eos_id=None), ValueError, "eos_id"),
])
def test_sample_refuses_bad_options(dec, kw, err, match):
    args = dict(max_new_tokens=3, eos_id=1)
    args.update(kw)
    with pytest.raises(err, match=match):
        sample(dec, IDS, **args)


@pytest.mark.parametrize("kw,err,match", [
    (dict(top_p=0.0), ValueError, "top_p"), (dict(top_p=1.5), ValueError, "top_p"),
    (dict(top_p=float("nan")), ValueError, "top_p"), (dict(top_k=0), ValueError, "top_k"),
    (dict(top_k=1.0), TypeError, "top_k"),
    (dict(top_k=2, consistent=True), ValueError, "eos_id"),
    (dict(top_k=2, consistent=True, eos_id=10), ValueError, "eos_id"),
    (dict(top_k=2, consistent=True, eos_id=-1), ValueError, "eos_id"),
])
def test_filter_refuses_bad_options(kw, err, match):
    with pytest.raises(err, match=match):
        filter_log_probs(torch.zeros(2, 10).log_softmax(-1), **kw)


def test_filter_refuses_bad_tensors():
    with pytest.raises(TypeError, match="log_probs"):
        filter_log_probs(torch.zeros(2, 10, dtype=torch.long), top_k=2)
    with pytest.raises(ValueError, match="log_probs"):
        filter_log_probs(torch.zeros(10), top_k=2)
    with pytest.raises(TypeError, match="log_probs"):
        filter_log_probs([[0.0, 0.0]], top_k=1)


@pytest.mark.parametrize("kw,err,match", [
    (dict(beam_width=51), ValueError, "beam_width"),                          # vocabulary of 50
    (dict(beam_width=0), ValueError, "beam_width"), (dict(beam_width=2.0), TypeError, "beam_width"),
    (dict(num_return=3), ValueError, "num_return"), (dict(num_return=0), ValueError, "num_return"),
    (dict(early_stopping="always"), ValueError, "early_stopping"),
    (dict(early_stopping=None), ValueError, "early_stopping"),
    (dict(early_stopping="True"), ValueError, "early_stopping"),
    (dict(eos_id=50), ValueError, "eos_id"),
])
def test_beam_search_refuses_bad_options(dec, kw, err, match):
    args = dict(beam_width=2, max_new_tokens=3, eos_id=1)
    args.update(kw)
    with pytest.raises(err, match=match):
        beam_search(dec, IDS, **args)


def test_beam_width_equal_to_the_vocabulary_is_allowed():
    model = _bert_lm(vocab=6)
    out = beam_search(StepDecoder(model), _ids(2, 3, vocab=6), beam_width=6, num_return=6, max_new_tokens=4, eos_id=0)
    assert out.tokens.shape[0] == 12 and torch.isfinite(out.scores).all()


@pytest.mark.parametrize("kw,err,match", [
    (dict(layout="bidirectional"), ValueError, "layout"), (dict(layout="Causal"), ValueError, "layout"),
    (dict(self_terminating=0.0), ValueError, "epsilon"), (dict(self_terminating=1.0), ValueError, "epsilon"),
    (dict(self_terminating=-0.5), ValueError, "epsilon"), (dict(self_terminating=1.5), ValueError, "epsilon"),
    (dict(self_terminating=float("nan")), ValueError, "epsilon"),
])
def test_step_decoder_refuses_bad_options(bert, kw, err, match):
    with pytest.raises(err, match=match):
        StepDecoder(bert, **kw)


def test_self_terminating_needs_eos(bert):
    with pytest.raises(ValueError, match="eos_id"):
        greedy(StepDecoder(bert, self_terminating=0.1), IDS, max_new_tokens=3)


@pytest.mark.parametrize("kw,err,match", [
    (dict(eos_id=10), ValueError, "eos_id"), (dict(eos_id=-1), ValueError, "eos_id"),
    (dict(epsilon=0.0), ValueError, "epsilon"), (dict(epsilon=1.0), ValueError, "epsilon"),
    (dict(epsilon=-0.2), ValueError, "epsilon"), (dict(epsilon=float("nan")), ValueError, "epsilon"),
])
def test_self_terminating_layer_refuses_bad_options(kw, err, match):
    args = dict(eos_id=2, epsilon=0.1)
    args.update(kw)
    with pytest.raises(err, match=match):
        self_terminating_log_probs(torch.zeros(1, 3, 10), **args)


def test_self_terminating_layer_refuses_bad_tensors():
    with pytest.raises(TypeError, match="logits"):
        self_terminating_log_probs(torch.zeros(1, 3, 10, dtype=torch.long), 2, 0.1)
    with pytest.raises(ValueError, match="logits"):
        self_terminating_log_probs(torch.zeros(3, 10), 2, 0.1)


def test_stream_checks_its_arguments_when_iterated(dec):
    gen = stream(dec, IDS, max_new_tokens=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        next(gen)


# ------------------------------------------------------------------------- known bugs (xfail, reported)

def test_valid_must_be_a_tensor(dec):
    with pytest.raises(TypeError, match="valid"):
        greedy(dec, IDS, [[True] * 4] * 2, max_new_tokens=3)


def test_beam_search_without_eos_fails_clearly(dec):
    with pytest.raises((TypeError, ValueError), match="eos_id"):
        beam_search(dec, IDS, beam_width=2, max_new_tokens=3, eos_id=None)


def test_temperature_of_the_wrong_type(dec):
    with pytest.raises(TypeError, match="temperature"):
        sample(dec, IDS, max_new_tokens=3, temperature="1.0")


def test_early_stopping_one_is_refused(dec):
    with pytest.raises((TypeError, ValueError), match="early_stopping"):
        beam_search(dec, IDS, beam_width=2, max_new_tokens=3, eos_id=1, early_stopping=1)


def test_eos_id_must_be_an_int(dec):
    with pytest.raises(TypeError, match="eos_id"):
        greedy(dec, IDS, max_new_tokens=3, eos_id=2.5)


def test_pad_id_outside_the_vocabulary(bert):
    ids = _ids(6, 4, seed=3)
    ref = greedy(StepDecoder(bert), ids, max_new_tokens=8, eos_id=33, pad_id=0)
    assert ref.finished.any() and not ref.finished.all()                  # rows end at different steps
    try:
        out = greedy(StepDecoder(bert), ids, max_new_tokens=8, eos_id=33, pad_id=-1)
    except ValueError as e:                                               # refused up front: acceptable
        assert "pad_id" in str(e)
    else:
        assert out.to_lists() == ref.to_lists()


# ---------------------------------------------------------------------------------- the LM experiments' corpus

def test_paragraph_corpus_split_vocabulary_and_prompts():
    from simbook.experiments.decoding import paragraph_corpus
    corpus = paragraph_corpus(prompt_chars=3, max_chars=30, vocab=300, min_test=5)
    texts = corpus.train + corpus.test
    assert len(corpus.test) >= 5 and abs(len(corpus.train) / len(texts) - 0.9) < 0.01
    assert all(9 <= len(t) <= 30 for t in texts)                    # prompt_chars + 6 .. max_chars
    known = set(corpus.tokenizer._id_to_token)
    assert all(set(t) <= known for t in texts)                      # no [UNK] anywhere
    prompts = corpus.prompts(corpus.test[:4])
    assert prompts.shape == (4, 4) and (prompts[:, 0] == corpus.tokenizer.cls_id).all()
    assert corpus.tokenizer.decode(prompts[0, 1:].tolist()).replace(" ", "") == corpus.test[0][:3]


def test_paragraph_corpus_holds_out_what_the_contexts_need():
    """The paper's 1,000 real contexts: the split moves so that 1,000 paragraphs are held out (the 90/10 split of
    this corpus holds out about 300), the same paragraphs in the same order, and never more than half."""
    from simbook.experiments.decoding import ScaleConfig, paragraph_corpus
    config = ScaleConfig()
    kw = dict(prompt_chars=config.prompt_chars, max_chars=config.max_chars, vocab=config.vocab)
    usual, more = paragraph_corpus(**kw, min_test=1), paragraph_corpus(**kw, min_test=config.contexts)
    assert len(usual.test) < config.contexts == len(more.test)
    assert usual.train + usual.test == more.train + more.test and more.train == usual.train[:len(more.train)]
    with pytest.raises(ValueError, match="at most half"):
        paragraph_corpus(**kw, min_test=len(usual.train))


@pytest.mark.parametrize("kw,match", [(dict(prompt_chars=0), "prompt_chars"), (dict(vocab=-1), "vocab"),
                                      (dict(min_test=10**9), "held-out")])
def test_paragraph_corpus_refuses_bad_settings(kw, match):
    from simbook.experiments.decoding import paragraph_corpus
    with pytest.raises(ValueError, match=match):
        paragraph_corpus(**kw)


# ---------------------------------------------------------------------------------- the language-model loss

def test_language_model_loss_and_perplexity_of_a_uniform_model():
    from simbook.decoding import language_model_batch, language_model_loss, perplexity
    from simbook.text import CharTokenizer

    class Uniform(torch.nn.Module):
        def __init__(self, vocab_size):
            super().__init__()
            self.vocab_size, self.anchor = vocab_size, torch.nn.Parameter(torch.zeros(()))

        def forward(self, input_ids, mask=None):
            return torch.zeros(*input_ids.shape, self.vocab_size) + self.anchor

    texts = ["今天天气不错", "不错", "根本停不下来了吧"]
    tok = CharTokenizer.build(texts)
    batch = language_model_batch(tok, texts, max_chars=5)
    assert set(batch) == {"input_ids", "valid"} and batch["input_ids"].shape == (3, 7)
    assert (batch["input_ids"][:, 0] == tok.cls_id).all() and batch["valid"].sum(1).tolist() == [7, 4, 7]
    V = tok.vocab_size
    assert perplexity(Uniform(V), tok, texts, max_chars=5, batch_size=2) == pytest.approx(V, rel=1e-5)
    loss = language_model_loss(torch.zeros(3, 7, V), batch["input_ids"], batch["valid"])
    assert loss.item() == pytest.approx(math.log(V), rel=1e-6)


def test_train_language_model_with_the_trainer_is_deterministic_and_learns():
    from simbook.experiments.decoding import paragraph_corpus, train_language_model
    from simbook.models.gpt import GPT

    corpus = paragraph_corpus(prompt_chars=3, max_chars=24, vocab=200, min_test=5)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = GPT(TransformerConfig(vocab_size=corpus.tokenizer.vocab_size, hidden_size=32, num_layers=1,
                                      num_heads=4, intermediate_size=64, max_position=32, dropout=0.0,
                                      pre_norm=True))
        runs.append(train_language_model(model, corpus.tokenizer, corpus.train, steps=30, batch_size=8,
                                         max_chars=24, self_terminating=0.1, device="cpu").losses)
    assert runs[0] == runs[1] and len(runs[0]) == 30
    assert sum(runs[0][-5:]) < 0.8 * sum(runs[0][:5])
    with pytest.raises(ValueError, match="batch_size"):
        train_language_model(model, corpus.tokenizer, corpus.train[:3], steps=1, batch_size=8, device="cpu")


def test_fast_path_reorder_that_changes_the_row_count():
    """Keeping more or fewer rows than there are (not beam search's case) copies whole caches on both paths."""
    model = _gpt(seed=5, vocab=19)
    ids, valid = _pad_batch([[4, 9, 1], [7], [2, 2, 5]])
    fast, general = StepDecoder(model, fast=True), StepDecoder(model, fast=False)
    fast.prefill(ids, valid), general.prefill(ids, valid)
    for index in (torch.tensor([2, 0, 0, 1, 2]), torch.tensor([4, 1])):
        fast.reorder(index)
        general.reorder(index)
        token = torch.arange(len(index)) + 3
        torch.testing.assert_close(fast.step(token), general.step(token), atol=2e-5, rtol=0)


# ------------------------------------------------------------------- dropping ended rows from the batch

def _drop_models():
    """Small models with peaked distributions (2-D weights scaled up), so that rows end at many different steps."""
    from simbook.models.gpt import GPT
    from simbook.recurrent import RecurrentConfig, RecurrentLM, RecurrentStepDecoder

    torch.manual_seed(3)
    gpt = GPT(TransformerConfig(vocab_size=30, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                                max_position=96, dropout=0.0, pre_norm=True)).eval()
    bert = _bert_lm(vocab=30, max_position=96)
    torch.manual_seed(3)
    rnn = {cell: RecurrentLM(RecurrentConfig(vocab_size=30, hidden_size=24, num_layers=2, cell=cell)).eval()
           for cell in ("tanh", "lstm")}
    with torch.no_grad():
        for model in [gpt, bert, *rnn.values()]:
            for weight in model.parameters():
                if weight.dim() == 2:
                    weight.mul_(6.0)
    return {"gpt packed": lambda eps: StepDecoder(gpt, self_terminating=eps),
            "gpt general": lambda eps: StepDecoder(gpt, self_terminating=eps, fast=False),
            "bert causal": lambda eps: StepDecoder(bert, self_terminating=eps),
            "tanh": lambda eps: RecurrentStepDecoder(rnn["tanh"], self_terminating=eps),
            "lstm": lambda eps: RecurrentStepDecoder(rnn["lstm"], self_terminating=eps)}


DROP_MODELS = _drop_models()
DROP_PROMPTS = _pad_batch([list(range(1 + i % 7, 3 + i % 7 + i % 5)) for i in range(24)])


def _varied_eos(decode):
    """The end token for which `decode(eos)` (a DecodingOutput) ends its rows at the most different steps."""
    return max(range(1, 30), key=lambda eos: len(set(decode(eos).lengths.tolist())))


@functools.cache
def _greedy_eos(name, eps):
    make, (ids, valid) = DROP_MODELS[name], DROP_PROMPTS
    return _varied_eos(lambda eos: greedy(make(eps), ids, valid, max_new_tokens=60, eos_id=eos))


@functools.cache
def _beam_eos(name, eps):
    make, (ids, valid) = DROP_MODELS[name], DROP_PROMPTS
    return _varied_eos(lambda eos: beam_search(make(eps), ids, valid, beam_width=2, max_new_tokens=50, eos_id=eos))


class _CountingRows:
    """Wraps a step decoder and records the batch size of every step."""

    def __init__(self, decoder):
        self.decoder, self.rows = decoder, []

    def __getattr__(self, name):
        return getattr(self.decoder, name)

    def step(self, next_ids, **kw):
        self.rows.append(len(next_ids))
        return self.decoder.step(next_ids, **kw)


@pytest.mark.parametrize("eps", [None, 0.05], ids=["vanilla", "ST"])
@pytest.mark.parametrize("name", list(DROP_MODELS))
def test_drop_finished_gives_the_same_greedy_tokens_with_fewer_rows(name, eps):
    make, (ids, valid) = DROP_MODELS[name], DROP_PROMPTS
    eos = _greedy_eos(name, eps)
    for min_new in (0, 3):
        plain = greedy(make(eps), ids, valid, max_new_tokens=60, eos_id=eos, min_new_tokens=min_new)
        counting = _CountingRows(make(eps))
        dropped = greedy(counting, ids, valid, max_new_tokens=60, eos_id=eos, min_new_tokens=min_new,
                         drop_finished=True)
        assert dropped.to_lists() == plain.to_lists()
        assert dropped.finished.tolist() == plain.finished.tolist()
        assert dropped.lengths.tolist() == plain.lengths.tolist()
        assert counting.rows == sorted(counting.rows, reverse=True)
        ended_early = int((plain.lengths < plain.lengths.max()).sum())
        shrank = bool(counting.rows) and min(counting.rows) < len(ids)
        assert shrank == (ended_early >= 6)                   # a quarter of the rows ended before the last step


@pytest.mark.parametrize("early_stopping, length_penalty", [(False, 1.0), (True, 1.0), ("never", 1.0),
                                                            (False, 0.0), (False, 2.0), ("never", 2.0)])
@pytest.mark.parametrize("eps", [None, 0.05], ids=["vanilla", "ST"])
@pytest.mark.parametrize("name", ["gpt packed", "gpt general", "bert causal", "lstm"])
def test_drop_finished_gives_the_same_beams(name, eps, early_stopping, length_penalty):
    make, (ids, valid) = DROP_MODELS[name], DROP_PROMPTS
    eos = _beam_eos(name, eps)
    for width, num_return, min_new in [(2, 1, 0), (3, 3, 2)]:
        options = dict(beam_width=width, max_new_tokens=50, eos_id=eos, num_return=num_return,
                       early_stopping=early_stopping, length_penalty=length_penalty, min_new_tokens=min_new)
        plain = beam_search(make(eps), ids, valid, **options)
        counting = _CountingRows(make(eps))
        dropped = beam_search(counting, ids, valid, **options, drop_finished=True)
        assert dropped.to_lists() == plain.to_lists()
        assert dropped.lengths.tolist() == plain.lengths.tolist()
        assert dropped.finished.tolist() == plain.finished.tolist()
        torch.testing.assert_close(dropped.scores, plain.scores, rtol=0, atol=1e-5)   # smaller batch: rounding
        assert counting.rows == sorted(counting.rows, reverse=True) and len(counting.rows) <= 49


@pytest.mark.parametrize("name", ["bert causal", "lstm"])
def test_drop_finished_shrinks_the_beam_batch(name):
    make, (ids, valid) = DROP_MODELS[name], DROP_PROMPTS
    eos = _beam_eos(name, None)
    counting = _CountingRows(make(None))
    out = beam_search(counting, ids, valid, beam_width=2, max_new_tokens=50, eos_id=eos, drop_finished=True)
    assert len(set(out.lengths.tolist())) >= 4
    assert counting.rows[0] == 48 and min(counting.rows) <= 36


def test_sample_with_drop_finished_keeps_each_rows_distribution():
    """FixedLM's eos has probability q at every step, so a continuation's length is geometric with mean 1/q,
    whichever rows share its batch. 4,000 rows: the sample mean is within 4 standard errors of 1/q."""
    class NoCache:                                                # FixedLM reads no history: nothing to reorder
        def reorder(self, index):
            pass

    model = FixedLM(eos_logit=math.log(49 / 9), other_logit=0.0)    # eos against 49 tokens of logit 0: q = 0.1
    model.new_cache = NoCache
    probs = torch.softmax(model.logits, -1)
    q = float(probs[0])
    assert abs(q - 0.1) < 1e-6
    ids = torch.full((4000, 2), 7)
    g = torch.Generator().manual_seed(0)
    out = sample(StepDecoder(model), ids, max_new_tokens=150, eos_id=0, generator=g, drop_finished=True)
    assert out.finished.float().mean() > 0.999
    lengths = out.lengths[out.finished].double()
    sd = math.sqrt((1 - q) / q ** 2 / len(lengths))
    assert abs(float(lengths.mean()) - 1 / q) < 4 * sd, (float(lengths.mean()), 1 / q)
    top1 = sample(StepDecoder(_bert_lm()), _ids(12, 4, seed=5), max_new_tokens=30, eos_id=9, top_k=1,
                  drop_finished=True)
    assert top1.to_lists() == greedy(StepDecoder(_bert_lm()), _ids(12, 4, seed=5), max_new_tokens=30,
                                     eos_id=9).to_lists()


@pytest.mark.parametrize("decode", [greedy, sample, beam_search])
def test_drop_finished_must_be_a_bool(bert, decode):
    extra = {"beam_width": 2} if decode is beam_search else {}
    with pytest.raises(TypeError, match="drop_finished must be True or False"):
        decode(StepDecoder(bert), _ids(2, 3), max_new_tokens=4, eos_id=3, drop_finished=1, **extra)

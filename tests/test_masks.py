"""Tests of simbook.attention.masks: each mask against a brute-force construction from its definition, attention
against independent formulas and nn.MultiheadAttention, argument checks, and what the masks promise a model."""
import functools
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from simbook.attention.masks import (attention_reference, bidirectional_mask, causal_mask, check_mask,
                                     permutation_mask, softmax_attention, to_additive_bias, to_blocked_mask,
                                     unilm_mask)
from simbook.models.transformer import MultiHeadAttention, TransformerConfig, TransformerStack

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ----------------------------------------------------------------------------------------------- strategies

@st.composite
def padded_batches(draw, max_batch=3, max_len=8):
    """Per row: a real length, a source length within it; padded to a common T. Returns python lists."""
    B = draw(st.integers(1, max_batch))
    T = draw(st.integers(1, max_len))
    lengths = [draw(st.integers(1, T)) for _ in range(B)]
    sources = [draw(st.integers(1, n)) for n in lengths]
    # the ids on padding are arbitrary: the masks must ignore them
    pad_ids = [[draw(st.integers(0, 2)) for _ in range(T - n)] for n in lengths]
    return T, lengths, sources, pad_ids


def _tensors(T, lengths, sources, pad_ids):
    valid = torch.tensor([[t < n for t in range(T)] for n in lengths], dtype=torch.bool)
    seg = torch.tensor([[0] * s + [1] * (n - s) + p for n, s, p in zip(lengths, sources, pad_ids)],
                       dtype=torch.long)
    return seg, valid


# ----------------------------------------------------------------------------------------------- brute force

def brute_unilm_row(i, T, n, s):
    """Keys query i may see: a source query (i < s) sees the source; a target query (s <= i < n) sees the source and
    the target up to itself. Padding keys (j >= n) are never seen. None for a padded query."""
    if i >= n:
        return None
    if i < s:
        return [j < s for j in range(T)]
    return [j < s or (s <= j <= i) for j in range(T)]


def brute_causal_row(i, T, n):
    return None if i >= n else [j <= i and j < n for j in range(T)]


def brute_bidirectional_row(i, T, n):
    return None if i >= n else [j < n for j in range(T)]


def _check_against(mask, rows, lengths):
    """Rows of real queries must equal the brute force; padded query rows must see at least one key and only real
    keys (their output is discarded, but an empty row would make the softmax 0/0)."""
    B, T, T2 = mask.shape
    assert T == T2 and mask.dtype == torch.bool
    for b, n in enumerate(lengths):
        for i in range(T):
            want = rows(b, i)
            got = mask[b, i].tolist()
            if want is None:
                assert any(got) and not any(got[n:]), (b, i, got)
            else:
                assert got == want, (b, i, got, want)
    assert mask.any(dim=-1).all()  # no empty row anywhere


@SETTINGS
@given(padded_batches())
def test_unilm_mask_matches_definition(batch):
    T, lengths, sources, pad_ids = batch
    seg, valid = _tensors(*batch)
    mask = unilm_mask(seg, valid)
    _check_against(mask, lambda b, i: brute_unilm_row(i, T, lengths[b], sources[b]), lengths)
    check_mask(mask, batch=len(lengths), tq=T, tk=T)


@SETTINGS
@given(st.integers(1, 9), st.data())
def test_unilm_mask_without_valid_means_no_padding(T, data):
    s = data.draw(st.integers(1, T))
    seg = torch.tensor([[0] * s + [1] * (T - s)])
    mask = unilm_mask(seg)
    _check_against(mask, lambda b, i: brute_unilm_row(i, T, T, s), [T])
    assert torch.equal(mask, unilm_mask(seg, torch.ones(1, T, dtype=torch.bool)))


@SETTINGS
@given(padded_batches())
def test_causal_and_bidirectional_match_definition(batch):
    T, lengths, _, _ = batch
    _, valid = _tensors(*batch)
    _check_against(causal_mask(valid), lambda b, i: brute_causal_row(i, T, lengths[b]), lengths)
    _check_against(bidirectional_mask(valid), lambda b, i: brute_bidirectional_row(i, T, lengths[b]), lengths)


@SETTINGS
@given(padded_batches())
def test_unilm_extremes(batch):
    """All-source rows are bidirectional; a one-token source is causal on the real tokens."""
    T, lengths, _, _ = batch
    _, valid = _tensors(*batch)
    all_source = torch.zeros(len(lengths), T, dtype=torch.long)
    real = valid[:, :, None] & valid[:, None, :]  # compare on real query x real key
    assert torch.equal(unilm_mask(all_source, valid) & real, bidirectional_mask(valid) & real)
    one_source = torch.ones(len(lengths), T, dtype=torch.long)
    one_source[:, 0] = 0
    assert torch.equal(unilm_mask(one_source, valid) & real, causal_mask(valid) & real)


def brute_permutation(order):
    B, T = len(order), len(order[0])
    out = []
    for b in range(B):
        rank = [None] * T
        for step, position in enumerate(order[b]):
            rank[position] = step
        out.append([[rank[j] <= rank[i] for j in range(T)] for i in range(T)])
    return torch.tensor(out, dtype=torch.bool)


@SETTINGS
@given(st.integers(1, 3).flatmap(lambda B: st.integers(1, 8).flatmap(
    lambda T: st.lists(st.permutations(list(range(T))), min_size=B, max_size=B))))
def test_permutation_mask_matches_ranks(orders):
    mask = permutation_mask(torch.tensor(orders))
    assert torch.equal(mask, brute_permutation(orders))
    assert mask.any(dim=-1).all()
    # the first position visited sees only itself; the last sees everything
    for b, order in enumerate(orders):
        first, last = order[0], order[-1]
        assert mask[b, first].sum() == 1 and mask[b, first, first]
        assert mask[b, last].all()


@pytest.mark.parametrize("T", [1, 2, 5, 9])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_permutation_identity_is_causal(T, dtype):
    order = torch.arange(T, dtype=dtype).expand(2, T)
    assert torch.equal(permutation_mask(order), causal_mask(torch.ones(2, T, dtype=torch.bool)))


def test_permutation_reversed_is_anticausal():
    T = 5
    mask = permutation_mask(torch.arange(T - 1, -1, -1)[None])
    assert torch.equal(mask[0], torch.ones(T, T, dtype=torch.bool).triu())


def test_unilm_example_by_hand():
    seg = torch.tensor([[0, 0, 1, 1, 0]])
    valid = torch.tensor([[True, True, True, True, False]])
    want = torch.tensor([[1, 1, 0, 0, 0],
                         [1, 1, 0, 0, 0],
                         [1, 1, 1, 0, 0],
                         [1, 1, 1, 1, 0]], dtype=torch.bool)
    assert torch.equal(unilm_mask(seg, valid)[0, :4], want)


# ----------------------------------------------------------------------------------------------- attention

def _random_mask(g, B, Tq, Tk, p=0.5):
    mask = torch.rand(B, Tq, Tk, generator=g) < p
    keep = torch.randint(0, Tk, (B, Tq), generator=g)  # at least one allowed key per row
    mask[torch.arange(B)[:, None], torch.arange(Tq)[None], keep] = True
    return mask


def explicit_attention(q, k, v, mask, scale):
    """Written out independently: per (b, h, i), weights w_j ∝ exp(scale q_i·k_j) over allowed j."""
    scores = torch.einsum("bhid,bhjd->bhij", q, k) * scale
    if mask is not None:
        scores = torch.where(mask[:, None], scores, torch.full_like(scores, -math.inf))
    scores = scores - scores.amax(dim=-1, keepdim=True)
    w = scores.exp()
    w = w / w.sum(dim=-1, keepdim=True)
    return torch.einsum("bhij,bhjd->bhid", w, v)


@SETTINGS
@given(B=st.integers(1, 3), H=st.integers(1, 3), Tq=st.integers(1, 6), Tk=st.integers(1, 6), D=st.integers(1, 8),
       Dv=st.integers(1, 5), seed=st.integers(0, 2**31 - 1), use_mask=st.booleans(),
       scale=st.one_of(st.none(), st.floats(0.05, 3.0)))
def test_softmax_attention_equals_reference_and_explicit(B, H, Tq, Tk, D, Dv, seed, use_mask, scale):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Tq, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, H, Tk, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, H, Tk, Dv, generator=g, dtype=torch.float64)
    mask = _random_mask(g, B, Tq, Tk) if use_mask else None
    out = softmax_attention(q, k, v, mask, scale=scale)
    ref = attention_reference(q, k, v, mask, scale=scale)
    explicit = explicit_attention(q, k, v, mask, 1 / math.sqrt(D) if scale is None else scale)
    assert out.shape == (B, H, Tq, Dv) and out.dtype == torch.float64
    torch.testing.assert_close(out, explicit, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ref, explicit, rtol=1e-10, atol=1e-10)


def test_attention_masked_keys_have_no_influence():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 4, 3, generator=g, dtype=torch.float64) for _ in range(3))
    mask = _random_mask(g, 2, 4, 4)
    v2 = v.clone()
    k2 = k.clone()
    blocked_everywhere = ~mask.any(dim=1)               # [B, Tk] keys no query may see
    blocked_everywhere[:, 0] = False
    v2[blocked_everywhere[:, None, :, None].expand_as(v2)] = 1e6
    k2[blocked_everywhere[:, None, :, None].expand_as(k2)] = -1e6
    for fn in (softmax_attention, attention_reference):
        torch.testing.assert_close(fn(q, k, v, mask), fn(q, k2, v2, mask), rtol=1e-12, atol=1e-12)


def test_single_allowed_key_copies_its_value():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 3, 4, generator=g, dtype=torch.float64) for _ in range(3))
    mask = torch.zeros(1, 3, 3, dtype=torch.bool)
    mask[0, torch.arange(3), torch.tensor([2, 0, 1])] = True
    out = softmax_attention(q, k, v, mask)
    torch.testing.assert_close(out, v[:, :, [2, 0, 1]])


def test_mask_broadcasts_over_batch_and_query():
    g = torch.Generator().manual_seed(2)
    q = torch.randn(3, 2, 4, 5, generator=g, dtype=torch.float64)
    k, v = (torch.randn(3, 2, 6, 5, generator=g, dtype=torch.float64) for _ in range(2))
    row = _random_mask(g, 1, 1, 6)
    for fn in (softmax_attention, attention_reference):
        torch.testing.assert_close(fn(q, k, v, row), fn(q, k, v, row.expand(3, 4, 6).contiguous()))


def test_to_additive_bias():
    mask = torch.tensor([[[True, False], [True, True]]])
    bias = to_additive_bias(mask, dtype=torch.float64)
    assert bias.dtype == torch.float64
    assert bias.tolist() == [[[0.0, -math.inf], [0.0, 0.0]]]
    assert to_additive_bias(mask).dtype == torch.float32


def test_to_blocked_mask_layout():
    g = torch.Generator().manual_seed(3)
    mask = _random_mask(g, 3, 4, 5)
    blocked = to_blocked_mask(mask, num_heads=2)
    assert blocked.shape == (6, 4, 5)
    for b in range(3):
        for h in range(2):
            assert torch.equal(blocked[b * 2 + h], ~mask[b])  # torch's layout: index b * H + h


@pytest.mark.parametrize("H", [1, 2, 4])
def test_to_blocked_mask_with_torch_multihead_attention(H):
    C, B, T = 8, 3, 6
    torch.manual_seed(0)
    config = TransformerConfig(vocab_size=10, hidden_size=C, num_heads=H, dropout=0.0)
    ours = MultiHeadAttention(config).double().eval()
    theirs = torch.nn.MultiheadAttention(C, H, batch_first=True, dtype=torch.float64).eval()
    with torch.no_grad():
        theirs.in_proj_weight.copy_(torch.cat([ours.query.weight, ours.key.weight, ours.value.weight]))
        theirs.in_proj_bias.copy_(torch.cat([ours.query.bias, ours.key.bias, ours.value.bias]))
        theirs.out_proj.weight.copy_(ours.output.weight)
        theirs.out_proj.bias.copy_(ours.output.bias)
    g = torch.Generator().manual_seed(H)
    x = torch.randn(B, T, C, generator=g, dtype=torch.float64)
    valid = torch.tensor([[True] * T, [True] * 4 + [False] * 2, [True] * 2 + [False] * 4])
    seg = torch.tensor([[0, 0, 0, 1, 1, 1], [0, 1, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0]])
    for mask in (unilm_mask(seg, valid), causal_mask(valid), _random_mask(g, B, T, T)):
        with torch.no_grad():
            want, _ = theirs(x, x, x, attn_mask=to_blocked_mask(mask, H), need_weights=False)
            got = ours(x, mask)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------------------------------------- bad input

def _qkv(B=2, H=2, T=3, D=4, dtype=torch.float64):
    return (torch.randn(B, H, T, D, dtype=dtype) for _ in range(3))


@pytest.mark.parametrize("fn", [softmax_attention, attention_reference])
def test_attention_refuses_bad_masks(fn):
    q, k, v = _qkv()
    good = torch.ones(2, 3, 3, dtype=torch.bool)
    with pytest.raises(TypeError, match="mask must have a bool dtype"):
        fn(q, k, v, good.double())
    with pytest.raises(TypeError, match="mask must have a bool dtype"):
        fn(q, k, v, good.long())
    with pytest.raises(ValueError, match="mask must have 3 dimensions"):
        fn(q, k, v, good[0])
    with pytest.raises(ValueError, match="mask must have 3 dimensions"):
        fn(q, k, v, good[:, None])                       # [B, 1, Tq, Tk] is not the convention
    with pytest.raises(ValueError, match="query size 4"):
        fn(q, k, v, torch.ones(2, 4, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="4 keys, expected 3"):
        fn(q, k, v, torch.ones(2, 3, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="batch size 3"):
        fn(q, k, v, torch.ones(3, 3, 3, dtype=torch.bool))
    empty_row = good.clone()
    empty_row[1, 2] = False
    with pytest.raises(ValueError, match="no key it may attend to"):
        fn(q, k, v, empty_row)


@pytest.mark.parametrize("fn", [softmax_attention, attention_reference])
def test_attention_refuses_bad_qkv(fn):
    q, k, v = _qkv()
    with pytest.raises(TypeError, match="share a dtype"):
        fn(q, k.float(), v)
    with pytest.raises(TypeError, match="share a dtype"):
        fn(q, k, v.float())
    with pytest.raises(TypeError, match="q must have a float dtype"):
        fn(q.long(), k, v)
    with pytest.raises(TypeError, match="q must be a torch.Tensor"):
        fn(q.tolist(), k, v)
    with pytest.raises(ValueError, match="k has size 5 on axis 3"):
        fn(q, torch.randn(2, 2, 3, 5, dtype=torch.float64), v)
    with pytest.raises(ValueError, match="v has size 4 on axis 2"):
        fn(q, k, torch.randn(2, 2, 4, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="k has size 3 on axis 1"):
        fn(q, torch.randn(2, 3, 3, 4, dtype=torch.float64), v)
    with pytest.raises(ValueError, match="q must have 4 dimensions"):
        fn(q[0], k, v)
    with pytest.raises(ValueError, match="q is empty"):
        fn(q[:0], k[:0], v[:0])


def test_check_mask_messages_name_argument():
    with pytest.raises(TypeError, match="scores_mask"):
        check_mask(torch.ones(1, 2, 2), "scores_mask")
    with pytest.raises(ValueError, match="scores_mask"):
        check_mask(torch.zeros(1, 2, 2, dtype=torch.bool), "scores_mask")


@pytest.mark.parametrize("valid", [
    [[True, False, True]],        # a hole: not right-padded
    [[False, True, True]],        # left padding
    [[True, True], [False, False]],  # an empty sequence
])
def test_masks_refuse_badly_padded_valid(valid):
    valid = torch.tensor(valid)
    seg = torch.zeros_like(valid, dtype=torch.long)
    for build in (causal_mask, bidirectional_mask, lambda v: unilm_mask(seg, v)):
        with pytest.raises(ValueError, match="valid"):
            build(valid)


def test_masks_refuse_bad_valid_types_and_shapes():
    for build in (causal_mask, bidirectional_mask):
        with pytest.raises(TypeError, match="valid must have a bool dtype"):
            build(torch.ones(2, 3, dtype=torch.long))
        with pytest.raises(ValueError, match="valid must have 2 dimensions"):
            build(torch.ones(3, dtype=torch.bool))
        with pytest.raises(ValueError, match="valid is empty"):
            build(torch.ones(0, 3, dtype=torch.bool))
    with pytest.raises(TypeError, match="valid must have a bool dtype"):
        unilm_mask(torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3))
    with pytest.raises(ValueError, match="valid has size 4 on axis 1"):
        unilm_mask(torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 4, dtype=torch.bool))


@pytest.mark.parametrize("seg,match", [
    ([[0, 1, 0]], "contiguous"),
    ([[0, 0, 1, 1, 0, 1]], "contiguous"),
    ([[1, 1, 1]], "start with the source"),
    ([[1, 0, 0]], "start with the source"),
    ([[0, 2, 2]], "0 .source. or 1 .target."),
    ([[0, -1, 1]], "0 .source. or 1 .target."),
    ([[0, 0, 1], [0, 1, 0]], "contiguous"),       # one bad row in a batch is enough
])
def test_unilm_refuses_bad_segment_ids(seg, match):
    with pytest.raises(ValueError, match=match):
        unilm_mask(torch.tensor(seg))


def test_unilm_segment_id_dtype_and_shape():
    with pytest.raises(TypeError, match="segment_ids must have a int dtype"):
        unilm_mask(torch.tensor([[0.0, 1.0]]))
    with pytest.raises(TypeError, match="segment_ids must have a int dtype"):
        unilm_mask(torch.tensor([[False, True]]))
    with pytest.raises(ValueError, match="segment_ids must have 2 dimensions"):
        unilm_mask(torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="segment_ids is empty"):
        unilm_mask(torch.zeros(0, 3, dtype=torch.long))
    # int32 and uint8 ids are ints too
    want = unilm_mask(torch.tensor([[0, 0, 1]]))
    assert torch.equal(unilm_mask(torch.tensor([[0, 0, 1]], dtype=torch.int32)), want)
    assert torch.equal(unilm_mask(torch.tensor([[0, 0, 1]], dtype=torch.uint8)), want)


def test_unilm_ignores_ids_on_padding():
    valid = torch.tensor([[True, True, False, False]])
    a = unilm_mask(torch.tensor([[0, 1, 0, 7]]), valid)
    b = unilm_mask(torch.tensor([[0, 1, 1, 1]]), valid)
    assert torch.equal(a, b)


@pytest.mark.parametrize("order", [[[0, 0, 2]], [[0, 1, 3]], [[-1, 0, 1]], [[0, 1, 2], [2, 2, 0]]])
def test_permutation_refuses_non_permutations(order):
    with pytest.raises(ValueError, match="permutation"):
        permutation_mask(torch.tensor(order))


def test_permutation_refuses_bad_types_and_shapes():
    with pytest.raises(TypeError, match="order must have a int dtype"):
        permutation_mask(torch.tensor([[0.0, 1.0]]))
    with pytest.raises(ValueError, match="order must have 2 dimensions"):
        permutation_mask(torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="order is empty"):
        permutation_mask(torch.zeros(0, 3, dtype=torch.long))


# ----------------------------------------------------------------------------------------------- what a model sees

@functools.cache
def _stack(pre_norm: bool) -> TransformerStack:
    torch.manual_seed(11)
    config = TransformerConfig(vocab_size=10, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32,
                               pre_norm=pre_norm)  # default dropout 0.1: eval() must switch it off
    return TransformerStack(config).double().eval()


INVARIANCE = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@INVARIANCE
@given(padded_batches(max_batch=2, max_len=7), st.booleans(), st.integers(0, 2**31 - 1))
def test_unilm_target_never_changes_source_outputs(batch, pre_norm, seed):
    T, lengths, sources, _ = batch
    seg, valid = _tensors(*batch)
    model = _stack(pre_norm)
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(len(lengths), T, 16, generator=g, dtype=torch.float64)
    is_source = (seg == 0) & valid
    changed = h + torch.randn(h.shape, generator=g, dtype=torch.float64) * 3 * (~is_source)[..., None]
    mask = unilm_mask(seg, valid)
    with torch.no_grad():
        a, b = model(h, mask), model(changed, mask)
    torch.testing.assert_close(a[is_source], b[is_source], rtol=0, atol=1e-12)
    # the test can see a change: every real target position moved
    is_target = (seg == 1) & valid
    if is_target.any():
        assert ((a - b)[is_target].abs().amax(dim=-1) > 1e-6).all()


@INVARIANCE
@given(st.integers(1, 7).flatmap(lambda T: st.tuples(st.just(T), st.integers(0, T - 1))), st.booleans(),
       st.integers(0, 2**31 - 1))
def test_causal_future_never_changes_past_outputs(T_t, pre_norm, seed):
    T, t = T_t
    model = _stack(pre_norm)
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(2, T, 16, generator=g, dtype=torch.float64)
    changed = h.clone()
    changed[:, t] += torch.randn(2, 16, generator=g, dtype=torch.float64) * 3
    mask = causal_mask(torch.ones(2, T, dtype=torch.bool))
    with torch.no_grad():
        a, b = model(h, mask), model(changed, mask)
    torch.testing.assert_close(a[:, :t], b[:, :t], rtol=0, atol=1e-12)
    assert ((a[:, t] - b[:, t]).abs().amax(dim=-1) > 1e-6).all()


def test_bidirectional_every_position_sees_every_change():
    model = _stack(False)
    g = torch.Generator().manual_seed(5)
    h = torch.randn(1, 5, 16, generator=g, dtype=torch.float64)
    changed = h.clone()
    changed[:, 4] += 3.0
    mask = bidirectional_mask(torch.ones(1, 5, dtype=torch.bool))
    with torch.no_grad():
        diff = (model(h, mask) - model(changed, mask)).abs().amax(dim=-1)
    assert (diff > 1e-6).all()

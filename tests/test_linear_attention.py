"""Tests of simbook.attention.linear: every variant against the quadratic formula it equals (float64), the causal op's
four evaluations, prefill -> decode, the Triton kernel in the interpreter (values and gradients against float64),
dispatch, bad input, linear attention inside the model core (recurrent decoding == parallel form), and the
kernels on a CUDA GPU (marked `cuda`, skipped without one)."""
import math
import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from simbook.attention import linear as L
from simbook.attention.linear import (FEATURE_MAPS, LinearAttentionCache, LinearAttentionOp, LinearAttentionState,
                                      LinformerAttention, SparseAttention, causal_linear_attention,
                                      causal_linear_attention_cumsum, causal_linear_attention_quadratic,
                                      causal_linear_attention_recurrent, cos_feature_map, cos_similarity,
                                      efficient_attention, efficient_attention_weights, elu_feature_map,
                                      exp_similarity, linear_attention, linear_attention_step, similarity_attention,
                                      softmax_feature_map, sparse_attention, sparse_mask)
from simbook.attention.masks import attention_reference, bidirectional_mask, causal_mask, unilm_mask
from simbook.decoding import StepDecoder, beam_search, greedy
from simbook.models.gpt import GPT
from simbook.models.transformer import KVCache, TransformerConfig, TransformerStack

INTERPRETER = L.HAS_TRITON and os.environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(not INTERPRETER, reason="needs triton with TRITON_INTERPRET=1")


def rand(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def qkv(B=2, H=3, T=9, D=6, Dv=5, seed=0, dtype=torch.float64):
    return rand(B, H, T, D, seed=seed, dtype=dtype), rand(B, H, T, D, seed=seed + 1, dtype=dtype), \
        rand(B, H, T, Dv, seed=seed + 2, dtype=dtype)


def elu_sim(q, k):
    return (F.elu(q) + 1) @ (F.elu(k) + 1).transpose(-1, -2)


# ------------------------------------------------------------------------------------------------ feature maps

def test_elu_feature_map_is_positive_in_bfloat16_where_the_naive_form_is_zero():
    x = torch.tensor([-30.0, -12.0, -9.0, -8.0, -1.0, 0.0, 2.0], dtype=torch.bfloat16)
    assert (F.elu(x)[:4] + 1 == 0).all()                              # fla issue #1261
    phi = elu_feature_map(x)
    assert phi.dtype == torch.bfloat16 and (phi > 0).all()
    assert torch.allclose(phi.double(), F.elu(x.double()) + 1, rtol=1e-2, atol=0)
    x64 = rand(50, seed=3) * 5
    assert torch.allclose(elu_feature_map(x64), F.elu(x64) + 1, atol=1e-15)


def test_elu_feature_map_gradient():
    x = rand(20, seed=1).requires_grad_()
    elu_feature_map(x).sum().backward()
    assert torch.allclose(x.grad, torch.where(x > 0, 1.0, x.exp()).detach())


def test_cos_and_softmax_feature_maps():
    q, k = rand(2, 5, 4, seed=1), rand(2, 7, 4, seed=2)
    sim = cos_feature_map(q) @ cos_feature_map(k).transpose(-1, -2)
    assert torch.allclose(sim, cos_similarity(q, k), atol=1e-12)
    assert sim.min() >= 0 and sim.max() <= 2 + 1e-12
    assert torch.equal(cos_feature_map(torch.zeros(3, 4))[:, 0], torch.ones(3))
    assert torch.allclose(softmax_feature_map(q).sum(-1), torch.ones(2, 5, dtype=torch.float64))


# ------------------------------------------------------------------------------------ quadratic == linear forms

def test_exp_similarity_is_softmax_attention():
    q, k, v = qkv()
    mask = causal_mask(torch.ones(2, 9, dtype=torch.bool))
    assert torch.allclose(similarity_attention(q, k, v, exp_similarity, mask), attention_reference(q, k, v, mask, scale=1.0))


@settings(max_examples=25, deadline=None)
@given(T=st.integers(1, 12), Tq=st.integers(1, 6), D=st.integers(1, 7), fmap=st.sampled_from(sorted(FEATURE_MAPS)),
       seed=st.integers(0, 10_000))
def test_linear_attention_equals_its_quadratic_form(T, Tq, D, fmap, seed):
    q, k, v = rand(2, 2, Tq, D, seed=seed), rand(2, 2, T, D, seed=seed + 1), rand(2, 2, T, 3, seed=seed + 2)
    phi = FEATURE_MAPS[fmap]
    valid = torch.ones(2, T, dtype=torch.bool)
    valid[1, T // 2 + 1:] = False
    mask = valid[:, None, :].expand(2, Tq, T)
    sim = lambda a, b: phi(a) @ phi(b).transpose(-1, -2)
    fast = linear_attention(phi(q), phi(k), v, eps=1e-9, key_valid=valid)      # 1+cos: a row of zeros when D = 1
    assert torch.allclose(fast, similarity_attention(q, k, v, sim, mask, eps=1e-9), atol=1e-10)


def test_padded_keys_have_no_effect():
    q, k, v = qkv(T=8)
    valid = torch.tensor([[True] * 8, [True] * 5 + [False] * 3])
    k2, v2 = k.clone(), v.clone()
    k2[1, :, 5:] += 100
    v2[1, :, 5:] -= 50
    for fn in (lambda k, v: linear_attention(elu_feature_map(q), elu_feature_map(k), v, key_valid=valid),
               lambda k, v: efficient_attention(q, k, v, valid)):
        assert torch.allclose(fn(k, v), fn(k2, v2), atol=1e-12)


def test_cos_closed_form_of_the_post():
    q, k, v = qkv(T=11)
    qh, kh = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    closed = (v.sum(-2, keepdim=True) + qh @ (kh.transpose(-1, -2) @ v)) / (11 + qh @ kh.sum(-2)[..., None])
    assert torch.allclose(linear_attention(cos_feature_map(q), cos_feature_map(k), v, eps=0.0), closed, atol=1e-12)
    assert torch.allclose(similarity_attention(q, k, v, cos_similarity), closed, atol=1e-12)


def test_efficient_attention_rows_sum_to_one_and_match_their_weights():
    q, k, v = qkv(T=10)
    valid = torch.tensor([[True] * 10, [True] * 4 + [False] * 6])
    w = efficient_attention_weights(q, k, valid)
    assert torch.allclose(w.sum(-1), torch.ones(2, 3, 10, dtype=torch.float64), atol=1e-12)
    assert (w[1, :, :, 4:] == 0).all()
    assert torch.allclose(efficient_attention(q, k, v, valid), w @ v, atol=1e-12)
    with pytest.raises(ValueError, match="without any valid key"):
        efficient_attention(q, k, v, torch.zeros(2, 10, dtype=torch.bool))


def test_similarity_attention_refuses_negative_similarities():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="negative entries"):
        similarity_attention(q, k, v, lambda a, b: a @ b.transpose(-1, -2))
    with pytest.raises(TypeError, match="similarity must be a function"):
        similarity_attention(q, k, v, 3)


# -------------------------------------------------------------------------------------------- Linformer, sparse

def test_linformer_is_softmax_over_projected_keys():
    torch.manual_seed(0)
    q, k, v = qkv(T=7)
    lin = LinformerAttention(12, 4).double()
    valid = torch.tensor([[True] * 7, [True] * 3 + [False] * 4])
    kp, vp = k * valid[:, None, :, None], v * valid[:, None, :, None]
    ref = attention_reference(q, lin.E[:, :7] @ kp, lin.F[:, :7] @ vp)
    assert torch.allclose(lin(q, k, v, valid), ref, atol=1e-12)
    with pytest.raises(ValueError, match="at most 12 positions"):
        lin(*qkv(T=13))
    eye = LinformerAttention(7, 7).double()
    with torch.no_grad():
        eye.E.copy_(torch.eye(7)), eye.F.copy_(torch.eye(7))
    assert torch.allclose(eye(q, k, v), attention_reference(q, k, v), atol=1e-12)


def test_linformer_is_not_causal():
    torch.manual_seed(0)
    q, k, v = qkv(T=7)
    lin = LinformerAttention(7, 3).double()
    v2 = v.clone()
    v2[:, :, -1] += 1
    assert not torch.allclose(lin(q, k, v)[:, :, 0], lin(q, k, v2)[:, :, 0])


@settings(max_examples=30, deadline=None)
@given(T=st.integers(1, 30), window=st.integers(1, 8), stride=st.integers(1, 9), causal=st.booleans(),
       seed=st.integers(0, 1000))
def test_sparse_attention_equals_dense_masked_softmax(T, window, stride, causal, seed):
    q, k, v = qkv(B=1, H=2, T=T, D=4, Dv=3, seed=seed)
    mask = sparse_mask(T, window, stride, causal=causal)
    i, j = torch.arange(T)[:, None], torch.arange(T)[None]
    expected = (((i - j).abs() < window) | ((i - j) % stride == 0)) & ((j <= i) | (not causal))
    assert torch.equal(mask[0], expected)
    assert torch.allclose(SparseAttention(window, stride, causal)(q, k, v), attention_reference(q, k, v, mask), atol=1e-12)


def test_sparse_refuses_bad_sizes():
    with pytest.raises(ValueError, match="window"):
        sparse_mask(5, 0, 2)
    with pytest.raises(TypeError, match="stride"):
        SparseAttention(2, 1.5)


# ---------------------------------------------------------------------------------------- causal, four ways

@settings(max_examples=25, deadline=None)
@given(T=st.integers(1, 40), chunk=st.integers(1, 20), D=st.integers(1, 6), normalize=st.booleans(),
       with_state=st.booleans(), seed=st.integers(0, 1000))
def test_causal_evaluations_agree(T, chunk, D, normalize, with_state, seed):
    q, k, v = qkv(B=1, H=2, T=T, D=D, Dv=3, seed=seed)
    fq, fk = elu_feature_map(q), elu_feature_map(k)
    state0 = LinearAttentionState(rand(1, 2, D, 3, seed=seed + 5).abs(), rand(1, 2, D, seed=seed + 6).abs()) \
        if with_state else None
    ref = causal_linear_attention_quadratic(fq, fk, v, normalize=normalize, initial_state=state0)
    out, state = causal_linear_attention(fq, fk, v, normalize=normalize, initial_state=state0, return_state=True,
                                         chunk_size=chunk)
    rec, rec_state = causal_linear_attention_recurrent(fq, fk, v, normalize=normalize, initial_state=state0)
    assert torch.allclose(out, ref, atol=1e-10) and torch.allclose(rec, ref, atol=1e-10)
    assert torch.allclose(state.S, rec_state.S, atol=1e-10) and torch.allclose(state.z, rec_state.z, atol=1e-10)
    if not with_state:
        assert torch.allclose(causal_linear_attention_cumsum(fq, fk, v, normalize=normalize), ref, atol=1e-10)


def test_causal_equals_masked_similarity_average():
    q, k, v = qkv(T=12)
    mask = causal_mask(torch.ones(2, 12, dtype=torch.bool))
    out = causal_linear_attention(elu_feature_map(q), elu_feature_map(k), v, eps=0.0)
    assert torch.allclose(out, similarity_attention(q, k, v, elu_sim, mask), atol=1e-12)


def test_prefill_then_decode_matches_one_pass():
    q, k, v = qkv(T=20)
    fq, fk = elu_feature_map(q), elu_feature_map(k)
    full = causal_linear_attention(fq, fk, v)
    head, state = causal_linear_attention(fq[:, :, :13], fk[:, :, :13], v[:, :, :13], return_state=True, chunk_size=4)
    outs = [head]
    for t in range(13, 20):
        out, state = linear_attention_step(fq[:, :, t], fk[:, :, t], v[:, :, t], state)
        outs.append(out[:, :, None])
    assert torch.allclose(torch.cat(outs, 2), full, atol=1e-12)
    tail = causal_linear_attention(fq[:, :, 13:], fk[:, :, 13:], v[:, :, 13:], initial_state=
                                   causal_linear_attention(fq[:, :, :13], fk[:, :, :13], v[:, :, :13], return_state=True)[1])
    assert torch.allclose(tail, full[:, :, 13:], atol=1e-12)


def test_torch_path_gradcheck():
    q, k, v = (x[:1, :1, :6, :3].clone().requires_grad_() for x in qkv())
    S0 = rand(1, 1, 3, 3, seed=9).abs().requires_grad_()
    z0 = rand(1, 1, 3, seed=10).abs().requires_grad_()

    def f(q, k, v, S0, z0):
        out, st = causal_linear_attention(elu_feature_map(q), elu_feature_map(k), v, chunk_size=4, return_state=True,
                                          initial_state=LinearAttentionState(S0, z0))
        return out, st.S, st.z
    assert torch.autograd.gradcheck(f, (q, k, v, S0, z0))


def test_fp32_state_for_half_inputs_and_output_dtype():
    q, k, v = qkv(T=30, dtype=torch.bfloat16)
    out, state = causal_linear_attention(elu_feature_map(q), elu_feature_map(k), v, return_state=True)
    assert out.dtype == torch.bfloat16 and state.S.dtype == torch.float32
    ref = causal_linear_attention_quadratic(elu_feature_map(q.double()), elu_feature_map(k.double()), v.double())
    assert torch.allclose(out.double(), ref, atol=3e-2)


def test_non_contiguous_inputs():
    q, k, v = qkv(T=10)
    qt, kt, vt = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
    assert not qt.is_contiguous()
    fq, fk = elu_feature_map(q), elu_feature_map(k)
    assert torch.allclose(causal_linear_attention(elu_feature_map(qt), elu_feature_map(kt), vt),
                          causal_linear_attention(fq, fk, v), atol=1e-12)


# ------------------------------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("args, kwargs, err, match", [
    ((rand(2, 3, 5, 4), rand(2, 3, 6, 4), rand(2, 3, 5, 2)), {}, ValueError, "k has size 6 on axis 2"),
    ((rand(2, 3, 5, 4), rand(2, 3, 5, 3), rand(2, 3, 5, 2)), {}, ValueError, "k has size 3 on axis 3"),
    ((rand(2, 3, 5, 4), rand(2, 3, 5, 4), rand(2, 3, 5, 2, dtype=torch.float32)), {}, TypeError, "share a dtype"),
    ((rand(2, 3, 5), rand(2, 3, 5), rand(2, 3, 5)), {}, ValueError, "must have 4 dimensions"),
    ((rand(2, 3, 0, 4), rand(2, 3, 0, 4), rand(2, 3, 0, 2)), {}, ValueError, "empty"),
    ((torch.ones(1, 1, 3, 2).long(), torch.ones(1, 1, 3, 2), torch.ones(1, 1, 3, 2)), {}, TypeError, "float dtype"),
    ((torch.full((1, 1, 3, 2), float("nan")), torch.ones(1, 1, 3, 2), torch.ones(1, 1, 3, 2)), {}, ValueError, "NaN"),
    ((torch.ones(1, 1, 3, 2), torch.ones(1, 1, 3, 2), torch.ones(1, 1, 3, 2)), {"eps": -1}, ValueError, "eps"),
    ((torch.ones(1, 1, 3, 2), torch.ones(1, 1, 3, 2), torch.ones(1, 1, 3, 2)), {"chunk_size": 0}, ValueError, "chunk_size"),
    ((torch.ones(1, 1, 3, 2), torch.ones(1, 1, 3, 2), torch.ones(1, 1, 3, 2)), {"backend": "cuda"}, ValueError, "backend"),
    ((torch.ones(1, 1, 3, 2), torch.ones(1, 1, 3, 2), torch.ones(1, 1, 3, 2)),
     {"initial_state": LinearAttentionState.zeros(1, 1, 3, 2)}, ValueError, "state.S has shape"),
    ((torch.ones(1, 1, 3, 2), torch.ones(1, 1, 3, 2), torch.ones(1, 1, 3, 2)),
     {"initial_state": (1, 2)}, TypeError, "LinearAttentionState"),
])
def test_causal_op_rejects_bad_input(args, kwargs, err, match):
    with pytest.raises(err, match=match):
        causal_linear_attention(*args, **kwargs)


def test_devices_must_match():
    q = torch.ones(1, 1, 3, 2)
    with pytest.raises(ValueError, match="one device"):
        causal_linear_attention(q, q, q.to("meta"))


def test_state_checks():
    with pytest.raises(TypeError, match="float32"):
        LinearAttentionState(torch.zeros(1, 1, 2, 2, dtype=torch.float16), torch.zeros(1, 1, 2, dtype=torch.float16))
    with pytest.raises(ValueError, match="state.z has size 3"):
        LinearAttentionState(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 3))
    with pytest.raises(ValueError, match="q must have 3 dimensions"):
        linear_attention_step(torch.ones(1, 1, 1, 2), torch.ones(1, 1, 2), torch.ones(1, 1, 2))


# ---------------------------------------------------------------------------------------- Triton (interpreter)

def _triton_case(B, H, T, D, Dv, normalize, with_state, final_grad, chunk=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    raw = [torch.randn(B, H, T, D, generator=g), torch.randn(B, H, T, D, generator=g), torch.randn(B, H, T, Dv, generator=g),
           torch.rand(B, H, D, Dv, generator=g), torch.rand(B, H, D, generator=g)]
    weights = [torch.randn(B, H, T, Dv, generator=g), torch.randn(B, H, D, Dv, generator=g), torch.randn(B, H, D, generator=g)]
    results = {}
    for name in ("triton", "reference"):
        leaves = [x.detach().to(dtype if name == "triton" else torch.float64).clone().requires_grad_() for x in raw]
        fq, fk, v = elu_feature_map(leaves[0]), elu_feature_map(leaves[1]), leaves[2]
        S0, z0 = leaves[3], leaves[4]
        state0 = None
        if with_state:
            state0 = LinearAttentionState(S0.float(), z0.float()) if name == "triton" else LinearAttentionState(S0, z0)
        if name == "triton":
            out, st_ = causal_linear_attention(fq, fk, v, normalize=normalize, initial_state=state0, return_state=True,
                                               chunk_size=chunk, backend="triton")
            S, z = st_.S, st_.z
        else:
            out = causal_linear_attention_quadratic(fq, fk, v, normalize=normalize, initial_state=state0)
            S, z = fk.transpose(-1, -2) @ v, fk.sum(-2)
            if with_state:
                S, z = S + S0, z + z0
        loss = (out.double() * weights[0].double()).sum()
        if final_grad:
            loss = loss + (S.double() * weights[1].double()).sum() + (z.double() * weights[2].double()).sum()
        loss.backward()
        grads = [x.grad for x in leaves[:3]] + ([leaves[3].grad, leaves[4].grad] if with_state else [])
        results[name] = [out.detach(), S.detach(), z.detach()] + grads
    return results


def _relative_errors(results):
    # relative to the tensor's scale, or to 1 (inputs are O(1)): a gradient that cancels to ~0 (dq of a
    # normalised output over one position) is compared absolutely; no path at all (None) means zero
    errors = []
    for a, b in zip(results["triton"], results["reference"]):
        a = torch.zeros_like(b if b is not None else a, dtype=torch.float64) if a is None else a.double()
        b = torch.zeros_like(a) if b is None else b.double()
        errors.append(((a - b).abs().max() / b.abs().max().clamp_min(1.0)).item())
    return errors


@needs_interpreter
@pytest.mark.parametrize("B,H,T,D,Dv,normalize,with_state,final_grad", [
    (1, 2, 37, 8, 12, True, True, True),          # several chunks, ragged last chunk, everything on
    (2, 1, 16, 4, 4, False, False, False),        # one full chunk, plain output only
    (1, 1, 1, 20, 5, True, False, True),          # one position; head sizes that are not powers of 2
    (1, 1, 33, 16, 16, False, True, False),       # initial state without final-state gradient
])
def test_triton_kernel_matches_float64_values_and_gradients(B, H, T, D, Dv, normalize, with_state, final_grad):
    errors = _relative_errors(_triton_case(B, H, T, D, Dv, normalize, with_state, final_grad))
    assert max(errors) < 1e-5, errors


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_kernel_half_inputs(dtype):
    errors = _relative_errors(_triton_case(1, 1, 20, 8, 8, True, True, True, dtype=dtype))
    assert max(errors) < 3e-2, errors


@needs_interpreter
def test_triton_kernel_equals_torch_path_in_float32():
    q, k, v = qkv(T=40, dtype=torch.float32)
    fq, fk = elu_feature_map(q), elu_feature_map(k)
    a, sa = causal_linear_attention(fq, fk, v, return_state=True, chunk_size=16, backend="triton")
    b, sb = causal_linear_attention(fq, fk, v, return_state=True, chunk_size=16, backend="torch")
    assert torch.allclose(a, b, atol=1e-5) and torch.allclose(sa.S, sb.S, atol=1e-4)


@needs_interpreter
@pytest.mark.parametrize("kwargs, dtype, D, match", [
    ({}, torch.float64, 4, "float32, float16 or bfloat16"),
    ({}, torch.float32, 130, "head sizes up to 128"),
    ({"chunk_size": 24}, torch.float32, 4, r"chunk_size in \(16, 32, 64\)"),
    ({"chunk_size": 8}, torch.float32, 4, "a power of 2 >= 16"),
    ({"chunk_size": 128}, torch.bfloat16, 4, "chunk_size in"),
    ({"feature_map": "relu"}, torch.float32, 4, "feature_map must be one of"),
])
def test_triton_backend_refuses_what_it_cannot_run(kwargs, dtype, D, match):
    q = torch.rand(1, 1, 3, D, dtype=dtype)
    with pytest.raises(ValueError, match=match):
        causal_linear_attention(q, q, q, backend="triton", **kwargs)


def _fused_case(T, Dk, Dv, chunk, dtype, normalize=True, seed=0):
    """Raw projections through the fused elu+1 kernels vs float64 features: output, state, 5 gradients."""
    g = torch.Generator().manual_seed(seed)
    raw = [torch.randn(2, 1, T, Dk, generator=g), torch.randn(2, 1, T, Dk, generator=g),
           torch.randn(2, 1, T, Dv, generator=g), torch.rand(2, 1, Dk, Dv, generator=g), torch.rand(2, 1, Dk, generator=g)]
    weights = [torch.randn(2, 1, T, Dv, generator=g), torch.randn(2, 1, Dk, Dv, generator=g),
               torch.randn(2, 1, Dk, generator=g)]
    results = {}
    for name in ("triton", "reference"):
        x = [r.detach().to(dtype if name == "triton" else torch.float64).clone().requires_grad_() for r in raw]
        state0 = LinearAttentionState(x[3].float() if name == "triton" else x[3], x[4].float() if name == "triton" else x[4])
        if name == "triton":
            out, st = causal_linear_attention(x[0], x[1], x[2], normalize=normalize, initial_state=state0,
                                              return_state=True, chunk_size=chunk, backend="triton", feature_map="elu")
            S, z = st.S, st.z
        else:
            fq, fk = elu_feature_map(x[0]), elu_feature_map(x[1])
            out = causal_linear_attention_quadratic(fq, fk, x[2], normalize=normalize, initial_state=state0)
            S, z = x[3] + fk.transpose(-1, -2) @ x[2], x[4] + fk.sum(-2)
        loss = sum((a.double() * w.double()).sum() for a, w in zip((out, S, z), weights))
        loss.backward()
        results[name] = [out.detach(), S.detach(), z.detach()] + [y.grad for y in x]
    return _relative_errors(results)


@needs_interpreter
@pytest.mark.parametrize("T,Dk,Dv,chunk,dtype,normalize,tol", [
    (50, 40, 72, 16, torch.float32, True, 1e-5),     # head sizes over two blocks of the kernels' loops, ragged
    (33, 72, 40, 32, torch.float32, False, 1e-5),
    (70, 16, 24, 32, torch.bfloat16, True, 3e-2),    # odd length, bfloat16
    (21, 24, 16, 16, torch.float16, True, 3e-2),
    (65, 8, 8, 64, torch.float32, True, 1e-5),       # one position past the default chunk
])
def test_fused_feature_map_kernels_match_float64(T, Dk, Dv, chunk, dtype, normalize, tol):
    errors = _fused_case(T, Dk, Dv, chunk, dtype, normalize)
    assert max(errors) < tol, errors


@needs_interpreter
def test_fused_feature_map_equals_the_torch_path():
    q, k, v = qkv(T=23, dtype=torch.float32)
    a, sa = causal_linear_attention(q, k, v, return_state=True, backend="triton", feature_map="elu")
    b, sb = causal_linear_attention(q, k, v, return_state=True, backend="torch", feature_map="elu")
    c = causal_linear_attention(elu_feature_map(q), elu_feature_map(k), v, backend="torch")
    assert torch.allclose(a, b, atol=1e-5) and torch.allclose(b, c) and torch.allclose(sa.S, sb.S, atol=1e-4)


@needs_interpreter
@pytest.mark.parametrize("normalize", [True, False])
def test_step_kernel_is_one_position_of_the_op(normalize):
    q, k, v = qkv(T=6, dtype=torch.float32)
    fq, fk = elu_feature_map(q), elu_feature_map(k)
    _, state = causal_linear_attention(fq[:, :, :5], fk[:, :, :5], v[:, :, :5], return_state=True, backend="torch")
    with torch.no_grad():                                     # T = 1 without gradients: the fused step kernel
        out, new = causal_linear_attention(q[:, :, 5:], k[:, :, 5:], v[:, :, 5:], initial_state=state,
                                           return_state=True, backend="triton", feature_map="elu",
                                           normalize=normalize)
    ref, ref_state = linear_attention_step(fq[:, :, 5], fk[:, :, 5], v[:, :, 5], state, normalize=normalize)
    assert out.shape == (2, 3, 1, 5)
    assert torch.allclose(out[:, :, 0], ref, atol=1e-5)
    assert torch.allclose(new.S, ref_state.S, atol=1e-5) and torch.allclose(new.z, ref_state.z, atol=1e-5)


def test_cpu_auto_backend_is_torch_and_triton_without_interpreter_is_refused(monkeypatch):
    q = torch.rand(1, 1, 3, 4)
    with monkeypatch.context() as m:
        m.setattr(L, "HAS_TRITON", False)
        with pytest.raises(ValueError, match="triton is not installed"):
            causal_linear_attention(q, q, q, backend="triton")
        causal_linear_attention(q, q, q)                                     # auto: PyTorch path, no error
    if L.HAS_TRITON:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
            causal_linear_attention(q, q, q, backend="triton")


def test_module_imports_without_triton():
    code = ("import sys; sys.modules['triton'] = None; sys.modules['triton.language'] = None\n"
            "import torch; from simbook.attention import linear as L\n"
            "assert not L.HAS_TRITON\n"
            "q = torch.rand(1, 1, 5, 3); print(L.causal_linear_attention(q, q, q).shape)\n"
            "from simbook.models.transformer import TransformerConfig; TransformerConfig(vocab_size=5, attention='linear')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, PYTHONPATH=os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", "")))
    assert result.returncode == 0, result.stderr
    assert "torch.Size([1, 1, 5, 3])" in result.stdout


# ------------------------------------------------------------------------------------------ in the model core

def _stack(attention, seed=0):
    torch.manual_seed(seed)
    cfg = TransformerConfig(vocab_size=11, hidden_size=16, num_layers=2, num_heads=4, intermediate_size=24,
                            dropout=0.0, attention=attention)
    return TransformerStack(cfg).double().eval()


@pytest.mark.parametrize("attention", ["linear", "linear_cos"])
def test_stack_cached_equals_uncached(attention):
    stack = _stack(attention)
    h = rand(2, 9, 16, seed=4)
    valid = torch.tensor([[True] * 9, [True] * 6 + [False] * 3])
    full = stack(h, causal_mask(valid))
    cache = KVCache(2)
    outs = [stack(h[:, :4], causal_mask(valid[:, :4]), cache)]
    for t in range(4, 9):
        outs.append(stack(h[:, t:t + 1], valid[:, None, :t + 1], cache))
    assert len(cache) == 9 and cache.keys == [None, None]
    step = torch.cat(outs, 1)
    assert torch.allclose(step[0], full[0], atol=1e-10)
    assert torch.allclose(step[1, :6], full[1, :6], atol=1e-10)                # real positions of the padded row


def test_op_matches_the_linear_functions_for_both_mask_structures():
    op = LinearAttentionOp("elu")
    q, k, v = qkv(T=7)
    valid = torch.tensor([[True] * 7, [True] * 4 + [False] * 3])
    fq, fk = elu_feature_map(q), elu_feature_map(k)
    assert torch.allclose(op(q, k, v, bidirectional_mask(valid)), linear_attention(fq, fk, v, key_valid=valid), atol=1e-12)
    causal = op(q, k, v, causal_mask(valid))
    ref = causal_linear_attention_quadratic(fq, fk * valid[:, None, :, None], v)
    assert torch.allclose(causal, ref, atol=1e-12)
    assert torch.allclose(op(q, k, v), linear_attention(fq, fk, v), atol=1e-12)       # no mask: every key


def test_op_refuses_masks_it_cannot_compute():
    op = LinearAttentionOp("elu")
    q, k, v = qkv(T=6)
    segments = torch.tensor([[0, 0, 0, 1, 1, 1]] * 2)
    with pytest.raises(ValueError, match="neither"):
        op(q, k, v, unilm_mask(segments))
    with pytest.raises(ValueError, match="neither"):
        op(q, k, v, sparse_mask(6, 2, 3).expand(2, 6, 6))
    with pytest.raises(ValueError, match="feature_map must be one of"):
        LinearAttentionOp("relu")
    _, entry = op.with_state(q, k, v, causal_mask(torch.ones(2, 6, dtype=torch.bool)), None)
    bad = torch.ones(2, 1, 7, dtype=torch.bool)
    bad[0, 0, 2] = False
    with pytest.raises(ValueError, match="past columns disagree"):
        op.with_state(q[:, :, :1], k[:, :, :1], v[:, :, :1], bad, entry)
    with pytest.raises(ValueError, match="batch size 2"):
        op.with_state(q[:1, :, :1], k[:1, :, :1], v[:1, :, :1], None, entry)


def _gpt(attention, seed=0):
    torch.manual_seed(seed)
    cfg = TransformerConfig(vocab_size=13, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32,
                            max_position=32, dropout=0.0, pre_norm=True, attention=attention)
    return GPT(cfg).double().eval()


@pytest.mark.parametrize("attention", ["linear", "linear_cos"])
def test_greedy_with_recurrent_state_equals_parallel_form(attention):
    model = _gpt(attention)
    prompts = torch.tensor([[1, 5, 7, 2], [1, 3, 0, 0], [1, 9, 4, 0]])
    valid = prompts != 0
    out = greedy(StepDecoder(model), prompts, valid, max_new_tokens=8).tokens
    for row in range(3):
        ids = prompts[row, :int(valid[row].sum())][None]
        for t in range(8):
            nxt = model(ids)[0, -1].argmax()
            assert nxt == out[row, t]
            ids = torch.cat([ids, nxt.view(1, 1)], 1)


def test_beam_search_reorders_the_recurrent_state():
    model = _gpt("linear")
    prompts = torch.tensor([[1, 5, 7], [1, 3, 2]])
    out = beam_search(StepDecoder(model), prompts, beam_width=3, max_new_tokens=5, eos_id=12)
    decoder = StepDecoder(model)
    decoder.prefill(prompts)
    before = [s.memory.S.clone() for s in decoder.cache.states]
    decoder.reorder(torch.tensor([1, 1, 0]))
    assert torch.equal(decoder.cache.states[0].memory.S, before[0][[1, 1, 0]])
    assert out.tokens.shape[0] == 2


def test_linear_gpt_trains():
    model = _gpt("linear").float().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randint(1, 13, (8, 12), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(30):
        loss = F.cross_entropy(model(x)[:, :-1].reshape(-1, 13), x[:, 1:].reshape(-1))
        opt.zero_grad(), loss.backward(), opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


# ------------------------------------------------------------------------------------------ on a CUDA GPU
# Run by benchmarks/gpu.sh (pytest -m cuda); skipped where CUDA is absent.

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available() or not L.HAS_TRITON, reason="needs CUDA and triton")


def _cuda_inputs(B, H, T, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, T, D, generator=g).to("cuda", dtype) for _ in range(3)]


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-2), (torch.bfloat16, 5e-2), (torch.float16, 3e-2)])
@pytest.mark.parametrize("T,D", [(1000, 64), (257, 128), (77, 40)])
def test_cuda_kernels_match_torch_and_float64_forward_and_backward(T, D, dtype, tol):
    q, k, v = _cuda_inputs(2, 4, T, D, dtype)
    grads = {}
    for name in ("triton", "torch", "float64"):
        x = [t.double() if name == "float64" else t.clone() for t in (q, k, v)]
        x = [t.requires_grad_() for t in x]
        backend = "torch" if name != "triton" else "triton"
        out, st = causal_linear_attention(*x, feature_map="elu", backend=backend, return_state=True)
        loss = out.double().square().sum() + st.S.double().sum()
        loss.backward()
        grads[name] = [out.detach().double(), st.S.double()] + [t.grad.double() for t in x]
    for a, b in zip(grads["triton"], grads["float64"]):
        assert ((a - b).abs().max() / b.abs().max()).item() < tol
    for a, b in zip(grads["torch"], grads["float64"]):
        assert ((a - b).abs().max() / b.abs().max()).item() < tol


@pytest.mark.cuda
@needs_cuda
def test_cuda_auto_backend_uses_the_kernels_and_decodes_with_the_step_kernel():
    q, k, v = _cuda_inputs(1, 2, 33, 64, torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                        # no fallback warning on CUDA
        out, state = causal_linear_attention(q[:, :, :32], k[:, :, :32], v[:, :, :32], feature_map="elu",
                                             return_state=True)
        with torch.no_grad():
            step, _ = causal_linear_attention(q[:, :, 32:], k[:, :, 32:], v[:, :, 32:], feature_map="elu",
                                              initial_state=state, return_state=True)
    full = causal_linear_attention(q, k, v, feature_map="elu", backend="torch")
    assert ((step[:, :, 0].float() - full[:, :, 32].float()).abs().max() / full.float().abs().max()).item() < 3e-2

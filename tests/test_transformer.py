"""Tests of simbook.models.transformer: configuration, KV cache, incremental decoding, dropout, gradients, and the
layers against torch's own nn.TransformerEncoder with the same weights."""
import json

import pytest
import torch
import torch.nn.functional as F

from simbook.attention.masks import bidirectional_mask, causal_mask, to_blocked_mask, unilm_mask
from simbook.models.transformer import (ACTIVATIONS, ATTENTION_OPS, KVCache, MultiHeadAttention, TransformerConfig,
                                        TransformerStack)

C = 16


def _config(**kw):
    base = dict(vocab_size=11, hidden_size=C, num_layers=2, num_heads=4, intermediate_size=24, dropout=0.1)
    base.update(kw)
    return TransformerConfig(**base)


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    return TransformerStack(_config(**kw)).double().eval()


def _h(B, T, seed=0):
    return torch.randn(B, T, C, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ----------------------------------------------------------------------------------------------- configuration

def test_config_defaults_and_head_dim():
    cfg = TransformerConfig(vocab_size=100)
    assert (cfg.hidden_size, cfg.num_heads, cfg.head_dim) == (128, 4, 32)
    assert TransformerConfig(vocab_size=5, hidden_size=12, num_heads=3).head_dim == 4
    assert cfg.pre_norm is False and cfg.attention in ATTENTION_OPS and cfg.activation in ACTIVATIONS


@pytest.mark.parametrize("field", ["vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                                   "max_position", "type_vocab_size"])
@pytest.mark.parametrize("value,err", [(0, ValueError), (-3, ValueError), (2.0, TypeError), (True, TypeError),
                                       ("8", TypeError)])
def test_config_refuses_bad_sizes(field, value, err):
    kw = dict(vocab_size=10, hidden_size=8, num_heads=2)
    kw[field] = value
    with pytest.raises(err, match=field):
        TransformerConfig(**kw)


@pytest.mark.parametrize("hidden,heads", [(10, 4), (128, 3), (7, 2)])
def test_config_hidden_must_divide_by_heads(hidden, heads):
    with pytest.raises(ValueError, match=rf"hidden_size \({hidden}\) must be divisible by num_heads \({heads}\)"):
        TransformerConfig(vocab_size=10, hidden_size=hidden, num_heads=heads)


@pytest.mark.parametrize("dropout", [-0.1, 1.0, 1.5, float("nan")])
def test_config_refuses_bad_dropout(dropout):
    with pytest.raises(ValueError, match="dropout"):
        TransformerConfig(vocab_size=10, dropout=dropout)


def test_config_accepts_dropout_bounds():
    TransformerConfig(vocab_size=10, dropout=0.0)
    TransformerConfig(vocab_size=10, dropout=0.99)


@pytest.mark.parametrize("kw,match", [({"activation": "swish"}, "activation must be one of"),
                                      ({"activation": "GELU"}, "activation must be one of"),
                                      ({"attention": "performer"}, "attention must be one of"),
                                      ({"attention": ""}, "attention must be one of")])
def test_config_refuses_unknown_names(kw, match):
    with pytest.raises(ValueError, match=match):
        TransformerConfig(vocab_size=10, **kw)


def test_config_dict_round_trip_through_json():
    cfg = TransformerConfig(vocab_size=21128, hidden_size=48, num_layers=3, num_heads=6, intermediate_size=96,
                            max_position=64, type_vocab_size=3, dropout=0.25, layer_norm_eps=1e-6,
                            activation="relu", pre_norm=True)
    d = cfg.to_dict()
    assert d["vocab_size"] == 21128 and d["pre_norm"] is True and d["activation"] == "relu"
    assert "head_dim" not in d                               # derived, not stored
    back = TransformerConfig.from_dict(json.loads(json.dumps(d)))
    assert back == cfg and back is not cfg
    assert TransformerConfig.from_dict({"vocab_size": 5}) == TransformerConfig(vocab_size=5)


def test_config_from_dict_lists_unknown_keys():
    with pytest.raises(ValueError, match="unknown config keys: hidden_dim, n_layer"):
        TransformerConfig.from_dict({"vocab_size": 5, "n_layer": 2, "hidden_dim": 4})


def test_config_from_dict_still_validates():
    with pytest.raises(ValueError, match="divisible"):
        TransformerConfig.from_dict({"vocab_size": 5, "hidden_size": 10, "num_heads": 3})


# ----------------------------------------------------------------------------------------------- KV cache

def test_kv_cache_update_len_and_contents():
    cache = KVCache(2)
    assert len(cache) == 0
    g = torch.Generator().manual_seed(0)
    k1, v1 = torch.randn(2, 3, 4, 5, generator=g), torch.randn(2, 3, 4, 6, generator=g)
    k2, v2 = torch.randn(2, 3, 1, 5, generator=g), torch.randn(2, 3, 1, 6, generator=g)
    k, v = cache.update(0, k1, v1)
    assert torch.equal(k, k1) and torch.equal(v, v1)
    cache.update(1, k1, v1)
    assert len(cache) == 4
    k, v = cache.update(0, k2, v2)
    assert k.shape == (2, 3, 5, 5) and v.shape == (2, 3, 5, 6)
    assert torch.equal(k[:, :, :4], k1) and torch.equal(k[:, :, 4:], k2)
    assert torch.equal(v[:, :, :4], v1) and torch.equal(v[:, :, 4:], v2)
    cache.update(1, k2, v2)
    assert len(cache) == 5
    assert torch.equal(cache.keys[0], cache.keys[1])      # the layers hold their own, equal here by construction


def test_kv_cache_reorder_keeps_rows():
    cache = KVCache(2)
    ks = [torch.arange(4.0).view(4, 1, 1, 1).expand(4, 2, 3, 2) + 10 * layer for layer in range(2)]
    for layer in range(2):
        cache.update(layer, ks[layer], -ks[layer])
    index = torch.tensor([3, 3, 0])
    cache.reorder(index)
    assert len(cache) == 3
    for layer in range(2):
        assert cache.keys[layer].shape[0] == 3
        assert cache.keys[layer][:, 0, 0, 0].tolist() == [3 + 10 * layer, 3 + 10 * layer, 10 * layer]
        assert torch.equal(cache.values[layer], -cache.keys[layer])


def test_kv_cache_reorder_before_any_update_and_bad_index():
    cache = KVCache(3)
    cache.reorder(torch.tensor([0, 1]))
    assert len(cache) == 0 and cache.keys == [None] * 3
    with pytest.raises(TypeError, match="index"):
        cache.reorder(torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="index"):
        cache.reorder(torch.tensor([[0, 1]]))


@pytest.mark.parametrize("n,err", [(0, ValueError), (-1, ValueError), (1.0, TypeError), (True, TypeError)])
def test_kv_cache_refuses_bad_layer_count(n, err):
    with pytest.raises(err, match="num_layers"):
        KVCache(n)


# ----------------------------------------------------------------------------------------------- incremental decoding

def _incremental(model, h, mask, chunks):
    """Run `h` through `model` chunk by chunk with a KV cache; chunk c gets rows [start, end) of the full mask,
    restricted to the keys seen so far."""
    cache = KVCache(len(model.layers))
    outs, start = [], 0
    for size in chunks:
        end = start + size
        with torch.no_grad():
            outs.append(model(h[:, start:end], mask[:, start:end, :end].contiguous(), cache))
        assert len(cache) == end
        start = end
    assert start == h.shape[1]
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("pre_norm", [False, True])
@pytest.mark.parametrize("chunks", [[1] * 7, [3, 1, 1, 1, 1], [4, 3], [7]])
def test_cached_causal_equals_full(pre_norm, chunks):
    model = _model(pre_norm=pre_norm)
    h = _h(2, 7)
    mask = causal_mask(torch.ones(2, 7, dtype=torch.bool))
    with torch.no_grad():
        full = model(h, mask)
    torch.testing.assert_close(_incremental(model, h, mask, chunks), full, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("pre_norm", [False, True])
@pytest.mark.parametrize("source", [1, 3, 5])
def test_cached_unilm_prefill_then_steps_equals_full(pre_norm, source):
    T = 8
    model = _model(seed=1, pre_norm=pre_norm)
    h = _h(3, T, seed=2)
    seg = torch.tensor([[0] * source + [1] * (T - source)] * 3)
    mask = unilm_mask(seg)
    with torch.no_grad():
        full = model(h, mask)
    # prefill the whole source at once (it sees itself bidirectionally), then one target token at a time
    got = _incremental(model, h, mask, [source] + [1] * (T - source))
    torch.testing.assert_close(got, full, rtol=1e-10, atol=1e-10)


def test_cached_incremental_differs_when_mask_is_wrong():
    """The equivalence above is not vacuous: decoding a UniLM source causally gives different outputs."""
    model = _model(seed=1)
    h = _h(1, 6)
    seg = torch.tensor([[0, 0, 0, 1, 1, 1]])
    with torch.no_grad():
        full = model(h, unilm_mask(seg))
    wrong = _incremental(model, h, causal_mask(torch.ones(1, 6, dtype=torch.bool)), [1] * 6)
    assert (full[:, :2] - wrong[:, :2]).abs().max() > 1e-6


def test_cached_beam_reorder_matches_fresh_run():
    """After reorder(index), continuing the cache equals running the reordered prefixes from scratch."""
    model = _model(seed=3)
    h = _h(3, 5, seed=4)
    mask = causal_mask(torch.ones(3, 5, dtype=torch.bool))
    cache = KVCache(len(model.layers))
    with torch.no_grad():
        model(h[:, :4], mask[:, :4, :4], cache)
        index = torch.tensor([2, 0, 2])
        cache.reorder(index)
        step = model(h[index, 4:5], mask[:, 4:5, :5], cache)
        full = model(h[index], mask)
    torch.testing.assert_close(step, full[:, 4:5], rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------------------------------------- against torch

def _copy_into_torch(ours: TransformerStack, cfg: TransformerConfig, activation):
    layer = torch.nn.TransformerEncoderLayer(cfg.hidden_size, cfg.num_heads, cfg.intermediate_size, dropout=0.0,
                                             activation=activation, layer_norm_eps=cfg.layer_norm_eps,
                                             batch_first=True, norm_first=cfg.pre_norm, dtype=torch.float64)
    final = torch.nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=torch.float64) if cfg.pre_norm else None
    theirs = torch.nn.TransformerEncoder(layer, cfg.num_layers, norm=final, enable_nested_tensor=False).eval()
    with torch.no_grad():
        for a, b in zip(ours.layers, theirs.layers):
            att = a.attention
            b.self_attn.in_proj_weight.copy_(torch.cat([att.query.weight, att.key.weight, att.value.weight]))
            b.self_attn.in_proj_bias.copy_(torch.cat([att.query.bias, att.key.bias, att.value.bias]))
            b.self_attn.out_proj.weight.copy_(att.output.weight)
            b.self_attn.out_proj.bias.copy_(att.output.bias)
            b.linear1.load_state_dict(a.ffn.up.state_dict())
            b.linear2.load_state_dict(a.ffn.down.state_dict())
            b.norm1.load_state_dict(a.attention_norm.state_dict())
            b.norm2.load_state_dict(a.ffn_norm.state_dict())
        if cfg.pre_norm:
            theirs.norm.load_state_dict(ours.final_norm.state_dict())
    return theirs


@pytest.mark.parametrize("pre_norm", [False, True])
@pytest.mark.parametrize("activation", ["gelu", "relu", "gelu_tanh"])
def test_stack_equals_torch_transformer_encoder(pre_norm, activation):
    cfg = _config(pre_norm=pre_norm, activation=activation, layer_norm_eps=1e-5)
    ours = _model(seed=5, pre_norm=pre_norm, activation=activation, layer_norm_eps=1e-5)
    # perturb the layer norms away from (1, 0) so that they matter
    with torch.no_grad():
        for p in ours.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    torch_act = {"gelu": F.gelu, "relu": F.relu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}[activation]
    theirs = _copy_into_torch(ours, cfg, torch_act)
    h = _h(2, 6, seed=6)
    valid = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    for mask in (unilm_mask(torch.tensor([[0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 0, 0]]), valid), causal_mask(valid),
                 bidirectional_mask(valid)):
        with torch.no_grad():
            got = ours(h, mask)
            want = theirs(h, mask=to_blocked_mask(mask, cfg.num_heads))
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_stack_without_mask_is_bidirectional():
    model = _model()
    h = _h(2, 5)
    with torch.no_grad():
        torch.testing.assert_close(model(h), model(h, bidirectional_mask(torch.ones(2, 5, dtype=torch.bool))))


def test_stack_refuses_bad_input():
    model = _model()
    with pytest.raises(ValueError, match=r"h has size 8 on axis 2, expected 16"):
        model(torch.zeros(1, 3, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="h must have 3 dimensions"):
        model(torch.zeros(3, C, dtype=torch.float64))
    with pytest.raises(TypeError, match="h must have a float dtype"):
        model(torch.zeros(1, 3, C, dtype=torch.long))
    with pytest.raises(ValueError, match="keys"):
        model(_h(1, 3), torch.ones(1, 3, 4, dtype=torch.bool))


def test_final_norm_only_with_pre_norm():
    assert _model(pre_norm=False).final_norm is None
    assert isinstance(_model(pre_norm=True).final_norm, torch.nn.LayerNorm)
    assert len(_model(num_layers=3).layers) == 3


# ----------------------------------------------------------------------------------------------- dropout, gradients

@pytest.mark.parametrize("pre_norm", [False, True])
def test_dropout_off_in_eval_on_in_train(pre_norm):
    model = _model(dropout=0.3, pre_norm=pre_norm)
    h = _h(2, 6)
    mask = causal_mask(torch.ones(2, 6, dtype=torch.bool))
    with torch.no_grad():
        a, b = model(h, mask), model(h, mask)
        assert torch.equal(a, b)
        model.train()
        torch.manual_seed(0)
        c = model(h, mask)
        d = model(h, mask)
        torch.manual_seed(0)
        c_again = model(h, mask)
        model.eval()
        e = model(h, mask)
    assert not torch.allclose(c, d) and not torch.allclose(c, a)
    assert torch.equal(c, c_again)                         # train-mode randomness follows torch's seed
    assert torch.equal(a, e)


def test_attention_dropout_follows_training_flag():
    torch.manual_seed(0)
    att = MultiHeadAttention(_config(dropout=0.5)).double()
    x = _h(2, 5)
    att.eval()
    with torch.no_grad():
        assert torch.equal(att(x), att(x))
        att.train()
        assert not torch.allclose(att(x), att(x))


def test_zero_dropout_train_equals_eval():
    model = _model(dropout=0.0)
    h = _h(2, 4)
    with torch.no_grad():
        e = model(h)
        model.train()
        t = model(h)
    torch.testing.assert_close(e, t, rtol=0, atol=0)


@pytest.mark.parametrize("pre_norm", [False, True])
def test_gradient_reaches_every_parameter(pre_norm):
    model = _model(pre_norm=pre_norm).train()
    h = _h(2, 5).requires_grad_(True)
    seg = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]])
    valid = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    out = model(h, unilm_mask(seg, valid))
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    (out * weights).sum().backward()                       # not out.sum(): a final LayerNorm would zero that
    names = [n for n, _ in model.named_parameters()]
    assert names, "model has no parameters"
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    assert h.grad is not None and h.grad.abs().sum() > 0


def test_parameter_count_matches_formula():
    cfg = _config(num_layers=3, pre_norm=True)
    model = TransformerStack(cfg)
    Cn, I = cfg.hidden_size, cfg.intermediate_size
    per_layer = 4 * (Cn * Cn + Cn) + (Cn * I + I) + (I * Cn + Cn) + 2 * 2 * Cn
    assert sum(p.numel() for p in model.parameters()) == 3 * per_layer + 2 * Cn

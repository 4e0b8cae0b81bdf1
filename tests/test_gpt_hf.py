"""simbook's GPT-2 against the independent reference, Hugging Face transformers, on the same random weights."""
import json
import re

import pytest
import torch

transformers = pytest.importorskip("transformers")

from simbook.attention.masks import causal_mask  # noqa: E402
from simbook.models.gpt import (GPT, config_from_hf_gpt2, hf_gpt2_state_dict_to_simbook,  # noqa: E402
                                load_hf_gpt2, simbook_state_dict_to_hf_gpt2)
from simbook.models.transformer import KVCache, TransformerConfig  # noqa: E402

V, C, L, H, N_POS = 101, 32, 2, 4, 40


def _tiny_hf(tmp_path, cls=None, **overrides):
    """A random tiny GPT-2 saved with `save_pretrained` (safetensors) into tmp_path; returns the HF model."""
    config = transformers.GPT2Config(n_embd=C, n_layer=L, n_head=H, vocab_size=V, n_positions=N_POS,
                                     bos_token_id=0, eos_token_id=0, **overrides)
    torch.manual_seed(0)
    model = (cls or transformers.GPT2LMHeadModel)(config).eval()
    with torch.no_grad():        # HF initialises LayerNorms to 1/0 and biases to 0: make every parameter non-trivial
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(tmp_path, safe_serialization=True)
    return model


def _hf_logits(ref, **kwargs):
    with torch.no_grad():
        out = ref(**kwargs, use_cache=False)
    if isinstance(ref, transformers.GPT2LMHeadModel):
        return out.logits
    return out.last_hidden_state @ ref.wte.weight.T          # GPT2Model: apply the tied head by hand


def _ids(batch, length, seed=1):
    return torch.randint(0, V, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("cls_name", ["GPT2LMHeadModel", "GPT2Model"])
@pytest.mark.parametrize("activation", ["gelu_new", "gelu", "relu"])
def test_logits_equal_transformers(tmp_path, activation, cls_name):
    ref = _tiny_hf(tmp_path, getattr(transformers, cls_name), activation_function=activation)
    from safetensors.torch import load_file
    keys = load_file(str(tmp_path / "model.safetensors")).keys()
    assert all(k.startswith("transformer.") for k in keys) == (cls_name == "GPT2LMHeadModel")
    ours = load_hf_gpt2(tmp_path)
    assert not ours.training and ours.segment is None
    ids = _ids(3, 17)                                          # batch > 1, no past_key_values on the HF side
    with torch.no_grad():
        got = ours(ids)
    expected = _hf_logits(ref, input_ids=ids)
    assert expected.abs().max().item() > 1.0                   # the comparison is not between near-zero numbers
    assert (got - expected).abs().max().item() < 1e-5


def test_n_inner_and_explicit_positions(tmp_path):
    ref = _tiny_hf(tmp_path, n_inner=48)
    ours = load_hf_gpt2(tmp_path)
    assert ours.config.intermediate_size == 48
    ids = _ids(2, 9)
    positions = torch.arange(20, 29).expand(2, 9)
    with torch.no_grad():
        got = ours(ids, position_ids=positions)
    expected = _hf_logits(ref, input_ids=ids, position_ids=positions)
    assert (got - expected).abs().max().item() < 1e-5


def test_padded_batch_equals_transformers(tmp_path):
    ref = _tiny_hf(tmp_path)
    ours = load_hf_gpt2(tmp_path)
    ids = _ids(3, 12, seed=3)
    valid = torch.arange(12)[None] < torch.tensor([[12], [7], [3]])
    with torch.no_grad():
        got = ours(ids, causal_mask(valid))
    expected = _hf_logits(ref, input_ids=ids, attention_mask=valid.long())
    assert (got - expected)[valid].abs().max().item() < 1e-5


def test_cached_decoding_equals_full_pass(tmp_path):
    ref = _tiny_hf(tmp_path)
    model = load_hf_gpt2(tmp_path)
    ids = _ids(2, 20, seed=2)
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache()
        parts = [model(ids[:, :5], cache=cache), model(ids[:, 5:9], cache=cache)]      # prefill, then a chunk of 4
        parts += [model(ids[:, t:t + 1], cache=cache) for t in range(9, 20)]           # then single steps
    assert len(cache) == 20
    step = torch.cat(parts, 1)
    assert (full - step).abs().max().item() < 1e-5
    assert (step - _hf_logits(ref, input_ids=ids)).abs().max().item() < 1e-5


def test_causal_by_default(tmp_path):
    _tiny_hf(tmp_path)
    model = load_hf_gpt2(tmp_path)
    ids = _ids(2, 10)
    changed = ids.clone()
    changed[:, 6] = (changed[:, 6] + 1) % V
    with torch.no_grad():
        a, b = model(ids), model(changed)
    assert torch.equal(a[:, :6], b[:, :6]) and (a[:, 6:] - b[:, 6:]).abs().amax(dim=(0, 2)).min() > 0


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    _tiny_hf(tmp_path)
    from safetensors.torch import load_file, save_file
    state = load_file(str(tmp_path / "model.safetensors"))
    del state["transformer.h.1.mlp.c_proj.weight"]
    del state["transformer.ln_f.bias"]
    state["transformer.h.0.attn.rotary.weight"] = torch.zeros(3)
    state["multiple_choice_head.summary.weight"] = torch.zeros(2, 2)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError) as info:
        load_hf_gpt2(tmp_path)
    message = str(info.value)
    for key in ("missing keys (2)", "stack.layers.1.ffn.down.weight", "stack.final_norm.bias", "unexpected keys (2)",
                "transformer.h.0.attn.rotary.weight", "multiple_choice_head.summary.weight"):
        assert key in message


def test_shape_mismatch_is_listed(tmp_path):
    _tiny_hf(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["vocab_size"] = V + 1
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="shape mismatches.*token.weight"):
        load_hf_gpt2(tmp_path)


def test_old_buffers_and_tied_head_are_skipped(tmp_path):
    ref = _tiny_hf(tmp_path)
    from safetensors.torch import load_file, save_file
    state = load_file(str(tmp_path / "model.safetensors"))
    for i in range(L):                                         # what checkpoints of older transformers versions hold
        state[f"transformer.h.{i}.attn.bias"] = torch.ones(1, 1, N_POS, N_POS).tril()
        state[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    state["lm_head.weight"] = state["transformer.wte.weight"].clone()
    save_file(state, str(tmp_path / "model.safetensors"))
    ids = _ids(2, 6)
    with torch.no_grad():
        assert (load_hf_gpt2(tmp_path)(ids) - _hf_logits(ref, input_ids=ids)).abs().max().item() < 1e-5


def test_untied_head_refused(tmp_path):
    ref = _tiny_hf(tmp_path, tie_word_embeddings=False)
    with torch.no_grad():
        ref.lm_head.weight.copy_(ref.transformer.wte.weight + 1.0)
    ref.save_pretrained(tmp_path, safe_serialization=True)
    with pytest.raises(ValueError, match="not tied"):
        load_hf_gpt2(tmp_path)
    state = {k: v for k, v in ref.state_dict().items()}
    with pytest.raises(ValueError, match="not tied"):
        hf_gpt2_state_dict_to_simbook(state)


def test_pickled_checkpoint_refused_then_allowed(tmp_path):
    ref = _tiny_hf(tmp_path)
    state = {k: v.contiguous() for k, v in ref.state_dict().items()}
    (tmp_path / "model.safetensors").unlink()
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pickled"):
        load_hf_gpt2(tmp_path)
    model = load_hf_gpt2(tmp_path, allow_torch_weights_only=True)
    ids = _ids(2, 5)
    with torch.no_grad():
        assert (model(ids) - _hf_logits(ref, input_ids=ids)).abs().max().item() < 1e-5


@pytest.mark.parametrize("change, pattern", [
    ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
    ({"reorder_and_upcast_attn": True}, "reorder_and_upcast_attn"),
    ({"scale_attn_weights": False}, "scale_attn_weights"),
    ({"add_cross_attention": True}, "add_cross_attention"),
    ({"activation_function": "silu"}, "activation_function 'silu'"),
    ({"model_type": "bert"}, "not a GPT-2 config"),
    ({"n_embd": None}, "n_embd"),
])
def test_unsupported_config_refused(change, pattern):
    hf = {"model_type": "gpt2", "vocab_size": V, "n_embd": C, "n_layer": L, "n_head": H, "n_positions": N_POS}
    config = config_from_hf_gpt2(hf)
    assert (config.pre_norm, config.activation, config.intermediate_size, config.layer_norm_eps) == (
        True, "gelu_tanh", 4 * C, 1e-5)
    hf = {**hf, **change}
    if change.get("n_embd", 0) is None:
        del hf["n_embd"]
    with pytest.raises(ValueError, match=pattern):
        config_from_hf_gpt2(hf)


def test_missing_folder_and_wrong_types(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_hf_gpt2(tmp_path / "nowhere")
    with pytest.raises(TypeError, match="hf must be a dict"):
        config_from_hf_gpt2("gpt2")
    with pytest.raises(ValueError, match="pre_norm"):
        GPT(TransformerConfig(vocab_size=10))


@pytest.mark.parametrize("segments", [False, True])
def test_simbook_checkpoint_round_trip(tmp_path, segments):
    torch.manual_seed(0)
    model = GPT(TransformerConfig(vocab_size=V, hidden_size=C, num_layers=L, num_heads=H, intermediate_size=64,
                                  max_position=N_POS, pre_norm=True, activation="gelu_tanh"), segments=segments).eval()
    model.save_pretrained(tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["model_type"] == "GPT" and config["hidden_size"] == C
    again = GPT.from_pretrained(tmp_path / "ckpt")
    assert (again.segment is not None) is segments
    assert list(model.state_dict()) == list(again.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    assert "lm_head.weight" not in model.state_dict()          # the head is the token embedding, stored once


def test_from_pretrained_refuses_other_folders(tmp_path):
    _tiny_hf(tmp_path)
    with pytest.raises(ValueError, match="gpt2 checkpoint, not a GPT"):
        GPT.from_pretrained(tmp_path)                           # a Hugging Face folder: load_hf_gpt2 reads it
    with pytest.raises(FileNotFoundError):
        GPT.from_pretrained(tmp_path / "nowhere")


def _random_gpt(activation="gelu_tanh", **config):
    torch.manual_seed(0)
    model = GPT(TransformerConfig(**{"vocab_size": V, "hidden_size": C, "num_layers": L, "num_heads": H,
                                     "intermediate_size": 48, "max_position": N_POS, "pre_norm": True,
                                     "dropout": 0.0, "layer_norm_eps": 1e-5, "activation": activation, **config})).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.mark.parametrize("activation", ["gelu_tanh", "gelu", "relu"])
def test_save_hf_loads_in_transformers(tmp_path, activation):
    model = _random_gpt(activation)
    model.save_hf(tmp_path)
    ref = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path), local_files_only=True).eval()
    assert torch.equal(ref.lm_head.weight, ref.transformer.wte.weight)   # the tie survived the export
    ids = _ids(3, 17)
    valid = torch.ones(3, 17, dtype=torch.bool)
    valid[2, 12:] = False
    with torch.no_grad():
        got = model(ids, causal_mask(valid))
    expected = _hf_logits(ref, input_ids=ids, attention_mask=valid.long())
    assert expected.abs().max().item() > 1.0
    assert (got[valid] - expected[valid]).abs().max().item() < 1e-5
    again = load_hf_gpt2(tmp_path)                              # simbook reads its own export back
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_hf_gpt2_key_translation_round_trip(tmp_path):
    ref = _tiny_hf(tmp_path)
    ours = load_hf_gpt2(tmp_path)
    exported = simbook_state_dict_to_hf_gpt2(ours.state_dict())
    original = {k: v for k, v in ref.state_dict().items() if not re.search(r"\.attn\.(bias|masked_bias)$", k)
                and k != "lm_head.weight"}
    assert exported.keys() == original.keys()
    assert all(torch.equal(exported[k], original[k]) for k in original)


def test_save_hf_refuses_what_gpt2_cannot_express(tmp_path):
    with pytest.raises(ValueError, match="segment embeddings"):
        GPT(TransformerConfig(vocab_size=V, hidden_size=C, num_layers=1, num_heads=H, pre_norm=True),
            segments=True).save_hf(tmp_path)
    with pytest.raises(ValueError, match="softmax attention"):
        _random_gpt(attention="linear").save_hf(tmp_path)
    assert not any(tmp_path.iterdir())


def test_segments(tmp_path):
    torch.manual_seed(0)
    config = TransformerConfig(vocab_size=V, hidden_size=C, num_layers=1, num_heads=H, intermediate_size=64,
                               max_position=N_POS, pre_norm=True, dropout=0.0)
    model = GPT(config, segments=True).eval()
    ids = _ids(2, 8)
    segs = (torch.arange(8) >= 4).long().expand(2, 8)
    with torch.no_grad():
        default, zeros, speakers = model(ids), model(ids, segment_ids=torch.zeros_like(ids)), model(ids, segment_ids=segs)
    assert torch.equal(default, zeros) and not torch.allclose(default[:, 4:], speakers[:, 4:])
    assert torch.equal(default[:, :4], speakers[:, :4])       # causal: later segments do not reach earlier positions
    with pytest.raises(ValueError, match="segment_ids holds 2"):
        model(ids, segment_ids=torch.full_like(ids, 2))
    with pytest.raises(ValueError, match="no segment embeddings"):
        GPT(config)(ids, segment_ids=segs)


@pytest.fixture(scope="module")
def tiny_gpt():
    torch.manual_seed(0)
    return GPT(TransformerConfig(vocab_size=20, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32,
                                 max_position=8, dropout=0.0, pre_norm=True)).eval()


@pytest.mark.parametrize("args, kwargs, error, pattern", [
    ((torch.tensor([[1, 2, 20]]),), {}, ValueError, "input_ids holds 20, outside"),
    ((torch.tensor([[1, -1]]),), {}, ValueError, "input_ids holds -1"),
    ((torch.ones(1, 9, dtype=torch.long),), {}, ValueError, "9 positions exceed the position table"),
    ((torch.tensor([[1.0, 2.0]]),), {}, TypeError, "input_ids must have a int dtype"),
    (([[1, 2]],), {}, TypeError, "input_ids must be a torch.Tensor"),
    ((torch.zeros(0, 3, dtype=torch.long),), {}, ValueError, "input_ids is empty"),
    ((torch.zeros(2, 0, dtype=torch.long),), {}, ValueError, "input_ids is empty"),
    ((torch.tensor([1, 2]),), {}, ValueError, "input_ids must have 2 dimensions"),
    ((torch.ones(1, 3, dtype=torch.long), torch.ones(1, 3, 4, dtype=torch.bool)), {}, ValueError, "mask has 4 keys"),
    ((torch.ones(2, 3, dtype=torch.long), torch.ones(3, 3, 3, dtype=torch.bool)), {}, ValueError, "mask has batch"),
    ((torch.ones(1, 3, dtype=torch.long), torch.ones(1, 3, 3)), {}, TypeError, "mask must have a bool dtype"),
    ((torch.ones(1, 3, dtype=torch.long), torch.zeros(1, 3, 3, dtype=torch.bool)), {}, ValueError, "no key"),
    ((torch.ones(1, 3, dtype=torch.long),), {"position_ids": torch.tensor([[0, 1, 8]])}, ValueError,
     "position_ids holds 8"),
    ((torch.ones(1, 3, dtype=torch.long),), {"position_ids": torch.zeros(2, 3, dtype=torch.long)}, ValueError,
     "position_ids has size 2"),
    ((torch.ones(1, 3, dtype=torch.long),), {"segment_ids": torch.zeros(1, 3, dtype=torch.long)}, ValueError,
     "no segment embeddings"),
    ((torch.ones(1, 3, dtype=torch.long),), {"cache": [None]}, TypeError, "cache must be a KVCache"),
    ((torch.ones(1, 3, dtype=torch.long),), {"cache": KVCache(2)}, ValueError, "cache has 2 layers"),
])
def test_bad_input(tiny_gpt, args, kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        tiny_gpt(*args, **kwargs)


def test_cache_checks_and_refusals_leave_it_intact(tiny_gpt):
    cache = tiny_gpt.new_cache()
    with torch.no_grad():
        tiny_gpt(torch.ones(2, 6, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="9 positions exceed the position table"):
        tiny_gpt(torch.ones(2, 3, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="cache holds batch size 2, input_ids has 1"):
        tiny_gpt(torch.ones(1, 1, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="mask has 2 keys, expected 7"):
        tiny_gpt(torch.ones(2, 1, dtype=torch.long), torch.ones(2, 1, 2, dtype=torch.bool), cache=cache)
    assert len(cache) == 6
    with torch.no_grad():
        out = tiny_gpt(torch.ones(2, 2, dtype=torch.long), cache=cache)   # 6 + 2 = 8 positions: exactly the table
    assert out.shape == (2, 2, 20) and len(cache) == 8

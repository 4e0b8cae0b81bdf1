"""simbook.experiments.simbert: the thesaurus and the synonym rewriter on tiny hand-made data, the data readers,
masking, the two training runs through simbook.training.fit (configurations, determinism, the command's defaults),
the metrics against brute-force rankings, and the `simbook simbert` command."""
import contextlib
import io
import itertools
import json
import math
import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from simbook.experiments.simbert import (SimBertPretrainConfig, SimBertTrainConfig, SynonymRewriter, Thesaurus,
                                         best_threshold, char_bleu, distinct_n, evaluate_similarities,
                                         groups_from_pairs, held_out_benchmark, is_held_out, mask_tokens,
                                         near_duplicates, new_simbert, pretrain_mlm, read_pair_tsv,
                                         read_synonym_jsonl, retrieval_accuracy, sample_pairs, self_bleu,
                                         synonym_groups, threshold_accuracy, train_simbert, write_synonym_jsonl)
from simbook.simbert import SimBert, simbert_checkpoint_path
from simbook.text import CharTokenizer

pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py

# shared with tests/test_simbert.py (tests/ is on sys.path under pytest)
from simbert_common import FEW, MANY, QUIET, SENTENCES, _chars, model, sharp_model, tokenizer  # noqa: E402,F401



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
    config = SimBertTrainConfig(steps=3, batch_pairs=4)
    history = train_simbert(m, data, config, device="cpu", seed=0)
    assert set(history) == {"loss", "generation", "similarity"}
    assert all(len(v) == 3 and all(math.isfinite(x) for x in v) for v in history.values())
    for total, gen, sim in zip(history["loss"], history["generation"], history["similarity"]):
        assert abs(total - (gen + sim)) < 1e-4 * max(1.0, total)
    assert not m.training
    other = new_simbert(tokenizer, hidden_size=32, num_layers=1, num_heads=2, maxlen=16)
    assert train_simbert(other, data, config, device="cpu", seed=0) == history     # deterministic
    near = {s: [s[:3] + "脏"] for s in SENTENCES}                                  # every row gets a negative
    third = new_simbert(tokenizer, hidden_size=32, num_layers=1, num_heads=2, maxlen=16)
    hard = train_simbert(third, data, config, negatives=near, device="cpu", seed=0)
    assert hard["generation"][0] == pytest.approx(history["generation"][0], abs=1e-6)    # same first batch
    assert hard["similarity"][0] != pytest.approx(history["similarity"][0], abs=1e-6)    # more candidates
    with pytest.raises(ValueError, match="needs 9 groups, there are 8"):
        train_simbert(m, data, SimBertTrainConfig(steps=1, batch_pairs=9), device="cpu")


def test_train_resume_equals_uninterrupted(tokenizer, tmp_path):
    data = [[SENTENCES[i], SENTENCES[i][::-1]] for i in range(8)]
    config = SimBertTrainConfig(steps=4, batch_pairs=2)
    whole = train_simbert(new_simbert(tokenizer, hidden_size=32, num_layers=1, num_heads=2, maxlen=16), data,
                          config, device="cpu", seed=3)
    first = new_simbert(tokenizer, hidden_size=32, num_layers=1, num_heads=2, maxlen=16)
    def stop(model, batch, step):                                  # interrupted in step 3, after the
        if step == 3:                                              # checkpoint of step 2
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        train_simbert(first, data, config, device="cpu", seed=3, checkpoint_dir=tmp_path, checkpoint_every=2,
                      before_update=stop)
    resumed = train_simbert(new_simbert(tokenizer, hidden_size=32, num_layers=1, num_heads=2, maxlen=16), data,
                            config, device="cpu", seed=3, checkpoint_dir=tmp_path, resume=True)
    assert resumed["loss"] == pytest.approx(whole["loss"][2:], abs=1e-6)


@pytest.mark.parametrize("values, message", [
    (dict(generation_weight=0.0, similarity_weight=0.0), "not both 0"),
    (dict(generation_weight=-1.0), "must be >= 0"),
    (dict(steps=0), "steps must be >= 1"),
    (dict(scale=0.0), "scale must be positive"),
])
def test_train_config_rejects_bad_values(values, message):
    with pytest.raises(ValueError, match=message):
        SimBertTrainConfig(**values)


def test_pretrain_mlm_runs(tokenizer):
    m = new_simbert(tokenizer, hidden_size=32, num_layers=1, num_heads=2, maxlen=16)
    before = m.lm.bert.embeddings.word.weight.detach().clone()
    config = SimBertPretrainConfig(steps=3, batch_size=4, warmup=1)
    result = pretrain_mlm(m, SENTENCES * 2, config, device="cpu", seed=0)
    assert len(result.losses) == 3 and all(math.isfinite(x) for x in result.losses)
    assert not torch.equal(before, m.lm.bert.embeddings.word.weight) and not m.training
    again = pretrain_mlm(new_simbert(tokenizer, hidden_size=32, num_layers=1, num_heads=2, maxlen=16),
                         SENTENCES * 2, config, device="cpu", seed=0)
    assert again.losses == result.losses                                          # deterministic
    with pytest.raises(ValueError, match="need more than batch_size=8 sentences, got 8"):
        pretrain_mlm(m, SENTENCES, SimBertPretrainConfig(steps=1, batch_size=8), device="cpu")
    with pytest.raises(ValueError, match="steps must be >= 1"):
        SimBertPretrainConfig(steps=0)


def test_the_commands_defaults_are_the_functions():
    """The issue that started the configurations: `train_simbert(steps=300)` against `--steps 3000`."""
    from simbook.cli import build_parser
    from simbook.training import config_from_args

    parser = build_parser()
    for action, config_class, steps in (("train", SimBertTrainConfig, 3000), ("pretrain", SimBertPretrainConfig, 4000)):
        args = parser.parse_args(["simbert", action])
        assert config_from_args(config_class, args) == config_class() and config_class().steps == steps
        for option in ("device", "seed", "save", "resume"):
            assert hasattr(args, option)


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
    assert {"model.safetensors", "config.json", "tokenizer.json", "record.json", "checkpoint"} <= \
        {p.name for p in save.iterdir()}
    record = json.loads((save / "record.json").read_text(encoding="utf-8"))
    assert record["status"] == "finished" and record["config"]["steps"] == 2 and record["seed"] == 0
    assert set(record["final"]["final_losses"]) == {"loss", "generation", "similarity"}
    assert record["final"]["held_out"] == {} and record["command"]
    assert SimBert.from_pretrained(save).maxlen == 32


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
    assert status == 2 and "no model folder" in err and len(err.strip().splitlines()) == 1
    status, _, err = _main("simbert", "train", "--data", str(tmp_path / "x.csv"), "--steps", "1", "--save",
                           str(tmp_path / "run"))
    assert status == 2 and "--data must be a .jsonl file" in err
    status, _, err = _main("simbert", "train", "--device", "tpu", "--save", str(tmp_path / "run"))
    assert status == 2 and "unknown device 'tpu'" in err and len(err.strip().splitlines()) == 1
    status, _, err = _main("simbert", "train", "--resume", "--save", str(tmp_path / "empty"))
    assert status == 2 and "holds no checkpoint" in err


def test_cli_hard_negatives(trained_dir, tmp_path):
    _, save, _ = trained_dir
    status, _, err = _main("simbert", "train", "--data", str(tmp_path / "x.jsonl"), "--hard-negatives", "1",
                           "--save", str(tmp_path / "run"))
    assert status == 2 and "--hard-negatives needs the shipped corpus or a .tsv file" in err
    data = tmp_path / "pairs.tsv"
    rows = [f"第{i}号房间很干净\t第{i}号房间非常干净\t1" for i in range(12)]
    rows += [f"第{i}号房间很干净\t第{i}号房间很脏\t0" for i in range(12)]
    data.write_text("\n".join(rows) + "\n", encoding="utf-8")
    status, out, err = _main("simbert", "train", "--data", str(data), "--init", str(save), "--hard-negatives", "1",
                             "--steps", "2", "--batch-pairs", "4", "--no-eval", "--no-progress", "--threads", "1",
                             "--save", str(tmp_path / "hard"), "--device", "cpu")
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


def test_cli_pretrain_writes_a_model_and_a_record(tmp_path):
    save = tmp_path / "mlm"
    status, out, err = _main("simbert", "pretrain", "--steps", "2", "--batch-size", "4", "--hidden-size", "16",
                             "--num-layers", "1", "--num-heads", "2", "--save", str(save), "--device", "cpu",
                             "--no-progress", "--threads", "1")
    assert status == 0, err
    assert f"saved to {save}" in out
    model = SimBert.from_pretrained(save)
    assert model.config.hidden_size == 16 and model.config.num_layers == 1
    record = json.loads((save / "record.json").read_text(encoding="utf-8"))
    assert record["status"] == "finished" and record["config"]["steps"] == 2
    assert record["final"]["vocabulary"] == model.tokenizer.vocab_size
    status, _, err = _main("simbert", "pretrain", "--steps", "2", "--batch-size", "4", "--hidden-size", "16",
                           "--num-layers", "1", "--num-heads", "2", "--save", str(save), "--device", "cpu",
                           "--no-progress", "--threads", "1", "--resume")
    assert status == 2 and "nothing left of 2 steps" in err          # the run is complete

"""The integrated-gradients experiments over many reviews (simbook.experiments.attribution): batched attributions,
the closed form of gradient x input's error for the character CNN, the lexicons, top-k hits, Wilson intervals, the
study driver and `simbook ig-study`."""
import itertools
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from simbook.experiments.attribution import (AttributionStudyConfig, CharCNNClassifier, SentimentConfig,
                                             attribute_reviews, evaluative_words, explain_review, first_order_gap,
                                             is_evaluative, lexicon_hits, measure_attributions, sentiment_lexicon,
                                             summarize_study, train_sentiment_classifier, wilson_interval)

POSITIVE = ["这个商品让我很满意", "质量很好，非常满意", "物流很快，满意", "很满意，推荐购买", "满意的一次购物",
            "包装不错，满意", "价格便宜，很满意", "客服热情，满意"] * 3
NEGATIVE = ["这个商品让我很失望", "质量太差，非常失望", "物流太慢，失望", "很失望，不推荐", "失望的一次购物",
            "包装破损，失望", "价格太贵，很失望", "客服冷漠，失望"] * 3


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("reviews")
    (folder / "pos.txt").write_text("\n".join(f"{t}{i}" for i, t in enumerate(POSITIVE)), encoding="utf-8")
    (folder / "neg.txt").write_text("\n".join(f"{t}{i}" for i, t in enumerate(NEGATIVE)), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def trained(corpus):
    config = SentimentConfig(held_out=16, min_count=1, max_chars=16, width=8, channels=8, steps=40, batch_size=8,
                             lr=1e-2, eval_every=None)
    return train_sentiment_classifier(config, directory=corpus, seed=0, device="cpu")


def held_out_texts(trained):
    return [trained["texts"][i] for i in trained["test_rows"].tolist()]


def test_attribute_reviews_matches_explain_review_and_the_batching(trained):
    model, tokenizer, texts = trained["model"], trained["tokenizer"], held_out_texts(trained)
    ours = attribute_reviews(model, tokenizer, texts, n_steps=20, max_chars=16, batch_size=5)
    alone = attribute_reviews(model, tokenizer, texts, n_steps=20, max_chars=16, batch_size=1)
    for i, text in enumerate(texts[:6]):
        chars, scores, change, delta = explain_review(model, tokenizer, text, max_chars=16, n_steps=20)
        assert torch.allclose(ours["scores"][i], scores[1:-1], atol=1e-5)
        assert abs(ours["change"][i].item() - change) < 1e-5 and abs(ours["error"][i].item() - delta) < 1e-5
    for key in ("change", "error"):
        assert torch.allclose(ours[key], alone[key], atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(ours["scores"], alone["scores"]))
    assert [len(s) for s in ours["scores"]] == [min(len(t), 16) for t in texts]


def test_gradient_x_input_scores_and_error_against_autograd(trained):
    model, tokenizer, texts = trained["model"], trained["tokenizer"], held_out_texts(trained)
    ours = attribute_reviews(model, tokenizer, texts, method="gradient_x_input", max_chars=16)
    encoded = tokenizer.batch_encode(texts, max_length=18)
    ids, valid = encoded["input_ids"], encoded["valid"]
    E = model.token_embedding(ids).detach().requires_grad_()
    F = model(ids, valid, E).diff(dim=-1).squeeze(-1)
    (grad,) = torch.autograd.grad(F.sum(), E)
    per_token = (grad * E).sum(-1).detach()
    with torch.no_grad():
        change = F.detach() - model(ids, valid, torch.zeros_like(E)).diff(dim=-1).squeeze(-1)
    error = per_token.sum(1) - change
    for i, text in enumerate(texts):
        assert torch.allclose(ours["scores"][i], per_token[i, 1:1 + len(ours["scores"][i])], atol=1e-5)
    assert torch.allclose(ours["error"], error, atol=1e-5)
    assert torch.allclose(first_order_gap(model, ids, valid), error, atol=1e-5)       # the closed form


def test_first_order_gap_on_random_models():
    for seed in range(3):
        torch.manual_seed(seed)
        model = CharCNNClassifier(25, width=6, channels=10).double().eval()
        ids = torch.randint(1, 25, (6, 8))
        ids[1, 3:] = 0
        valid = ids != 0
        E = model.token_embedding(ids).detach().requires_grad_()
        F = model(ids, valid, E).diff(dim=-1).squeeze(-1)
        (grad,) = torch.autograd.grad(F.sum(), E)
        with torch.no_grad():
            change = F - model(ids, valid, torch.zeros_like(E)).diff(dim=-1).squeeze(-1)
        assert torch.allclose(first_order_gap(model, ids, valid), (grad * E).sum((1, 2)) - change, atol=1e-10)


def test_attribute_reviews_bad_input(trained):
    model, tokenizer = trained["model"], trained["tokenizer"]
    with pytest.raises(ValueError, match="unknown method 'saliency'"):
        attribute_reviews(model, tokenizer, ["很好"], method="saliency")
    with pytest.raises(ValueError, match="non-empty list"):
        attribute_reviews(model, tokenizer, "很好")
    with pytest.raises(ValueError, match="review 1 has no characters"):
        attribute_reviews(model, tokenizer, ["很好", "   "])
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        attribute_reviews(model, tokenizer, ["很好"], batch_size=0)


def test_sentiment_lexicon():
    texts, labels = POSITIVE + NEGATIVE, [1] * len(POSITIVE) + [0] * len(NEGATIVE)
    lexicon = sentiment_lexicon(texts, labels, min_count=3, z_threshold=2.0, prior=10.0)     # a small corpus
    assert lexicon["满意"] > 2 and lexicon["失望"] < -2
    assert "商品" not in lexicon and "质量" not in lexicon                  # as common in both classes
    assert all(word.strip() for word in lexicon) and "，" not in lexicon    # words with Chinese characters only
    swapped = sentiment_lexicon(texts, [1 - l for l in labels], min_count=3, z_threshold=2.0, prior=10.0)
    assert swapped.keys() == lexicon.keys() and all(math.isclose(swapped[w], -z) for w, z in lexicon.items())
    assert sentiment_lexicon(texts, labels, min_count=100, z_threshold=2.0, prior=10.0) == {}
    for kwargs, message in [(dict(min_count=0), "min_count must be >= 1"), (dict(z_threshold=0), "z_threshold"),
                            (dict(prior=float("inf")), "prior")]:
        with pytest.raises(ValueError, match=message):
            sentiment_lexicon(texts, labels, **kwargs)
    with pytest.raises(ValueError, match="one label per review"):
        sentiment_lexicon(texts, labels[:-1])
    with pytest.raises(ValueError, match="labels must be 0 and 1"):
        sentiment_lexicon(texts, [1] * len(texts))


def test_evaluative_words(tmp_path):
    words = evaluative_words()
    assert {"差", "失望", "不错", "喜欢", "脏"} <= words and not {"酒店", "的", "携程"} & words
    cilin, stop = tmp_path / "cilin.txt", tmp_path / "stop.txt"
    cilin.write_text("Ed03A01= 好 优良\nDm04A10= 酒店 饭店\nGa05B01= 失望\nEd01C01= 的 确实\nGb09A01= 喜欢\n",
                     encoding="utf-8")
    stop.write_text("的\n", encoding="utf-8")
    assert evaluative_words(cilin, stopwords=stop) == {"好", "优良", "失望", "确实", "喜欢"}
    assert evaluative_words(cilin, stopwords=stop, categories=("Ga",)) == {"失望"}
    with pytest.raises(ValueError, match="no words"):
        evaluative_words(cilin, stopwords=stop, categories=("Z",))
    assert is_evaluative("很差", frozenset({"差"})) and is_evaluative("不满意", frozenset({"满意"}))
    assert not is_evaluative("酒店", words)


def brute_force_chance(polarity, k, sign):
    n = len(polarity)
    picks = list(itertools.combinations(range(n), k))
    return sum(any(polarity[t] == sign for t in pick) for pick in picks) / len(picks)


def test_lexicon_hits_and_its_chance_rate():
    text, lexicon = "房间很差但是服务不错", {"很差": -3.0, "不错": 4.0}
    scores = torch.tensor([0.1, 0.2, -0.3, -2.0, 0.0, 0.05, 0.4, 0.0, 0.3, 1.0])
    hits = lexicon_hits(text, scores, lexicon, k=1)
    assert hits["negative"] == 1.0 and hits["positive"] == 0.0
    hits = lexicon_hits(text, scores, lexicon, k=2)
    assert hits["negative"] == 1.0 and hits["positive"] == 1.0
    polarity = [0, 0, -1, -1, 0, 0, 0, 0, 1, 1]            # jieba: 房间 / 很差 / 但是 / 服务 / 不错
    for k in (1, 2, 3, 5):
        hits = lexicon_hits(text, scores, lexicon, k=k)
        assert math.isclose(hits["chance_negative"], brute_force_chance(polarity, k, -1))
        assert math.isclose(hits["chance_positive"], brute_force_chance(polarity, k, 1))
    assert lexicon_hits(text, scores, lexicon, k=50)["chance_negative"] == 1.0      # k beyond the review: all
    assert lexicon_hits("房 间", torch.tensor([1.0, 0.0]), {}, k=1)["negative"] == 0.0       # spaces are not read
    with pytest.raises(ValueError, match="one score per character"):
        lexicon_hits(text, scores[:-1], lexicon)
    with pytest.raises(ValueError, match="k must be >= 1"):
        lexicon_hits(text, scores, lexicon, k=0)


def test_wilson_interval_against_scipy():
    stats = pytest.importorskip("scipy.stats")
    for successes, trials in [(0, 1), (0, 10), (3, 10), (10, 10), (63, 125), (700, 1500)]:
        ref = stats.binomtest(successes, trials).proportion_ci(confidence_level=0.95, method="wilson")
        assert np.allclose(wilson_interval(successes, trials), (ref.low, ref.high), atol=1e-9)
    for args, error in [((3, 0), ValueError), ((4, 3), ValueError), ((-1, 3), ValueError), ((True, 3), TypeError),
                        ((1.0, 3), TypeError)]:
        with pytest.raises(error):
            wilson_interval(*args)


def test_study_config():
    assert AttributionStudyConfig().seeds == (0, 1, 2) and AttributionStudyConfig().reviews is None
    small = AttributionStudyConfig.small(top_k=5)
    assert small.seeds == (0,) and small.reviews == 300 and small.top_k == 5
    for kwargs, message in [(dict(seeds=()), "non-empty tuple"), (dict(seeds=(1, 1)), "must differ"),
                            (dict(ig_steps=(0,)), "ig_steps must be >= 1"), (dict(rule="simpson"), "unknown rule"),
                            (dict(top_k=0), "top_k must be >= 1"), (dict(reviews=0), "reviews must be >= 1"),
                            (dict(z_threshold=-1.0), "z_threshold")]:
        with pytest.raises(ValueError, match=message):
            AttributionStudyConfig(**kwargs)


def test_measure_attributions_and_summary(trained):
    config = AttributionStudyConfig(seeds=(0,), ig_steps=(4, 16), min_count=2, z_threshold=1.0, batch_size=7)
    result = measure_attributions(trained, config, max_chars=16)
    assert result["reviews"] == 16 and set(result["completeness"]) == {"gradient x input", "IG, 4 steps",
                                                                        "IG, 16 steps"}
    assert result["first_order_gap_max_deviation"] < 1e-4
    for stats in result["completeness"].values():
        assert len(stats["quantiles"]) == 51 and stats["median"] <= stats["p90"] <= stats["p99"] <= stats["max"]
    for classes in result["top_k_hits"].values():
        assert classes["positive reviews"]["n"] + classes["negative reviews"]["n"] == 16
        for by_polarity in classes.values():
            for v in (by_polarity["negative"], by_polarity["positive"]):
                assert v["wilson"][0] <= v["share"] <= v["wilson"][1] and 0 <= v["chance"] <= 1
    other = json.loads(json.dumps(result))
    other["accuracy"] = result["accuracy"] + 0.1
    other["completeness"]["IG, 4 steps"]["median"] += 1.0
    summary = summarize_study([result, other])
    assert summary["seeds"] == 2
    assert np.allclose(summary["accuracy"], [result["accuracy"] + 0.05, np.std([0, 0.1], ddof=1)])
    assert np.allclose(summary["completeness"]["IG, 4 steps"]["median"][1], np.std([0, 1.0], ddof=1))
    with pytest.raises(ValueError, match="at least one seed"):
        summarize_study([])


def test_ig_study_command(tmp_path):
    simbook = shutil.which("simbook") or str(Path(sys.executable).parent / "simbook")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = tmp_path / "run"
    result = subprocess.run([simbook, "ig-study", "--seeds", "0", "1", "--train-steps", "3", "--reviews", "20",
                             "--ig-steps", "4", "--device", "cpu", "--save", str(out), "--no-progress"],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    assert "completeness error" in result.stdout and "IG, 4 steps" in result.stdout
    record = json.loads((out / "record.json").read_text())
    assert record["status"] == "finished" and [e["step"] for e in record["evaluations"]] == [0, 1]
    assert record["final"]["summary"]["seeds"] == 2 and record["evaluations"][1]["reviews"] == 20
    bad = subprocess.run([simbook, "ig-study", "--seeds", "0", "0", "--save", str(tmp_path / "bad")],
                         capture_output=True, text=True, timeout=120, env=env)
    assert bad.returncode == 2 and "seeds must differ" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "bad").exists()

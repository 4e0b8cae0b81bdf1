"""Chapter 11's first-order split and the study of 11b: `gradient_x_input` against captum's InputXGradient and
LayerGradientXActivation and against closed forms of its completeness error (Taylor's remainder); the completeness
property (IG's error goes to zero as the steps grow, gradient x input's does not move); the batched attributions,
the lexicon reading and its chance rate (brute force); `IGStudyConfig`; and `simbook ig-study` run as a user runs it
on a tiny configuration."""
import itertools
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from simbook.attribution import gradient_x_input, integrated_gradients, layer_integrated_gradients
from simbook.experiments.attribution import (NEGATIVE_LEXICON, CharCNNClassifier, IGStudyConfig, SentimentConfig,
                                             attribute_reviews, explain_review, first_order_gap, format_ig_study,
                                             lexicon_positions, measure_reviews, negative_top_k, relative_errors,
                                             train_sentiment_classifier)
from simbook.utils import mean_interval, wilson_interval

captum_attr = pytest.importorskip("captum.attr")
pytestmark = pytest.mark.filterwarnings("ignore:Input Tensor 0 did not already require gradients:UserWarning")

POSITIVE = ["这个商品让我很满意", "质量很好，非常满意", "物流很快，满意", "很满意，推荐购买", "满意的一次购物",
            "包装不错，满意", "价格便宜，很满意", "客服热情，满意"] * 3
NEGATIVE = ["这个商品让我很失望", "质量太差，非常失望", "物流太慢，失望", "很失望，不推荐", "失望的一次购物",
            "包装破损，失望", "价格太贵，很失望", "客服冷漠，失望"] * 3


def mlp(seed=0, dims=(6, 16, 3), activation=nn.Tanh):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(dims[0], dims[1]), activation(), nn.Linear(dims[1], dims[2])).double().eval()


def char_cnn(seed=3, vocab=30):
    torch.manual_seed(seed)
    model = CharCNNClassifier(vocab, width=8, channels=12).double().eval()
    ids = torch.randint(1, vocab, (5, 9))
    ids[2, 6:] = 0
    return model, ids, ids != 0


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("reviews")
    (folder / "pos.txt").write_text("\n".join(f"{t}{i}" for i, t in enumerate(POSITIVE)), encoding="utf-8")
    (folder / "neg.txt").write_text("\n".join(f"{t}{i}" for i, t in enumerate(NEGATIVE)), encoding="utf-8")
    config = SentimentConfig(held_out=16, min_count=1, max_chars=16, width=8, channels=8, steps=40, batch_size=8,
                             lr=1e-2, eval_every=None)
    return train_sentiment_classifier(config, directory=folder, seed=0, device="cpu")


# ---------------------------------------------------------------- gradient x input against captum

def test_equals_captum_input_x_gradient_for_a_zero_baseline():
    net, x = mlp(1), torch.randn(5, 6, dtype=torch.float64)
    ours = gradient_x_input(net, x, target=[0, 1, 2, 0, 1])
    ref = captum_attr.InputXGradient(net).attribute(x, target=[0, 1, 2, 0, 1])
    assert torch.allclose(ours, ref, atol=1e-12)
    ours = gradient_x_input(net, x, target=2)
    assert torch.allclose(ours, captum_attr.InputXGradient(net).attribute(x, target=2), atol=1e-12)


def test_equals_captum_with_a_baseline_as_input_x_gradient_of_the_shifted_model():
    net, x, b = mlp(2), torch.randn(4, 6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    ours = gradient_x_input(net, x, b, target=1)
    shifted = lambda d: net(d + b)                       # G(d) = F(b + d): at d = x - b, grad G = grad F(x)
    ref = captum_attr.InputXGradient(shifted).attribute(x - b, target=1)
    assert torch.allclose(ours, ref, atol=1e-12)


def test_layer_version_equals_captum_layer_gradient_x_activation():
    model, ids, valid = char_cnn()
    log_odds = lambda ids, valid: model(ids, valid).diff(dim=-1).squeeze(-1)
    ours, delta = gradient_x_input(log_odds, ids, 0, layer=model.token_embedding, additional_forward_args=(valid,),
                                   return_convergence_delta=True)
    ref = captum_attr.LayerGradientXActivation(log_odds, model.token_embedding).attribute(
        ids, additional_forward_args=(valid,))
    assert torch.allclose(ours, ref, atol=1e-10)          # the [PAD] embedding is zero: x - x' is the activation
    with torch.no_grad():
        change = log_odds(ids, valid) - log_odds(torch.zeros_like(ids), valid)
    assert torch.allclose(delta, ours.sum((1, 2)) - change, atol=1e-10)


def test_is_integrated_gradients_with_one_right_node():
    net, x, b = mlp(4), torch.randn(3, 6, dtype=torch.float64), torch.randn(3, 6, dtype=torch.float64)
    a, d = gradient_x_input(net, x, b, target=0, return_convergence_delta=True)
    a1, d1 = integrated_gradients(net, x, b, target=0, n_steps=1, method="riemann_right",
                                  return_convergence_delta=True)
    assert torch.equal(a, a1) and torch.equal(d, d1)


# ---------------------------------------------------------------- completeness

@given(st.integers(0, 2 ** 31 - 1))
@settings(max_examples=20, deadline=None)
def test_gradient_x_input_is_exact_for_affine_models(seed):
    g = torch.Generator().manual_seed(seed)
    w, c = torch.randn(7, generator=g, dtype=torch.float64), torch.randn(1, generator=g, dtype=torch.float64).item()
    x, b = torch.randn(3, 7, generator=g, dtype=torch.float64), torch.randn(3, 7, generator=g, dtype=torch.float64)
    attributions, delta = gradient_x_input(lambda x: x @ w + c, x, b, return_convergence_delta=True)
    assert torch.allclose(attributions, w * (x - b), atol=1e-12) and delta.abs().max() < 1e-12


@given(st.integers(0, 2 ** 31 - 1))
@settings(max_examples=20, deadline=None)
def test_quadratic_errors_in_closed_form(seed):
    """Gradient x input misses by d'Ad; the right Riemann sum with m nodes by d'Ad / m; Gauss-Legendre by nothing."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(5, 5, generator=g, dtype=torch.float64)
    x, b = torch.randn(4, 5, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)
    F = lambda x: torch.einsum("bi,ij,bj->b", x, A, x)
    d = x - b
    second_order = torch.einsum("bi,ij,bj->b", d, A, d)
    _, delta = gradient_x_input(F, x, b, return_convergence_delta=True)
    assert torch.allclose(delta, second_order, atol=1e-11)
    for m in (2, 7, 50):
        _, right = integrated_gradients(F, x, b, n_steps=m, method="riemann_right", return_convergence_delta=True)
        assert torch.allclose(right * m, second_order, atol=1e-10)
    _, ig_delta = integrated_gradients(F, x, b, n_steps=2, return_convergence_delta=True)
    assert ig_delta.abs().max() < 1e-11


def test_cubic_error_is_the_second_and_third_order_terms():
    g = torch.Generator().manual_seed(4)
    c = torch.randn(6, generator=g, dtype=torch.float64)
    x, b = torch.randn(3, 6, generator=g, dtype=torch.float64), torch.randn(3, 6, generator=g, dtype=torch.float64)
    _, delta = gradient_x_input(lambda x: (c * x ** 3).sum(1), x, b, return_convergence_delta=True)
    d = x - b
    assert torch.allclose(delta, (c * (3 * x * d ** 2 - d ** 3)).sum(1), atol=1e-11)


@given(st.integers(0, 2 ** 31 - 1))
@settings(max_examples=10, deadline=None)
def test_ig_error_goes_to_zero_with_the_steps_on_a_smooth_model(seed):
    net = mlp(seed % 1000, dims=(6, 12, 1))
    x = torch.randn(6, 6, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2
    errors = {m: integrated_gradients(net, x, target=0, n_steps=m, method="riemann_middle",
                                      return_convergence_delta=True)[1].abs().max().item() for m in (4, 16, 64, 256)}
    _, gxi = gradient_x_input(net, x, target=0, return_convergence_delta=True)
    assert errors[256] < 1e-4 * max(1.0, gxi.abs().max().item())
    for small, large in [(4, 16), (16, 64), (64, 256)]:       # O(1/m^2): a factor 16 per step of 4 (with slack)
        assert errors[large] <= errors[small] / 8 + 1e-13
    _, gauss = integrated_gradients(net, x, target=0, n_steps=64, return_convergence_delta=True)
    assert gauss.abs().max() < 1e-10


def test_ig_error_shrinks_on_the_relu_char_cnn_while_gradient_x_input_stays():
    model, ids, valid = char_cnn(seed=5)
    log_odds = lambda ids, valid: model(ids, valid).diff(dim=-1).squeeze(-1)
    common = dict(additional_forward_args=(valid,), return_convergence_delta=True)
    _, gxi = gradient_x_input(log_odds, ids, 0, layer=model.token_embedding, **common)
    errors = [layer_integrated_gradients(log_odds, model.token_embedding, ids, 0, n_steps=m, method="riemann_middle",
                                         **common)[1].abs().mean().item() for m in (8, 64, 512, 4096)]
    assert errors[-1] < errors[0] / 50 and errors[-1] < gxi.abs().mean().item() / 50


def test_relu_nets_exact_without_biases_and_off_by_the_intercept_with_them():
    g = torch.Generator().manual_seed(8)
    W, c, v = (torch.randn(*s, generator=g, dtype=torch.float64) for s in [(20, 5), (20,), (20,)])
    x = torch.randn(50, 5, generator=g, dtype=torch.float64)
    _, delta = gradient_x_input(lambda x: torch.relu(x @ W.T) @ v, x, return_convergence_delta=True)
    assert delta.abs().max() < 1e-12                              # positively homogeneous: Euler's identity
    _, delta = gradient_x_input(lambda x: torch.relu(x @ W.T + c) @ v, x, return_convergence_delta=True)
    active = (x @ W.T + c > 0).double()
    assert torch.allclose(delta, (torch.relu(c) - active * c) @ v, atol=1e-12)
    assert delta.abs().min() > 0


def test_gradient_x_input_bad_input():
    net, x = mlp(), torch.randn(4, 6, dtype=torch.float64)
    with pytest.raises(TypeError, match="nn.Module"):
        gradient_x_input(net, x, target=0, layer="0")
    with pytest.raises(TypeError, match="float dtype"):
        gradient_x_input(net, torch.zeros(4, 6, dtype=torch.long), target=0)
    with pytest.raises(ValueError, match="out of range"):
        gradient_x_input(net, x, target=3)
    with pytest.raises(ValueError, match="not broadcastable"):
        gradient_x_input(net, x, torch.zeros(5), target=0)
    with pytest.raises(TypeError, match="forward must be callable"):
        gradient_x_input("net", x)


# ---------------------------------------------------------------- attributions of many reviews

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


def test_gradient_x_input_of_reviews_against_autograd(trained):
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
    for i in range(len(texts)):
        assert torch.allclose(ours["scores"][i], per_token[i, 1:1 + len(ours["scores"][i])], atol=1e-5)
    assert torch.allclose(ours["error"], per_token.sum(1) - change, atol=1e-5)


def test_first_order_gap_on_random_models():
    for seed in range(3):
        model, ids, valid = char_cnn(seed=seed)
        E = model.token_embedding(ids).detach().requires_grad_()
        F = model(ids, valid, E).diff(dim=-1).squeeze(-1)
        (grad,) = torch.autograd.grad(F.sum(), E)
        with torch.no_grad():
            change = F - model(ids, valid, torch.zeros_like(E)).diff(dim=-1).squeeze(-1)
        assert torch.allclose(first_order_gap(model, ids, valid), (grad * E).sum((1, 2)) - change, atol=1e-10)


def test_relative_errors():
    attributed = {"change": torch.tensor([2.0, -0.5, 0.0, 1e-8]), "error": torch.tensor([0.2, 0.1, 0.3, 0.0])}
    e = relative_errors(attributed)
    assert torch.allclose(e[:2], torch.tensor([0.1, 0.2], dtype=torch.float64)) and e[2:].isnan().all()


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


# ---------------------------------------------------------------- the lexicon reading

def test_lexicon_is_documented():
    assert len(NEGATIVE_LEXICON) >= 20 and all(isinstance(g, str) and g for g in NEGATIVE_LEXICON.values())
    assert {"不", "差", "没", "慢", "失望"} <= set(NEGATIVE_LEXICON)


def test_lexicon_positions():
    assert lexicon_positions("不错，不差", {"不": "", "不差": ""}) == [True, False, False, True, True]
    assert lexicon_positions("失望失望", {"失望": ""}) == [True] * 4
    assert lexicon_positions("", {"不": ""}) == []
    with pytest.raises(TypeError, match="string"):
        lexicon_positions(["不"])
    with pytest.raises(ValueError, match="non-empty strings"):
        lexicon_positions("不", {"": "empty"})


def brute_force_chance(marked, k):
    draws = list(itertools.combinations(range(len(marked)), min(k, len(marked))))
    return sum(any(marked[i] for i in draw) for draw in draws) / len(draws)


@given(st.lists(st.sampled_from("不差好很满意失望服务"), min_size=1, max_size=9), st.integers(1, 5),
       st.integers(0, 2 ** 31 - 1))
@settings(max_examples=60, deadline=None)
def test_negative_top_k_against_brute_force(chars, k, seed):
    text = "".join(chars)
    scores = torch.randn(len(text), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    found = negative_top_k(text, scores, k=k)
    marked = lexicon_positions(text)
    top = sorted(range(len(text)), key=lambda i: scores[i].item())[:k]          # the k most negative scores
    assert found["hit"] == any(marked[i] for i in top)
    assert found["contains"] == any(marked)
    assert math.isclose(found["chance"], brute_force_chance(marked, k), abs_tol=1e-12)


def test_negative_top_k_reads_what_the_tokenizer_reads_and_checks_its_input():
    assert negative_top_k("很 差", torch.tensor([0.0, -1.0]), k=1)["hit"]            # spaces are not read
    assert negative_top_k("很差很好", torch.tensor([0.0, -1.0]), k=1, max_chars=2)["hit"]
    with pytest.raises(ValueError, match="one score per character"):
        negative_top_k("很差", torch.tensor([1.0]))
    with pytest.raises(ValueError, match="k must be >= 1"):
        negative_top_k("很差", torch.tensor([1.0, 0.0]), k=0)


def test_measure_reviews(trained):
    config = IGStudyConfig(seeds=(0, 1), ig_steps=(4, 16), batch_size=7)
    result = measure_reviews(trained, config, max_chars=16)
    assert result["reviews"] == 16 and set(result["errors"]) == {"gradient x input", "IG, 4 steps", "IG, 16 steps"}
    assert all(e.shape == (16,) for e in result["errors"].values())
    top = result["top_k"]
    assert top["positive reviews"]["n"] + top["negative reviews"]["n"] == 16
    for v in top.values():
        assert v["share"] == v["hits"] / v["n"] and tuple(v["wilson"]) == wilson_interval(v["hits"], v["n"])
        assert 0 <= v["chance"] <= v["contains"] <= 1


def test_study_config():
    assert IGStudyConfig().seeds == (0, 1, 2, 3, 4) and IGStudyConfig().reviews is None
    assert IGStudyConfig().ig_steps == (16, 64) and IGStudyConfig().top_k == 3
    small = IGStudyConfig.small(top_k=5)
    assert small.seeds == (0, 1) and small.reviews == 300 and small.top_k == 5
    for kwargs, message in [(dict(seeds=()), "non-empty tuple"), (dict(seeds=(1, 1)), "at least 2 distinct"),
                            (dict(seeds=(3,)), "at least 2 distinct"), (dict(seeds=(0, -1)), "at least 2 distinct"),
                            (dict(ig_steps=(0,)), "ig_steps must be >= 1"), (dict(ig_steps=(8, 8)), "must differ"),
                            (dict(rule="simpson"), "unknown rule"), (dict(top_k=0), "top_k must be >= 1"),
                            (dict(reviews=1), "reviews must be >= 2"), (dict(seeds=(0, True)), "tuple of ints")]:
        with pytest.raises(ValueError, match=message):
            IGStudyConfig(**kwargs)


# ---------------------------------------------------------------- the command

def cli(*args, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1", COLUMNS="100")
    return subprocess.run([sys.executable, "-m", "simbook.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, stdin=subprocess.DEVNULL)


def test_ig_study_command(tmp_path):
    out = tmp_path / "run"
    result = cli("ig-study", "--seeds", "0", "1", "--train-steps", "5", "--reviews", "24", "--ig-steps", "4", "8",
                 "--device", "cpu", "--save", str(out), "--no-progress", "--threads", "1")
    assert result.returncode == 0, result.stderr
    assert "relative completeness error" in result.stdout and "IG, 8 steps" in result.stdout
    record = json.loads((out / "record.json").read_text())
    assert record["name"] == "ig-study" and record["status"] == "finished"
    assert record["command"].startswith("simbook ig-study") and record["config"]["seeds"] == [0, 1]
    assert [e["step"] for e in record["evaluations"]] == [0, 1]
    assert all(e["reviews"] == 24 for e in record["evaluations"])
    summary = record["final"]["summary"]
    for method in ("gradient x input", "IG, 4 steps", "IG, 8 steps"):     # the summary is mean_interval over seeds
        expected = mean_interval([e["completeness"][method]["q50"] for e in record["evaluations"]])
        assert all(math.isclose(summary["completeness"][method]["q50"][k], v, rel_tol=1e-9, abs_tol=1e-15)
                   for k, v in expected.items())
    shares = [e["top_k"]["negative reviews"]["share"] - e["top_k"]["positive reviews"]["share"]
              for e in record["evaluations"]]
    assert math.isclose(summary["share_difference"]["mean"], sum(shares) / 2, abs_tol=1e-12)
    assert (out / record["final"]["figure"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert format_ig_study(summary).splitlines()[0].startswith("relative completeness error")


@pytest.mark.parametrize("args, message", [
    (["--seeds", "0", "0"], "seeds must be at least 2 distinct"),
    (["--ig-steps", "0"], "ig_steps must be >= 1"),
    (["--top-k", "0"], "top_k must be >= 1"),
    (["--resume"], "--resume: ig-study trains a few short classifiers and keeps no checkpoint"),
    (["--device", "tpu"], "device"),
])
def test_ig_study_command_refuses_bad_input(tmp_path, args, message):
    result = cli("ig-study", *args, "--save", str(tmp_path / "bad"), timeout=120)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) <= 2
    assert not (tmp_path / "bad").exists()


def test_ig_study_help_has_no_bare_percent():
    result = cli("ig-study", "--help", timeout=60)
    assert result.returncode == 0 and "--seeds" in result.stdout and "--resume" in result.stdout

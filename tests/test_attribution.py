"""simbook.attribution against captum 0.9.0 (IntegratedGradients, LayerIntegratedGradients), closed forms,
convergence rates and argument checks."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from simbook.attribution import (METHODS, attribution_html, integrated_gradients, layer_integrated_gradients,
                                 quadrature)
from simbook.experiments.attribution import (CharCNNClassifier, SentimentConfig, explain_review, sentiment_reviews,
                                             train_sentiment_classifier)

captum_attr = pytest.importorskip("captum.attr")

DEGREE = {"riemann_left": 0, "riemann_right": 0, "riemann_middle": 1, "riemann_trapezoid": 1}


def captum_fix(method, n_steps):
    """captum's trapezoid weights sum to (n-1)/n on the same nodes: scale its result to the exact rule."""
    return n_steps / (n_steps - 1) if method == "riemann_trapezoid" else 1.0


def mlp(seed=0, dims=(6, 16, 3)):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(dims[0], dims[1]), nn.Tanh(), nn.Linear(dims[1], dims[2])).double().eval()


# ---------------------------------------------------------------- quadrature

@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("n", [2, 3, 8, 50])
def test_rules_sum_to_one_and_are_exact_to_their_degree(method, n):
    a, w = quadrature(method, n)
    assert a.shape == w.shape == (n,) and a.dtype == torch.float64
    assert abs(w.sum().item() - 1) < 1e-14 and (a >= 0).all() and (a <= 1).all() and (w > 0).all()
    exact_to = DEGREE.get(method, 2 * n - 1)
    for d in range(exact_to + 1):
        assert abs((w * a ** d).sum().item() - 1 / (d + 1)) < 1e-13, (method, n, d)
    if exact_to < 20:                       # beyond that, Gauss-Legendre's next error is below rounding
        assert abs((w * a ** (exact_to + 1)).sum().item() - 1 / (exact_to + 2)) > 1e-12


def test_nodes_match_captum():
    from captum.attr._utils.approximation_methods import approximation_parameters
    for method in METHODS:
        step_sizes, alphas = approximation_parameters(method)
        a, w = quadrature(method, 10)
        assert np.allclose(a.numpy(), alphas(10), atol=1e-7)
        assert np.allclose(w.numpy(), np.array(step_sizes(10)) * captum_fix(method, 10), atol=1e-7)


def test_gauss_legendre_uses_numpy_nodes():
    t, wt = np.polynomial.legendre.leggauss(13)
    a, w = quadrature("gausslegendre", 13)
    assert np.allclose(a.numpy(), (t + 1) / 2, atol=0) and np.allclose(w.numpy(), wt / 2, atol=0)


# ---------------------------------------------------------------- equal to captum

@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("internal_batch_size", [None, 1, 4, 9, 37, 1000])
def test_integrated_gradients_equals_captum(method, internal_batch_size):
    net = mlp()
    g = torch.Generator().manual_seed(1)
    x, baseline = torch.randn(4, 6, generator=g, dtype=torch.float64), torch.randn(6, generator=g, dtype=torch.float64)
    ours, delta = integrated_gradients(net, x, baseline, target=1, method=method, n_steps=20,
                                       internal_batch_size=internal_batch_size, return_convergence_delta=True)
    ref = captum_attr.IntegratedGradients(net).attribute(x, baseline.expand_as(x), target=1, method=method, n_steps=20,
                                                           internal_batch_size=max(internal_batch_size or 1000, 4))
    assert torch.allclose(ours, ref * captum_fix(method, 20), atol=1e-5, rtol=0)
    change = net(x)[:, 1] - net(baseline.expand_as(x))[:, 1]
    assert torch.allclose(delta, ours.sum(1) - change, atol=1e-12)


@pytest.mark.parametrize("target", [None, 2, [0, 2, 1], torch.tensor([1, 1, 0])])
def test_tuple_inputs_targets_and_extra_args_equal_captum(target):
    torch.manual_seed(3)
    lin_a, lin_b = nn.Linear(5, 3).double(), nn.Linear(4, 3).double()

    def forward(a, b, scale, flag):
        out = torch.tanh(lin_a(a)) * scale[:, None] + torch.sin(lin_b(b.flatten(1))) * flag
        return out.sum(1) if target is None else out

    a = torch.randn(3, 5, dtype=torch.float64)
    b = torch.randn(3, 2, 2, dtype=torch.float64)
    scale = torch.rand(3, dtype=torch.float64) + 0.5
    baselines = (0.5, torch.randn(1, 2, 2, dtype=torch.float64))
    for method in ("gausslegendre", "riemann_middle"):
        ours = integrated_gradients(forward, (a, b), baselines, target=target, additional_forward_args=(scale, 2.0),
                                    method=method, n_steps=16, internal_batch_size=7)
        ref = captum_attr.IntegratedGradients(forward).attribute(
            (a, b), (baselines[0], baselines[1].expand_as(b)), target=target, additional_forward_args=(scale, 2.0),
            method=method, n_steps=16)
        assert isinstance(ours, tuple) and len(ours) == 2
        for o, r in zip(ours, ref):
            assert o.shape == r.shape and torch.allclose(o, r, atol=1e-5, rtol=0)


def test_multiply_by_inputs_false_equals_captum():
    net, x = mlp(4), torch.randn(3, 6, dtype=torch.float64)
    ours = integrated_gradients(net, x, target=0, multiply_by_inputs=False)
    ref = captum_attr.IntegratedGradients(net, multiply_by_inputs=False).attribute(x, target=0)
    assert torch.allclose(ours, ref, atol=1e-5, rtol=0)


def test_float32_cnn_equals_captum():
    torch.manual_seed(5)
    cnn = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                        nn.Linear(4 * 4 * 4, 10)).eval()
    x = torch.rand(5, 1, 8, 8)
    target = [0, 3, 9, 2, 2]
    for ibs in (None, 5, 12, 250):
        ours = integrated_gradients(cnn, x, target=target, internal_batch_size=ibs)
        ref = captum_attr.IntegratedGradients(cnn).attribute(x, target=target, internal_batch_size=ibs or 250)
        assert torch.allclose(ours, ref, atol=1e-5, rtol=1e-4)


class TokenModel(nn.Module):
    """Embedding + one Transformer layer + masked mean; the mask comes in as an extra argument."""

    def __init__(self, vocab=40, width=16):
        super().__init__()
        from simbook.models.transformer import TransformerConfig, TransformerStack
        config = TransformerConfig(vocab_size=vocab, hidden_size=width, num_layers=1, num_heads=2,
                                   intermediate_size=32, dropout=0.0)
        self.token_embedding = nn.Embedding(vocab, width)
        self.encoder, self.head = TransformerStack(config), nn.Linear(width, 3)

    def forward(self, ids, valid):
        h = self.encoder(self.token_embedding(ids), valid[:, None, :].expand(-1, ids.shape[1], -1))
        w = valid.unsqueeze(-1).to(h.dtype)
        return self.head((h * w).sum(1) / w.sum(1))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("internal_batch_size", [None, 3, 10, 200])
def test_layer_integrated_gradients_equals_captum(method, internal_batch_size):
    torch.manual_seed(6)
    model = TokenModel().double().eval()
    ids = torch.randint(1, 40, (3, 7))
    valid = torch.ones_like(ids, dtype=torch.bool)
    valid[0, 5:] = False
    baseline_ids = torch.full_like(ids, 2)
    ours, delta = layer_integrated_gradients(model, model.token_embedding, ids, baseline_ids, target=[0, 1, 2],
                                             additional_forward_args=(valid,), method=method, n_steps=12,
                                             internal_batch_size=internal_batch_size, return_convergence_delta=True)
    ref, ref_delta = captum_attr.LayerIntegratedGradients(model, model.token_embedding).attribute(
        ids, baseline_ids, target=[0, 1, 2], additional_forward_args=(valid,), method=method, n_steps=12,
        internal_batch_size=max(internal_batch_size or 200, 3), return_convergence_delta=True)
    fix = captum_fix(method, 12)
    assert ours.shape == (3, 7, 16) and torch.allclose(ours, ref * fix, atol=1e-5, rtol=0)
    if method != "riemann_trapezoid":       # captum's delta includes its 1/n weight shortfall
        assert torch.allclose(delta, ref_delta, atol=1e-5)


def test_layer_ig_equals_ig_on_embeddings_and_is_complete():
    torch.manual_seed(7)
    model = TokenModel().double().eval()
    ids = torch.randint(1, 40, (2, 6))
    valid = torch.ones_like(ids, dtype=torch.bool)
    ours, delta = layer_integrated_gradients(model, model.token_embedding, ids, 0, target=1,
                                             additional_forward_args=(valid,), return_convergence_delta=True)

    def from_embeddings(e, ids, valid):
        h = model.encoder(e, valid[:, None, :].expand(-1, ids.shape[1], -1))
        return model.head(h.mean(1))

    E, E0 = model.token_embedding(ids).detach(), model.token_embedding(torch.zeros_like(ids)).detach()
    direct = integrated_gradients(from_embeddings, E, E0, target=1, additional_forward_args=(ids, valid))
    assert torch.allclose(ours, direct, atol=1e-12)
    assert delta.abs().max() < 1e-9


# ---------------------------------------------------------------- closed forms and convergence

@given(st.integers(0, 2 ** 31 - 1), st.sampled_from(METHODS), st.integers(2, 6))
@settings(max_examples=25, deadline=None)
def test_linear_model_is_exact_for_any_steps(seed, method, n_steps):
    g = torch.Generator().manual_seed(seed)
    w, c = torch.randn(7, generator=g, dtype=torch.float64), torch.randn(1, generator=g, dtype=torch.float64).item()
    x, b = torch.randn(3, 7, generator=g, dtype=torch.float64), torch.randn(3, 7, generator=g, dtype=torch.float64)
    ig, delta = integrated_gradients(lambda x: x @ w + c, x, b, n_steps=n_steps, method=method,
                                     return_convergence_delta=True)
    assert torch.allclose(ig, w * (x - b), atol=1e-12) and delta.abs().max() < 1e-12


@given(st.integers(0, 2 ** 31 - 1))
@settings(max_examples=15, deadline=None)
def test_quadratic_closed_form(seed):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(4, 4, generator=g, dtype=torch.float64)
    x, b = torch.randn(2, 4, generator=g, dtype=torch.float64), torch.randn(4, generator=g, dtype=torch.float64)
    exact = (x - b) * ((x + b) @ (A + A.T) / 2)
    F = lambda x: torch.einsum("bi,ij,bj->b", x, A, x)
    for method in ("riemann_middle", "riemann_trapezoid", "gausslegendre"):
        assert torch.allclose(integrated_gradients(F, x, b, n_steps=2, method=method), exact, atol=1e-11)
    left = integrated_gradients(F, x, b, n_steps=400, method="riemann_left")
    assert torch.allclose(left, exact, atol=0.05 * exact.abs().max().item() + 1e-9)


def relu_net_exact(W, c, v, x, b):
    """IG of v . relu(W x + c): a sum over the segments between the hidden units' kinks along the path."""
    z0, z1 = W @ b + c, W @ x + c
    cuts = [(-z0[j] / (z1[j] - z0[j])).item() for j in range(len(c)) if (z0[j] < 0) != (z1[j] < 0)]
    knots = sorted({0.0, 1.0, *[t for t in cuts if 0 < t < 1]})
    mean_grad = sum((r - l) * (W.T @ (v * ((z0 + (l + r) / 2 * (z1 - z0)) > 0))) for l, r in zip(knots, knots[1:]))
    return (x - b) * mean_grad


def test_piecewise_linear_relu_net_segment_by_segment():
    g = torch.Generator().manual_seed(11)
    W, c, v = (torch.randn(*s, generator=g, dtype=torch.float64) for s in [(12, 4), (12,), (12,)])
    x, b = torch.randn(5, 4, generator=g, dtype=torch.float64), torch.randn(4, generator=g, dtype=torch.float64)
    exact = torch.stack([relu_net_exact(W, c, v, xi, b) for xi in x])
    F = lambda x: torch.relu(x @ W.T + c) @ v
    errors = [(integrated_gradients(F, x, b, n_steps=n, method="riemann_middle") - exact).abs().max().item()
              for n in (100, 1000, 10000)]
    assert errors[2] < 2e-3 and errors[2] < errors[0]
    assert torch.allclose(exact.sum(1), F(x) - F(b.expand_as(x)), atol=1e-10)


@pytest.mark.parametrize("method, order", [("riemann_left", 1), ("riemann_right", 1), ("riemann_middle", 2),
                                           ("riemann_trapezoid", 2)])
def test_completeness_error_shrinks_at_the_rule_rate(method, order):
    net, x = mlp(8, (5, 16, 1)), torch.randn(6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    steps = [16, 32, 64, 128]
    errs = [integrated_gradients(net, x * 2, n_steps=n, method=method, target=0,
                                 return_convergence_delta=True)[1].abs().sum().item() for n in steps]
    slope = np.polyfit(np.log(steps), np.log(errs), 1)[0]
    assert abs(slope + order) < 0.25, slope


def test_gauss_legendre_converges_fastest():
    net, x = mlp(9, (5, 16, 1)), torch.randn(6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    err = lambda m, n: integrated_gradients(net, x, n_steps=n, method=m, target=0,
                                            return_convergence_delta=True)[1].abs().max().item()
    assert err("gausslegendre", 24) < 1e-10 < err("riemann_middle", 24)


def test_smoothgrad_is_the_mean_over_the_same_noisy_inputs():
    net, x = mlp(10), torch.randn(3, 6, dtype=torch.float64)
    ours, deltas = integrated_gradients(net, x, target=2, noise_samples=5, noise_stdev=0.2,
                                        generator=torch.Generator().manual_seed(0), return_convergence_delta=True)
    noise = 0.2 * torch.randn(15, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = captum_attr.IntegratedGradients(net).attribute(x.repeat(5, 1) + noise, target=2)
    assert torch.allclose(ours, ref.view(5, 3, 6).mean(0), atol=1e-5) and deltas.shape == (5, 3)


def test_results_do_not_depend_on_the_chunking():
    net, x = mlp(12), torch.randn(7, 6, dtype=torch.float64)
    full = integrated_gradients(net, x, target=0, internal_batch_size=10 ** 6)
    for ibs in (None, 1, 7, 8, 50, 349):
        assert torch.allclose(integrated_gradients(net, x, target=0, internal_batch_size=ibs), full, atol=1e-13)


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("kwargs, error, message", [
    (dict(baselines=torch.zeros(5)), ValueError, "not broadcastable"),
    (dict(baselines=torch.zeros(2, 6)), ValueError, "not broadcastable"),
    (dict(baselines=(0.0, 0.0)), ValueError, "2 baselines for 1 inputs"),
    (dict(baselines=float("nan")), ValueError, "baseline 0 is nan"),
    (dict(baselines="zero"), TypeError, "baseline 0 must be"),
    (dict(n_steps=0), ValueError, "n_steps must be >= 1"),
    (dict(n_steps=1, method="riemann_trapezoid"), ValueError, "n_steps must be >= 2"),
    (dict(n_steps=2.5), TypeError, "n_steps must be an int"),
    (dict(method="simpson"), ValueError, "unknown method 'simpson'"),
    (dict(target=3), ValueError, "target \\(3,\\) is out of range"),
    (dict(target=-1), ValueError, "out of range"),
    (dict(target=[0, 1]), ValueError, "one class per example: got 2 for 4"),
    (dict(target=[0, 1, 2, 5]), ValueError, "out of range for 3 outputs"),
    (dict(target=1.5), TypeError, "target must be"),
    (dict(target=None), ValueError, "returns 3 values per example"),
    (dict(internal_batch_size=0), ValueError, "internal_batch_size must be >= 1"),
    (dict(noise_samples=2, noise_stdev=-1.0), ValueError, "noise_stdev"),
])
def test_bad_arguments(kwargs, error, message):
    net, x = mlp(), torch.randn(4, 6, dtype=torch.float64)
    kwargs = {"target": 0, **kwargs}
    with pytest.raises(error, match=message):
        integrated_gradients(net, x, **kwargs)


@pytest.mark.parametrize("inputs, error, message", [
    (torch.randint(0, 3, (4, 6)), TypeError, "float dtype"),
    (torch.full((4, 6), float("nan")), ValueError, "NaN or inf"),
    (torch.zeros(0, 6), ValueError, "empty"),
    (torch.tensor(1.0), ValueError, "batch dimension"),
    ([torch.zeros(4, 6)], TypeError, "tensor or a non-empty tuple"),
    ((torch.zeros(4, 6), torch.zeros(3, 6)), ValueError, "same batch size"),
])
def test_bad_inputs(inputs, error, message):
    with pytest.raises(error, match=message):
        integrated_gradients(lambda *xs: xs[0].sum(1), inputs)


def test_bad_models():
    x = torch.randn(4, 6)
    with pytest.raises(TypeError, match="must return a tensor"):
        integrated_gradients(lambda x: x.sum().item(), x)
    with pytest.raises(ValueError, match="one row per example"):
        integrated_gradients(lambda x: x.sum(), x)
    with pytest.raises(ValueError, match="does not depend"):
        integrated_gradients(lambda x: torch.ones(x.shape[0]), x)
    with pytest.raises(TypeError, match="forward must be callable"):
        integrated_gradients("model", x)


def test_layer_ig_bad_input():
    model = TokenModel().eval()
    ids = torch.randint(1, 40, (2, 5))
    valid = torch.ones_like(ids, dtype=torch.bool)
    with pytest.raises(TypeError, match="nn.Module"):
        layer_integrated_gradients(model, "token_embedding", ids, additional_forward_args=(valid,), target=0)
    with pytest.raises(ValueError, match="ran 2 times"):
        layer_integrated_gradients(lambda i, v: model(i, v) + model(i, v), model.token_embedding, ids,
                                   additional_forward_args=(valid,), target=0)
    with pytest.raises(ValueError, match="ran 0 times"):
        layer_integrated_gradients(model, nn.Linear(2, 2), ids, additional_forward_args=(valid,), target=0)
    with pytest.raises(ValueError, match="not broadcastable"):
        layer_integrated_gradients(model, model.token_embedding, ids, torch.zeros(3, dtype=torch.long),
                                   additional_forward_args=(valid,), target=0)
    with pytest.raises(ValueError, match="returns 3 values"):
        layer_integrated_gradients(model, model.token_embedding, ids, additional_forward_args=(valid,))


# ---------------------------------------------------------------- chapter helpers

def test_sentiment_reviews_shipped_and_own_folder(tmp_path):
    texts, labels = sentiment_reviews()
    assert len(texts) == 17363 and len(set(texts)) == len(texts) and sum(labels) == 8332
    (tmp_path / "pos.txt").write_text("好\n很好\n好\n一般\n", encoding="utf-8")
    (tmp_path / "neg.txt").write_text("差\n一般\n", encoding="utf-8")
    assert sentiment_reviews(tmp_path) == (["好", "很好", "差"], [1, 1, 0])
    (tmp_path / "neg.txt").write_text("好\n", encoding="utf-8")
    with pytest.raises(ValueError, match="one review of each class"):
        sentiment_reviews(tmp_path)
    with pytest.raises(FileNotFoundError):
        sentiment_reviews(tmp_path / "missing")


def test_char_cnn_classifier_and_html():
    model = CharCNNClassifier(20, width=8, channels=6).eval()
    ids = torch.tensor([[2, 5, 6, 3, 0], [2, 7, 3, 0, 0]])
    valid = ids != 0
    logits = model(ids, valid)
    assert logits.shape == (2, 2)
    assert torch.allclose(model(ids, valid, model.token_embedding(ids)), logits)
    assert torch.allclose(model(ids[1:, :3], valid[1:, :3]), logits[1:])      # padding does not matter
    with pytest.raises(ValueError, match="at least one real token"):
        model(ids, torch.zeros_like(valid))
    text = attribution_html(["好", "<b>"], [0.5, -1.0])
    assert "rgba(214, 39, 40, 0.50)" in text and "rgba(31, 119, 180, 1.00)" in text and "&lt;b&gt;" in text
    with pytest.raises(ValueError, match="one score per token"):
        attribution_html(["a"], [1.0, 2.0])
    with pytest.raises(ValueError, match="NaN"):
        attribution_html(["a"], [float("nan")])


def test_inputs_that_require_grad_and_tensor_baselines_keep_the_callers_graph_apart():
    net = mlp(13)
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    ours = integrated_gradients(net, x, b, target=0)
    ref = integrated_gradients(net, x.detach(), b.detach(), target=0)
    assert torch.equal(ours, ref) and x.grad is None and b.grad is None


def test_model_returning_one_column_needs_no_target():
    net = mlp(14, (6, 8, 1))
    x = torch.randn(3, 6, dtype=torch.float64)
    assert torch.allclose(integrated_gradients(net, x), integrated_gradients(net, x, target=0), atol=0)
    ref = captum_attr.IntegratedGradients(net).attribute(x)
    assert torch.allclose(integrated_gradients(net, x), ref, atol=1e-5)


def test_sentiment_classifier_trains_with_the_trainer(tmp_path):
    good = ["很好", "非常好", "满意", "不错", "好评", "很满意", "挺好", "推荐"]
    bad = ["很差", "非常差", "失望", "不好", "差评", "很失望", "太差", "退货"]
    (tmp_path / "pos.txt").write_text("\n".join(good), encoding="utf-8")
    (tmp_path / "neg.txt").write_text("\n".join(bad), encoding="utf-8")
    config = SentimentConfig(held_out=4, min_count=1, max_chars=8, width=8, channels=8, steps=30, batch_size=4,
                             lr=1e-2, eval_every=10)
    runs = [train_sentiment_classifier(config, directory=tmp_path, seed=0, device="cpu") for _ in range(2)]
    assert runs[0]["losses"] == runs[1]["losses"] and len(runs[0]["losses"]) == 30      # seeded: reproducible
    assert [e["step"] for e in runs[0]["evaluations"]] == [10, 20, 30]
    assert runs[0]["losses"][-1] < runs[0]["losses"][0]
    chars, scores, change, delta = explain_review(runs[0]["model"], runs[0]["tokenizer"], "很好", max_chars=8)
    assert chars == ["[CLS]", "很", "好", "[SEP]"] and abs(scores.sum().item() - change) < 0.05 * max(1.0, abs(change))
    for kwargs, message in [({"steps": 0}, "steps must be >= 1"), ({"lr": 0.0}, "lr must be"),
                            ({"weight_decay": -1.0}, "weight_decay must be")]:
        with pytest.raises(ValueError, match=message):
            SentimentConfig(**kwargs)
    with pytest.raises(ValueError, match="cannot hold out"):
        train_sentiment_classifier(SentimentConfig(held_out=16), directory=tmp_path, device="cpu")


def test_ig_sentiment_command(tmp_path):
    import json
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    simbook = shutil.which("simbook") or str(Path(sys.executable).parent / "simbook")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = tmp_path / "run"
    result = subprocess.run([simbook, "ig-sentiment", "--steps", "3", "--eval-every", "3", "--explain", "1",
                             "--device", "cpu", "--save", str(out), "--no-progress"],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    assert "held-out accuracy on 1500 reviews" in result.stdout and "completeness error" in result.stdout
    record = json.loads((out / "record.json").read_text())
    assert record["status"] == "finished" and record["command"].startswith("simbook ig-sentiment --steps 3")
    assert [e["step"] for e in record["evaluations"]] == [3] and 0 <= record["final"]["accuracy"] <= 1
    bad = subprocess.run([simbook, "ig-sentiment", "--steps", "0", "--save", str(tmp_path / "bad")],
                         capture_output=True, text=True, timeout=120, env=env)
    assert bad.returncode == 2 and "steps must be >= 1" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "bad").exists()

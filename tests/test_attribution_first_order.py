"""simbook.attribution.gradient_x_input: the first-order (Taylor) split, against captum's InputXGradient and
LayerGradientXActivation and against closed forms of its completeness error (the Taylor remainder)."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from simbook.attribution import gradient_x_input, integrated_gradients
from simbook.experiments.attribution import CharCNNClassifier

captum_attr = pytest.importorskip("captum.attr")


def mlp(seed=0, dims=(6, 16, 3)):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(dims[0], dims[1]), nn.Tanh(), nn.Linear(dims[1], dims[2])).double().eval()


def test_equals_captum_input_x_gradient_for_a_zero_baseline():
    net, x = mlp(1), torch.randn(5, 6, dtype=torch.float64)
    ours = gradient_x_input(net, x, target=[0, 1, 2, 0, 1])
    ref = captum_attr.InputXGradient(net).attribute(x, target=[0, 1, 2, 0, 1])
    assert torch.allclose(ours, ref, atol=1e-12)


def test_layer_version_equals_captum_layer_gradient_x_activation():
    torch.manual_seed(3)
    model = CharCNNClassifier(30, width=8, channels=12).double().eval()
    ids = torch.randint(1, 30, (4, 9))
    ids[2, 6:] = 0
    valid = ids != 0
    log_odds = lambda ids, valid: model(ids, valid).diff(dim=-1).squeeze(-1)
    ours, delta = gradient_x_input(log_odds, ids, 0, layer=model.token_embedding, additional_forward_args=(valid,),
                                   return_convergence_delta=True)
    ref = captum_attr.LayerGradientXActivation(log_odds, model.token_embedding).attribute(
        ids, additional_forward_args=(valid,))
    assert torch.allclose(ours, ref, atol=1e-10)          # the [PAD] embedding is zero: x - x' is the activation
    with torch.no_grad():
        change = log_odds(ids, valid) - log_odds(torch.zeros_like(ids), valid)
    assert torch.allclose(delta, ours.sum((1, 2)) - change, atol=1e-10)


@given(st.integers(0, 2 ** 31 - 1))
@settings(max_examples=20, deadline=None)
def test_exact_for_affine_models(seed):
    g = torch.Generator().manual_seed(seed)
    w, c = torch.randn(7, generator=g, dtype=torch.float64), torch.randn(1, generator=g, dtype=torch.float64).item()
    x, b = torch.randn(3, 7, generator=g, dtype=torch.float64), torch.randn(3, 7, generator=g, dtype=torch.float64)
    attributions, delta = gradient_x_input(lambda x: x @ w + c, x, b, return_convergence_delta=True)
    assert torch.allclose(attributions, w * (x - b), atol=1e-12) and delta.abs().max() < 1e-12


@given(st.integers(0, 2 ** 31 - 1))
@settings(max_examples=20, deadline=None)
def test_quadratic_error_is_the_second_order_term(seed):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(5, 5, generator=g, dtype=torch.float64)
    x, b = torch.randn(4, 5, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)
    F = lambda x: torch.einsum("bi,ij,bj->b", x, A, x)
    _, delta = gradient_x_input(F, x, b, return_convergence_delta=True)
    d = x - b
    assert torch.allclose(delta, torch.einsum("bi,ij,bj->b", d, A, d), atol=1e-11)    # d'Ad = (1/2) d' H d
    _, ig_delta = integrated_gradients(F, x, b, n_steps=2, return_convergence_delta=True)
    assert ig_delta.abs().max() < 1e-11


def test_cubic_error_is_the_second_and_third_order_terms():
    g = torch.Generator().manual_seed(4)
    c = torch.randn(6, generator=g, dtype=torch.float64)
    x, b = torch.randn(3, 6, generator=g, dtype=torch.float64), torch.randn(3, 6, generator=g, dtype=torch.float64)
    _, delta = gradient_x_input(lambda x: (c * x ** 3).sum(1), x, b, return_convergence_delta=True)
    d = x - b
    assert torch.allclose(delta, (c * (3 * x * d ** 2 - d ** 3)).sum(1), atol=1e-11)


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


def test_relu_counterexample():
    f = lambda x: 1 - torch.relu(1 - x)
    x = torch.tensor([[2.0]], dtype=torch.float64)
    attributions, delta = gradient_x_input(f, x, return_convergence_delta=True)
    assert attributions.item() == 0 and delta.item() == -1


def test_bad_input():
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

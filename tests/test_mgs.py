"""simbook.optim.mgs: the sampling view of optimisation and MLE-guided parameter search."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call

from simbook.experiments.mgs import RepetitionConfig, zero_one_error
from simbook.optim.mgs import (MGS, apply_direction, effective_sample_size, evaluate_candidates, importance_weights,
                               loaded_parameters, mgs_direction, mixture_log_density, sample_candidates,
                               second_order_step_distribution, surrogate_step, trainable_parameters)


class Point(nn.Module):
    def __init__(self, x):
        super().__init__()
        self.x = nn.Parameter(torch.as_tensor(x, dtype=torch.float32).clone())

    def forward(self):
        return self.x


def _quadratic(point, hessian, minimum):
    def loss(params):
        r = functional_call(point, params, ()) - minimum
        return 0.5 * r @ hessian @ r
    return loss


def _flat(tensors):
    return torch.cat([t.flatten() for t in tensors.values()])


H = torch.tensor([[2.0, 0.5, 0.0], [0.5, 1.0, 0.2], [0.0, 0.2, 1.5]])
MINIMUM = torch.tensor([0.5, -1.0, 0.8])


# --- importance weights ----------------------------------------------------------------------------------------------

@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-50, 50), min_size=1, max_size=20), st.floats(1e-3, 1e3), st.integers(0, 2**31 - 1))
def test_importance_weights_normalise(losses, alpha, seed):
    losses = torch.tensor(losses, dtype=torch.float64)
    log_q = torch.randn(len(losses), generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 10
    w = importance_weights(losses, log_q, alpha)
    assert w.shape == losses.shape and (w >= 0).all()
    assert abs(float(w.sum()) - 1) < 1e-9
    # the loss at the current point and constants in log q cancel
    assert torch.allclose(w, importance_weights(losses + 3.0, log_q - 11.0, alpha), atol=1e-12)
    assert 1 - 1e-9 <= effective_sample_size(w) <= len(losses) + 1e-9


def test_importance_weights_against_direct_formula():
    losses, log_q, alpha = torch.tensor([0.3, 0.1, 0.7]), torch.tensor([-1.0, 0.5, 0.0]), 0.2
    rho_over_q = torch.exp(-losses.double() / alpha) / torch.exp(log_q.double())
    assert torch.allclose(importance_weights(losses, log_q, alpha).double(), rho_over_q / rho_over_q.sum(), atol=1e-6)


def test_importance_weights_survive_tiny_temperatures():
    w = importance_weights(torch.tensor([1.0, 1.0 + 1e-3, 2.0]), torch.zeros(3), 1e-6)
    assert torch.isfinite(w).all() and w[0] > 0.999


def test_mixture_density_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    guide = {"a": torch.randn(2, 3, generator=g), "b": torch.randn(4, generator=g)}
    noise = {"a": 0.3, "b": 0.7}
    deltas = sample_candidates(guide, noise, 7, mix=0.25, generator=g)
    ours = mixture_log_density(deltas, guide, noise, mix=0.25)
    flat = torch.cat([deltas["a"].flatten(1), deltas["b"].flatten(1)], 1).double()
    scale = torch.cat([torch.full((6,), 0.3), torch.full((4,), 0.7)]).double()
    u = torch.cat([guide["a"].flatten(), guide["b"].flatten()]).double()
    zero = torch.distributions.Normal(torch.zeros(10, dtype=torch.float64), scale).log_prob(flat).sum(1)
    around = torch.distributions.Normal(u, scale).log_prob(flat).sum(1)
    reference = torch.logsumexp(torch.stack([math.log(0.25) + zero, math.log(0.75) + around]), 0)
    difference = ours - reference                                   # equal up to one shared constant
    assert torch.allclose(difference, difference[0].expand(7), atol=1e-9)


def test_sample_candidates_stratifies_the_mixture():
    guide = {"x": torch.full((1000,), 5.0)}
    deltas = sample_candidates(guide, {"x": 0.1}, 4, mix=0.5, generator=torch.Generator().manual_seed(0))["x"]
    means = deltas.mean(1)
    assert torch.allclose(means[:2], torch.zeros(2), atol=0.02) and torch.allclose(means[2:], torch.full((2,), 5.0),
                                                                                   atol=0.02)
    assert torch.allclose(deltas.std(1), torch.full((4,), 0.1), rtol=0.1)


# --- the derivations -----------------------------------------------------------------------------------------------

def test_second_order_distribution_is_the_exact_boltzmann_distribution_of_a_quadratic():
    Hd, m = H.double(), MINIMUM.double()
    theta = torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64)
    grad = Hd @ (theta - m)
    steps = torch.randn(20, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    loss = lambda x: 0.5 * (x - m) @ Hd @ (x - m)
    for alpha in (0.05, 1.0, 7.0):
        p = second_order_step_distribution(grad, Hd, alpha)
        log_ratio = p.log_prob(steps) + torch.stack([loss(theta + s) - loss(theta) for s in steps]) / alpha
        assert float(log_ratio.max() - log_ratio.min()) < 1e-9        # same distribution up to normalisation
        assert torch.allclose(p.mean, -torch.linalg.solve(Hd, grad))  # Newton step
        assert torch.allclose(theta + p.mean, m)
        assert torch.allclose(p.covariance_matrix, alpha * torch.linalg.inv(Hd))


def test_importance_sampled_mean_is_the_newton_step_on_a_quadratic():
    point = Point(torch.zeros(3))
    step = mgs_direction(point, _quadratic(point, H, MINIMUM), None, num_candidates=100_000, alpha=0.5, noise=3.0,
                         weighting="importance", generator=torch.Generator().manual_seed(0)).direction["x"]
    newton = MINIMUM                                                  # theta = 0: the Newton step lands on the minimum
    assert (step - newton).norm() < 0.05 * newton.norm()


def test_tilted_mean_is_the_levenberg_marquardt_step_on_a_quadratic():
    point, sigma = Point(torch.zeros(3)), 0.5
    grad = H @ (torch.zeros(3) - MINIMUM)
    for alpha in (1.0, 0.2):
        step = mgs_direction(point, _quadratic(point, H, MINIMUM), None, num_candidates=100_000, alpha=alpha,
                             noise=sigma, generator=torch.Generator().manual_seed(1)).direction["x"]
        exact = -torch.linalg.solve(alpha / sigma**2 * torch.eye(3) + H, grad)
        assert (step - exact).norm() < 0.05 * exact.norm()


def test_sampled_mean_tends_to_minus_eta_grad_as_alpha_goes_to_zero():
    # isotropic quadratic with H = I / eta: the exact mean is -(alpha/sigma^2 + 1/eta)^-1 g -> -eta g as alpha -> 0
    eta, sigma = 0.5, 2.0
    point = Point(torch.zeros(3))
    loss = _quadratic(point, torch.eye(3) / eta, MINIMUM)
    target = -eta * (torch.zeros(3) - MINIMUM) / eta
    errors = []
    for alpha in (2.0, 0.2, 0.02):
        step = mgs_direction(point, loss, None, num_candidates=200_000, alpha=alpha, noise=sigma,
                             generator=torch.Generator().manual_seed(2)).direction["x"]
        errors.append(float((step - target).norm() / target.norm()))
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.03


def test_small_noise_step_aligns_with_minus_gradient():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    x, y = torch.randn(32, 4), torch.randn(32, 1)
    loss = lambda p: (functional_call(model, p, (x,)) - y).pow(2).mean()
    leaves = {k: v.clone().requires_grad_() for k, v in trainable_parameters(model).items()}
    grad = torch.cat([g.flatten() for g in torch.autograd.grad(loss(leaves), list(leaves.values()))])
    for weighting in ("tilted", "importance"):
        step = mgs_direction(model, loss, loss, num_candidates=4, alpha=1e-4, noise=1e-5, step_size=0.05,
                             weighting=weighting, generator=torch.Generator().manual_seed(0))
        cosine = nn.functional.cosine_similarity(_flat(step.direction), -grad, dim=0)
        assert cosine > 0.99, (weighting, float(cosine))


def test_surrogate_step_clips_and_scales():
    point = Point(torch.tensor([3.0, 4.0]))
    loss = lambda p: 0.5 * functional_call(point, p, ()).pow(2).sum()   # gradient = x, norm 5
    u = surrogate_step(loss, trainable_parameters(point), step_size=0.1, max_grad_norm=1.0)["x"]
    assert torch.allclose(u, torch.tensor([-0.06, -0.08]))
    u = surrogate_step(loss, trainable_parameters(point), step_size=0.1)["x"]
    assert torch.allclose(u, torch.tensor([-0.3, -0.4]))


# --- candidates without copies ----------------------------------------------------------------------------------------

def test_candidates_vmapped_equal_looped_and_model_untouched(monkeypatch):
    import copy
    monkeypatch.setattr(copy, "deepcopy", lambda *a, **k: pytest.fail("MGS must not deep-copy the model"))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3))
    x, y = torch.randn(50, 5), torch.randint(3, (50,))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    task = lambda p: zero_one_error(functional_call(model, p, (x,)), y)
    surrogate = lambda p: nn.functional.cross_entropy(functional_call(model, p, (x,)), y)
    a = mgs_direction(model, task, surrogate, num_candidates=6, vectorize=True, generator=torch.Generator().manual_seed(3))
    b = mgs_direction(model, task, surrogate, num_candidates=6, vectorize=False, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.task_losses, b.task_losses) and torch.allclose(a.weights, b.weights)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert a.evaluations == 6 and abs(float(a.weights.sum()) - 1) < 1e-9


def test_vmap_is_used_when_possible():
    calls = []
    point = Point(torch.zeros(2))

    def task(p):
        calls.append(1)
        return functional_call(point, p, ()).sum()

    deltas = {"x": torch.randn(5, 2)}
    losses = evaluate_candidates(task, trainable_parameters(point), deltas)
    assert len(calls) == 1 and torch.allclose(losses, deltas["x"].sum(1).double())


def test_stateful_task_loss_falls_back_to_the_loop_and_restores_the_model():
    point = Point(torch.tensor([1.0, 2.0]))

    def task(p):
        with loaded_parameters(point, p):
            return float(point.x.sum())                                 # .item(): cannot be vmapped

    deltas = {"x": torch.tensor([[0.5, 0.5], [-1.0, 0.0]])}
    assert evaluate_candidates(task, trainable_parameters(point), deltas).tolist() == [4.0, 2.0]
    assert point.x.tolist() == [1.0, 2.0]
    with pytest.raises(RuntimeError):
        with loaded_parameters(point, {"x": torch.zeros(2)}):
            raise RuntimeError("boom")
    assert point.x.tolist() == [1.0, 2.0]


def test_apply_direction_plain_and_with_an_optimizer():
    point = Point(torch.tensor([1.0, 1.0]))
    apply_direction(point, {"x": torch.tensor([0.5, -0.5])})
    assert point.x.tolist() == [1.5, 0.5]
    optimizer = torch.optim.SGD(point.parameters(), lr=0.1)
    apply_direction(point, {"x": torch.tensor([1.0, 2.0])}, optimizer)      # grad = -direction; SGD subtracts it
    assert torch.allclose(point.x, torch.tensor([1.6, 0.7]))


def test_mgs_lowers_a_non_differentiable_loss():
    torch.manual_seed(0)
    x = torch.randn(200, 2)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    model = nn.Linear(2, 2)
    task = lambda p: zero_one_error(functional_call(model, p, (x,)), y)
    surrogate = lambda p: nn.functional.cross_entropy(functional_call(model, p, (x,)), y)
    start = float(task(trainable_parameters(model)))
    generator = torch.Generator().manual_seed(0)
    for _ in range(30):
        apply_direction(model, mgs_direction(model, task, surrogate, num_candidates=4, alpha=0.01, noise=0.05,
                                             step_size=0.5, generator=generator).direction)
    assert float(task(trainable_parameters(model))) < min(0.1, start / 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_mgs_on_cuda():
    model = nn.Linear(3, 2).cuda()
    x, y = torch.randn(20, 3, device="cuda"), torch.randint(2, (20,), device="cuda")
    task = lambda p: zero_one_error(functional_call(model, p, (x,)), y)
    surrogate = lambda p: nn.functional.cross_entropy(functional_call(model, p, (x,)), y)
    step = mgs_direction(model, task, surrogate, num_candidates=4, generator=torch.Generator("cuda").manual_seed(0))
    assert step.direction["weight"].device.type == "cuda"


# --- bad input --------------------------------------------------------------------------------------------------------

@pytest.fixture
def setup():
    point = Point(torch.zeros(3))
    return point, _quadratic(point, H, MINIMUM)


@pytest.mark.parametrize("k", [0, -3])
def test_rejects_k_below_one(setup, k):
    point, loss = setup
    with pytest.raises(ValueError, match="num_candidates"):
        mgs_direction(point, loss, None, num_candidates=k)


def test_rejects_non_int_k(setup):
    point, loss = setup
    with pytest.raises(TypeError, match="num_candidates"):
        mgs_direction(point, loss, None, num_candidates=2.5)


@pytest.mark.parametrize("alpha", [0.0, -1.0, float("nan"), float("inf")])
def test_rejects_bad_alpha(setup, alpha):
    point, loss = setup
    with pytest.raises(ValueError, match="alpha"):
        mgs_direction(point, loss, None, alpha=alpha)
    with pytest.raises(ValueError, match="alpha"):
        importance_weights(torch.zeros(2), torch.zeros(2), alpha)
    with pytest.raises(ValueError, match="alpha"):
        second_order_step_distribution(torch.ones(3), H, alpha)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("vectorize", [True, False])
def test_rejects_non_finite_task_loss(setup, bad, vectorize):
    point, _ = setup
    loss = lambda p: functional_call(point, p, ()).sum() * 0 + bad
    with pytest.raises(ValueError, match="non-finite"):
        mgs_direction(point, loss, None, vectorize=vectorize)


def test_rejects_a_task_loss_that_is_not_a_scalar(setup):
    point, _ = setup
    with pytest.raises(ValueError, match="scalar"):
        mgs_direction(point, lambda p: functional_call(point, p, ()), None)
    with pytest.raises(ValueError, match="scalar"):
        mgs_direction(point, lambda p: functional_call(point, p, ()), None, vectorize=False)


def test_rejects_bad_surrogate_and_options(setup):
    point, loss = setup
    with pytest.raises(ValueError, match="surrogate loss is not finite"):
        mgs_direction(point, loss, lambda p: functional_call(point, p, ()).sum() * float("nan"))
    with pytest.raises(ValueError, match="weighting"):
        mgs_direction(point, loss, None, weighting="softmax")
    with pytest.raises(ValueError, match="noise"):
        mgs_direction(point, loss, None, noise=0.0)
    with pytest.raises(ValueError, match="relative_noise needs a surrogate"):
        mgs_direction(point, loss, None, relative_noise=True)
    with pytest.raises(ValueError, match="mix"):
        mgs_direction(point, loss, None, mix=1.5)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        mgs_direction(lambda: None, loss, None)


def test_rejects_bad_shapes_and_hessians():
    with pytest.raises(ValueError, match="log_proposal has size"):
        importance_weights(torch.zeros(3), torch.zeros(2), 1.0)
    with pytest.raises(TypeError, match="float dtype"):
        importance_weights(torch.zeros(3, dtype=torch.long), torch.zeros(3), 1.0)
    with pytest.raises(ValueError, match="positive definite"):
        second_order_step_distribution(torch.ones(3), -H, 1.0)
    with pytest.raises(ValueError, match="symmetric"):
        second_order_step_distribution(torch.ones(3), H + torch.triu(torch.ones(3, 3), 1), 1.0)
    with pytest.raises(ValueError, match="NaN or inf"):
        second_order_step_distribution(torch.tensor([1.0, float("nan"), 0.0]), H, 1.0)
    with pytest.raises(ValueError, match="unknown parameter"):
        apply_direction(Point(torch.zeros(2)), {"y": torch.zeros(2)})
    with pytest.raises(ValueError, match="shape"):
        with loaded_parameters(Point(torch.zeros(2)), {"x": torch.zeros(3)}):
            pass


# --- the command ------------------------------------------------------------------------------------------------------

def test_cli_refuses_bad_values_in_one_line(capsys, tmp_path):
    from simbook.cli import main
    with pytest.raises(SystemExit) as e:
        main(["mgs", "--finetune-steps", "0", "--no-progress", "--save", str(tmp_path / "a")])
    assert e.value.code == 2 and "finetune_steps must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["mgs", "--alpha", "0", "--pretrain-steps", "1", "--finetune-steps", "1", "--num-prompts", "4",
              "--no-progress", "--save", str(tmp_path / "b")])
    assert e.value.code == 2 and "alpha" in capsys.readouterr().err


def test_cli_tiny_run_prints_the_table_and_writes_the_record(capsys, tmp_path):
    import json

    from simbook.cli import build_parser, main
    from simbook.training import config_from_args

    assert main(["mgs", "--pretrain-steps", "2", "--finetune-steps", "2", "--num-prompts", "4", "--cap", "8",
                 "--width", "16", "--no-progress", "--device", "cpu", "--save", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    for word in ("pretrained", "MLE", "MGS", "repeat-4", "perplexity", "effective sample size"):
        assert word in out
    record = json.loads((tmp_path / "run" / "record.json").read_text())
    assert record["status"] == "finished" and record["config"]["width"] == 16 and "MGS repeat_4" in record["final"]
    assert config_from_args(RepetitionConfig, build_parser().parse_args(["mgs"])) == RepetitionConfig()


def test_mgs_optimizer_in_the_trainer_takes_mgs_steps():
    from simbook.training import fit

    x, y = torch.randn(16, 3, generator=torch.Generator().manual_seed(0)), torch.arange(16) % 2
    torch.manual_seed(0)
    model, manual = nn.Linear(3, 2), nn.Linear(3, 2)
    manual.load_state_dict(model.state_dict())
    task = lambda p, batch: zero_one_error(functional_call(model, p, (batch[0],)), batch[1])
    optimizer = MGS(model, task, lr=0.3, num_candidates=4, alpha=0.1, noise=0.05,
                    generator=torch.Generator().manual_seed(1))
    batch_fn = lambda step, g: (x, y)
    fit(model, lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]), batch_fn, steps=3, optimizer=optimizer,
        before_update=lambda m, b, s: optimizer.set_batch(b), device="cpu", progress=False)
    generator = torch.Generator().manual_seed(1)
    manual_task = lambda p: zero_one_error(functional_call(manual, p, (x,)), y)
    surrogate = lambda p: nn.functional.cross_entropy(functional_call(manual, p, (x,)), y)
    for _ in range(3):
        step = mgs_direction(manual, manual_task, surrogate, num_candidates=4, alpha=0.1, noise=0.05, step_size=0.3,
                             generator=generator)
        apply_direction(manual, step.direction)
    for p, q in zip(model.parameters(), manual.parameters()):
        torch.testing.assert_close(p, q)
    assert len(optimizer.trace) == 3 and optimizer.evaluations == 12
    with pytest.raises(RuntimeError, match="set_batch"):
        MGS(manual, task).step()
    with pytest.raises(ValueError, match="either surrogate_loss or guide"):
        mgs_direction(manual, manual_task, surrogate, guide=trainable_parameters(manual))

"""simbook.optim.clipping: equality with torch's clip_grad_norm_, an fp64-accurate norm, the factor-2 equivalence of
hard and soft clipping, the NaN/inf policy, the optimizer wrapper, the smoothness estimator and bad input."""
import copy
import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from simbook.experiments.smoothness import (LSTMLanguageModel, SmoothnessConfig, char_stream, smoothness_trajectory,
                                            train_lm)
from simbook.optim.clipping import (ClippedOptimizer, GradientClipper, clip_coefficient, clip_grad_norm, fit_smoothness,
                                    global_norm, local_smoothness)
from simbook.utils import optimizer_step


def _net(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(7, 33), torch.nn.Tanh(), torch.nn.Linear(33, 5)).to(dtype)


def _backward(net, seed=1, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 7, generator=g, dtype=next(net.parameters()).dtype)
    (net(x).pow(2).sum() * scale).backward()


# --- equality with torch where they overlap -------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("max_norm", [1e-3, 0.5, 3.0, 1e6])
def test_hard_clip_equals_torch(dtype, max_norm):
    ours, theirs = _net(dtype=dtype), _net(dtype=dtype)
    _backward(ours), _backward(theirs)
    norm = clip_grad_norm(ours.parameters(), max_norm)
    ref = torch.nn.utils.clip_grad_norm_(theirs.parameters(), max_norm)
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    assert norm == pytest.approx(ref.item(), rel=tol)
    for a, b in zip(ours.parameters(), theirs.parameters()):       # torch divides by ‖g‖ + 1e-6, we by ‖g‖
        torch.testing.assert_close(a.grad, b.grad, rtol=tol * 10 + 1e-6 / norm, atol=0)


@pytest.mark.parametrize("flat", [True, False])
@pytest.mark.parametrize("make", [lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
                                  lambda p: torch.optim.Adam(p, lr=1e-2)])
def test_wrapper_trains_like_torch_clip_then_step(flat, make):
    ours, theirs = _net(), _net()
    wrapped, plain = ClippedOptimizer(make(ours.parameters()), 0.7, flat=flat), make(theirs.parameters())
    for step in range(5):
        _backward(ours, seed=step, scale=3.0)
        wrapped.step()
        wrapped.zero_grad()
        _backward(theirs, seed=step, scale=3.0)
        torch.nn.utils.clip_grad_norm_(theirs.parameters(), 0.7)
        plain.step()
        plain.zero_grad()
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert len(wrapped.clipper.norms) == 5 and wrapped.clipper.num_clipped == 5


def test_optimizer_step_clip_argument():
    a, b, c = _net(), _net(), _net()
    x = torch.randn(4, 7, generator=torch.Generator().manual_seed(3))
    clipper = GradientClipper(0.1)
    wrapped = ClippedOptimizer(torch.optim.SGD(a.parameters(), lr=0.5), 0.1, flat=False)
    optimizer_step(wrapped, a(x).pow(2).sum(), 0)
    optimizer_step(torch.optim.SGD(b.parameters(), lr=0.5), b(x).pow(2).sum(), 0, clip=clipper)
    opt = torch.optim.SGD(c.parameters(), lr=0.5)
    opt.zero_grad()
    c(x).pow(2).sum().backward()
    torch.nn.utils.clip_grad_norm_(c.parameters(), 0.1)
    opt.step()
    for p, q, r in zip(a.parameters(), b.parameters(), c.parameters()):
        torch.testing.assert_close(p, r)
        torch.testing.assert_close(q, r)
    assert len(clipper.norms) == 1 and clipper.clipped == [True]


def test_optimizer_step_without_clip_is_unchanged():
    a, b = _net(), _net()
    x = torch.randn(4, 7, generator=torch.Generator().manual_seed(3))
    loss = optimizer_step(torch.optim.SGD(a.parameters(), lr=0.5), a(x).pow(2).sum(), 0)
    opt = torch.optim.SGD(b.parameters(), lr=0.5)
    ref = b(x).pow(2).sum()
    opt.zero_grad()
    ref.backward()
    opt.step()
    assert loss == ref.item()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


# --- the norm ---------------------------------------------------------------------------------------------------------

def test_norm_is_fp64_accurate_on_large_inputs():
    g = torch.Generator().manual_seed(0)
    big = torch.rand(3_000_000, generator=g) + 0.5                 # all positive: rounding errors do not cancel
    parts = [torch.rand(n, generator=g) for n in (1, 100, 4096, 4097, 70_000, 1_000_003)]
    for tensors in ([big], parts, [big, *parts]):
        ref = math.sqrt(sum(t.double().square().sum().item() for t in tensors))
        assert abs(global_norm(tensors) - ref) / ref < 1e-6


def test_norm_of_half_precision_and_overflow():
    x = torch.randn(10_000, generator=torch.Generator().manual_seed(0))
    ref = x.double().norm().item()
    assert global_norm(x.to(torch.bfloat16)) == pytest.approx(x.to(torch.bfloat16).double().norm().item(), rel=1e-6)
    huge = x * 1e20                                                # squares overflow fp32, the norm does not
    assert global_norm(huge) == pytest.approx(ref * 1e20, rel=1e-6)


# --- the factor-2 equivalence (a property) -----------------------------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=1, max_size=50),
       st.floats(1e-6, 1e6, allow_nan=False, allow_infinity=False))
def test_soft_clip_is_within_factor_two_of_hard_clip(values, gamma):
    g = torch.tensor(values, dtype=torch.float64)
    norm = global_norm(g)
    hard, soft = clip_coefficient(norm, gamma, "hard"), clip_coefficient(norm, gamma, "soft")
    assert 0.5 * hard <= soft * (1 + 1e-12) and soft <= hard * (1 + 1e-12)
    p, q = torch.nn.Parameter(torch.zeros_like(g)), torch.nn.Parameter(torch.zeros_like(g))
    p.grad, q.grad = g.clone(), g.clone()
    clip_grad_norm(p, gamma, mode="hard")
    clip_grad_norm(q, gamma, mode="soft")
    assert global_norm(p.grad) <= gamma * (1 + 1e-9)               # a hard clip never exceeds gamma
    assert global_norm(q.grad) <= gamma * (1 + 1e-9)
    assert 0.5 * global_norm(p.grad) <= global_norm(q.grad) * (1 + 1e-9) + 1e-300


def test_normalized_step_has_norm_gamma():
    p = torch.nn.Parameter(torch.zeros(5))
    p.grad = torch.tensor([3.0, 4.0, 0.0, 0.0, 12.0])
    assert clip_grad_norm(p, 2.0, mode="normalize") == 13.0
    assert global_norm(p.grad) == pytest.approx(2.0)
    assert clip_coefficient(0.0, 2.0, "normalize") == 1.0


# --- NaN / inf policy --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_gradient_raises_or_skips(bad):
    net = _net()
    _backward(net)
    net[0].weight.grad[0, 0] = bad
    before = [p.grad.clone() for p in net.parameters()]
    with pytest.raises(FloatingPointError, match="gradient norm is"):
        clip_grad_norm(net.parameters(), 1.0)
    norm = clip_grad_norm(net.parameters(), 1.0, nonfinite="skip")
    assert not math.isfinite(norm)
    for p, b in zip(net.parameters(), before):                     # untouched either way
        assert torch.equal(p.grad.nan_to_num(), b.nan_to_num())


def test_wrapper_skips_and_counts_nonfinite_steps():
    net = _net()
    opt = ClippedOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), 1.0, nonfinite="skip")
    _backward(net)
    net[2].bias.grad[0] = float("inf")
    weights = [p.detach().clone() for p in net.parameters()]
    opt.step()
    assert all(torch.equal(p, w) for p, w in zip(net.parameters(), weights))
    opt.zero_grad()
    _backward(net)
    opt.step()
    assert not all(torch.equal(p, w) for p, w in zip(net.parameters(), weights))
    assert opt.clipper.skipped_steps == [0] and opt.clipper.history()["skipped"] == [True, False]


def test_optimizer_step_names_the_step_of_a_nonfinite_gradient():
    net = _net()
    net[0].weight.register_hook(lambda g: g * float("nan"))        # a finite loss with a NaN gradient
    loss = net(torch.randn(4, 7)).sum()
    with pytest.raises(FloatingPointError, match="gradient norm is nan.* at step 9"):
        optimizer_step(torch.optim.SGD(net.parameters(), lr=0.1), loss, 9, clip=GradientClipper(1.0))


# --- the flat buffer ---------------------------------------------------------------------------------------------------

def test_flat_buffer_holds_every_gradient_and_survives_module_zero_grad():
    net = _net()
    opt = ClippedOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), 1e9)
    (buffer,) = opt.buffers
    assert buffer.numel() == sum(p.numel() for p in net.parameters())
    _backward(net)
    assert all(p.grad.data_ptr() >= buffer.data_ptr() for p in net.parameters())
    assert global_norm(buffer) == pytest.approx(global_norm([p.grad for p in net.parameters()]))
    net.zero_grad()                                                # sets .grad to None behind the wrapper's back
    _backward(net, seed=5)
    expected = global_norm([p.grad for p in net.parameters()])
    assert opt.clip() == pytest.approx(expected)
    assert all(p.grad.data_ptr() >= buffer.data_ptr() for p in net.parameters())
    scheduler = torch.optim.lr_scheduler.StepLR(opt.optimizer, step_size=1, gamma=0.5)
    opt.step()
    scheduler.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)


# --- smoothness --------------------------------------------------------------------------------------------------------

def _exact_l0_l1(a, b):
    # phi(t) = a/b^2 (e^{b|t|} - 1 - b|t|) has phi'' = a + b |phi'| exactly, for every t
    return lambda t: a / b**2 * (torch.exp(b * t.abs()) - 1 - b * t.abs())


@pytest.mark.parametrize("a, b", [(2.0, 0.5), (16.0, 1.0), (0.3, 3.0)])
def test_smoothness_estimator_recovers_known_l0_l1(a, b):
    phi = _exact_l0_l1(a, b)
    theta = torch.nn.Parameter(torch.zeros((), dtype=torch.float64))
    norms, smooth = [], []
    for t0 in torch.linspace(-3, 3, 24, dtype=torch.float64):      # 24 points: theta = 0 (g = 0) is not one
        start, end = [t0.clone()], [t0 + 1e-5]
        with torch.no_grad():
            theta.copy_(t0)
        (g0,) = torch.autograd.grad(phi(theta), [theta])
        L = local_smoothness(lambda: phi(theta), [theta], start, end)
        norms.append(abs(g0.item()))
        smooth.append(L)
        assert theta.item() == t0.item()                           # restored
    fit = fit_smoothness(norms, smooth)
    assert fit.L0 == pytest.approx(a, rel=1e-3) and fit.L1 == pytest.approx(b, rel=1e-3)
    assert fit.slope > 0 and fit.correlation > 0.4                # L grows with |g|, but not as a power law


def test_smoothness_of_a_quadratic_is_its_curvature_along_the_step():
    A = torch.diag(torch.tensor([1.0, 4.0, 9.0], dtype=torch.float64))
    x = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    f = lambda: 0.5 * x @ A @ x                                    # noqa: E731
    start = [torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)]
    for direction, curvature in [([0, 0, 1.0], 9.0), ([0, 1.0, 0], 4.0), ([1.0, 1.0, 0], math.sqrt(17 / 2))]:
        end = [start[0] + 0.3 * torch.tensor(direction, dtype=torch.float64)]
        for fractions in [(0.5,), (0.25, 1.0)]:
            assert local_smoothness(f, [x], start, end, fractions=fractions) == pytest.approx(curvature, rel=1e-12)


def test_theta4_satisfies_16_1_in_hessian_form():
    theta = torch.linspace(-50, 50, 200_001, dtype=torch.float64)
    assert (12 * theta**2 <= 16 + 4 * theta.abs() ** 3 + 1e-9).all()
    assert ((12 * theta**2 - 4 * theta.abs() ** 3).max() - 16).abs() < 1e-6


# --- a tiny real model -------------------------------------------------------------------------------------------------

def test_lstm_language_model_and_stream():
    stream, tok = char_stream(["今天天气不错", "明天也不错"], vocab=20)
    assert stream.tolist().count(tok.sep_id) == 2
    model = LSTMLanguageModel(tok.vocab_size, embed_size=4, hidden_size=8)
    assert model(stream[None, :5]).shape == (1, 5, tok.vocab_size)
    with pytest.raises(ValueError, match="input_ids must"):
        model(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="must lie in"):
        model(torch.tensor([[tok.vocab_size]]))
    with pytest.raises(ValueError, match="non-empty"):
        char_stream([])


def test_cli_runs_a_tiny_experiment(capsys, tmp_path):
    from simbook.cli import main

    save = tmp_path / "run"
    assert main(["smoothness", "--steps", "3", "--compare-steps", "3", "--lrs", "1", "--clipped-lrs", "1",
                 "--embed-size", "4", "--hidden-size", "8", "--batch-size", "2", "--seq-len", "8", "--no-progress",
                 "--device", "cpu", "--save", str(save)]) == 0
    out = capsys.readouterr().out
    assert "log-log slope" in out and "clip 0.25" in out
    record = json.loads((save / "record.json").read_text())
    assert record["status"] == "finished" and record["config"]["steps"] == 3 and "slope" in record["final"]
    assert record["command"]
    for bad, message in [(["--max-norm", "0"], "max_norm"), (["--device", "tpu"], "device"),
                         (["--resume"], "keeps no checkpoint")]:
        with pytest.raises(SystemExit) as exit_info:
            main(["smoothness", *bad, "--steps", "1", "--no-progress", "--save", str(tmp_path / "bad")])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_cli_defaults_are_the_config_defaults():
    from simbook.cli import build_parser
    from simbook.training import config_from_args

    args = build_parser().parse_args(["smoothness"])
    assert config_from_args(SmoothnessConfig, args) == SmoothnessConfig()
    assert SmoothnessConfig().steps == 500 and SmoothnessConfig.small().steps == 200


def test_trajectory_and_training_loops_run_through_the_trainer():
    stream, tok = char_stream(["今天天气不错，明天也不错"] * 4, vocab=20)
    torch.manual_seed(0)
    model = LSTMLanguageModel(tok.vocab_size, embed_size=4, hidden_size=8)
    record = smoothness_trajectory(model, stream, steps=4, lr=1.0, batch_size=2, seq_len=6, device="cpu")
    assert [len(record[k]) for k in ("loss", "grad_norm", "smoothness")] == [4, 4, 4]
    assert all(v > 0 for v in record["grad_norm"] + record["smoothness"])
    torch.manual_seed(0)
    again = LSTMLanguageModel(tok.vocab_size, embed_size=4, hidden_size=8)
    assert train_lm(again, stream, steps=4, lr=1.0, batch_size=2, seq_len=6, device="cpu") == record["loss"]
    torch.manual_seed(0)
    diverging = LSTMLanguageModel(tok.vocab_size, embed_size=4, hidden_size=8)
    losses = train_lm(diverging, stream, steps=20, lr=math.inf, batch_size=2, seq_len=6, device="cpu")
    assert losses[-1] == math.inf and len(losses) < 20


# --- bad input ---------------------------------------------------------------------------------------------------------

def test_bad_thresholds_and_choices():
    net = _net()
    _backward(net)
    for bad, error, match in [(0.0, ValueError, "max_norm"), (-1.0, ValueError, "max_norm"),
                              (float("nan"), ValueError, "max_norm"), (float("inf"), ValueError, "max_norm"),
                              (True, TypeError, "max_norm must be a number"), ("1", TypeError, "max_norm")]:
        with pytest.raises(error, match=match):
            clip_grad_norm(net.parameters(), bad)
        with pytest.raises(error, match=match):
            GradientClipper(bad)
    with pytest.raises(ValueError, match="mode must be one of"):
        clip_grad_norm(net.parameters(), 1.0, mode="medium")
    with pytest.raises(ValueError, match="nonfinite must be one of"):
        GradientClipper(1.0, nonfinite="ignore")
    with pytest.raises(ValueError, match="norm must be a finite number"):
        clip_coefficient(float("nan"), 1.0)
    for number in (1.0, "big"):                    # the number shortcut is gone: a clip is a callable
        with pytest.raises(TypeError, match="clip must be None or a callable"):
            optimizer_step(torch.optim.SGD(net.parameters(), lr=0.1), net(torch.randn(1, 7)).sum(), 0, clip=number)


def test_bad_parameter_lists():
    with pytest.raises(ValueError, match="parameters is empty"):
        clip_grad_norm([], 1.0)
    with pytest.raises(ValueError, match="none of the 2 parameters has a gradient"):
        clip_grad_norm(_net()[0].parameters(), 1.0)
    with pytest.raises(TypeError, match="must hold tensors"):
        clip_grad_norm([1.0], 1.0)
    with pytest.raises(TypeError, match="floating dtypes"):
        global_norm([torch.arange(3)])
    with pytest.raises(ValueError, match="is empty"):
        global_norm([])
    cpu, meta = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2, device="meta"))
    cpu.grad, meta.grad = torch.ones(2), torch.ones(2, device="meta")
    with pytest.raises(ValueError, match="several devices"):
        clip_grad_norm([cpu, meta], 1.0)
    with pytest.raises(ValueError, match="several devices"):
        ClippedOptimizer(torch.optim.SGD([cpu, meta], lr=0.1), 1.0)
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        ClippedOptimizer(_net().parameters(), 1.0)
    frozen = _net()
    for p in frozen.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no parameter that requires a gradient"):
        ClippedOptimizer(torch.optim.SGD(frozen.parameters(), lr=0.1), 1.0)


def test_bad_smoothness_input():
    x = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    f = lambda: x.pow(4).sum()                                     # noqa: E731
    a, b = [torch.zeros(2, dtype=torch.float64)], [torch.ones(2, dtype=torch.float64)]
    with pytest.raises(ValueError, match="zero step"):
        local_smoothness(f, [x], a, a)
    with pytest.raises(ValueError, match="fractions"):
        local_smoothness(f, [x], a, b, fractions=(0.0,))
    with pytest.raises(ValueError, match="shape"):
        local_smoothness(f, [x], [torch.zeros(3)], b)
    with pytest.raises(ValueError, match="NaN or inf"):
        local_smoothness(f, [x], a, [torch.tensor([1.0, float("nan")])])
    with pytest.raises(ValueError, match="has 2 tensors"):
        local_smoothness(f, [x], a, b * 2)
    with pytest.raises(TypeError, match="one-element tensor"):
        local_smoothness(lambda: x, [x], a, b)
    with pytest.raises(ValueError, match="at least 3"):
        fit_smoothness([1.0, 2.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="> 0"):
        fit_smoothness([0.0, 1.0, 2.0], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="finite"):
        fit_smoothness([1.0, 2.0, float("nan")], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="differ in length"):
        fit_smoothness([1.0, 2.0, 3.0], [1.0, 2.0])


# --- the clip folded into a fused optimizer ----------------------------------------------------------------------------

def _two_groups_sgd(params):
    return torch.optim.SGD([{"params": params[:2], "lr": 0.3}, {"params": params[2:]}], lr=0.1, foreach=False)


@pytest.mark.parametrize("make", [lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, fused=True),
                                  lambda ps: torch.optim.Adam(ps, lr=1e-2, fused=True),
                                  lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, fused=True),
                                  lambda ps: torch.optim.SGD(ps, lr=0.1, fused=True),
                                  lambda ps: torch.optim.SGD(ps, lr=0.1),
                                  lambda ps: _two_groups_sgd(list(ps))])
@pytest.mark.parametrize("flat", [True, False])
def test_folded_clip_equals_clip_grad_norm_then_fused_step(make, flat):
    torch.manual_seed(0)
    ours, theirs = _net(), _net()
    theirs.load_state_dict(ours.state_dict())
    folded = ClippedOptimizer(make(ours.parameters()), 0.5, flat=flat)
    plain = make(theirs.parameters())
    rates = [group["lr"] for group in folded.param_groups]
    plain_sgd = isinstance(plain, torch.optim.SGD) and plain.defaults["momentum"] == 0
    assert folded.fold == ("lr" if plain_sgd else "grad_scale") and f"fold={folded.fold!r}" in repr(folded)
    x = torch.randn(6, 7, generator=torch.Generator().manual_seed(1))
    for step in range(4):
        scale = 10.0 if step % 2 else 0.01                          # steps that bite and steps that do not
        optimizer_step(folded, (ours(x) * scale).pow(2).sum(), step)
        plain.zero_grad()
        (theirs(x) * scale).pow(2).sum().backward()
        torch.nn.utils.clip_grad_norm_(theirs.parameters(), 0.5)
        plain.step()
        assert not hasattr(folded.optimizer, "grad_scale")         # only ever set for the one step
        assert [group["lr"] for group in folded.param_groups] == rates   # the learning rates are restored
    for p, q in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)
    assert folded.clipper.clipped == [False, True, False, True]


def test_fold_is_off_for_unfused_optimizers_and_refused_where_impossible():
    net = _net()
    assert not ClippedOptimizer(torch.optim.AdamW(net.parameters(), lr=0.1), 1.0).fold
    assert not ClippedOptimizer(torch.optim.AdamW(net.parameters(), lr=0.1, fused=True), 1.0, fold=False).fold
    assert not ClippedOptimizer(torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9), 1.0).fold
    assert not ClippedOptimizer(torch.optim.SGD(net.parameters(), lr=0.1, weight_decay=0.1), 1.0).fold
    assert ClippedOptimizer(torch.optim.SGD(net.parameters(), lr=0.1, weight_decay=0.1, fused=True), 1.0).fold \
        == "grad_scale"                                             # weight decay: the learning rate cannot carry c
    with pytest.raises(ValueError, match="fold=True needs plain SGD"):
        ClippedOptimizer(torch.optim.RMSprop(net.parameters(), lr=0.1), 1.0, fold=True)
    with pytest.raises(ValueError, match="fold must be"):
        ClippedOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), 1.0, fold="yes")


def test_folded_clip_skips_a_nonfinite_step():
    net = _net()
    before = [p.detach().clone() for p in net.parameters()]
    opt = ClippedOptimizer(torch.optim.Adam(net.parameters(), lr=0.1, fused=True), 1.0, nonfinite="skip")
    net[0].weight.register_hook(lambda g: g * float("nan"))
    optimizer_step(opt, net(torch.randn(2, 7)).sum(), 0)
    assert opt.clipper.skipped_steps == [0]
    assert all(torch.equal(p, b) for p, b in zip(net.parameters(), before))


# --- fold="kernel": simbook's one-pass clipped AdamW -------------------------------------------------------------------

def _two_groups_adamw(params):
    params = list(params)
    return torch.optim.AdamW([{"params": params[:2], "lr": 1e-2, "weight_decay": 0.0}, {"params": params[2:]}],
                             lr=3e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)


@pytest.mark.parametrize("make", [lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
                                  lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True),
                                  lambda ps: torch.optim.Adam(ps, lr=1e-2),
                                  _two_groups_adamw])
@pytest.mark.parametrize("flat", [True, False])
def test_kernel_fold_equals_clip_grad_norm_then_adamw_in_fp64(make, flat):
    torch.manual_seed(0)
    ours, reference = _net(), _net(dtype=torch.float64)
    kernel = ClippedOptimizer(make(ours.parameters()), 0.5, flat=flat, fold="kernel")
    plain = make(reference.parameters())                            # the same optimizer, in fp64
    assert kernel.fold == "kernel" and "fold='kernel'" in repr(kernel)
    x = torch.randn(6, 7, generator=torch.Generator().manual_seed(1))
    for step in range(6):
        scale = 10.0 if step % 2 else 0.01                          # steps that bite and steps that do not
        optimizer_step(kernel, (ours(x) * scale).pow(2).sum(), step)
        plain.zero_grad()
        (reference(x.double()) * scale).pow(2).sum().backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.5)
        plain.step()
    for p, q in zip(ours.parameters(), reference.parameters()):
        assert ((p.double() - q).norm() / q.norm()).item() < 1e-6
    assert kernel.clipper.clipped == [False, True] * 3
    state = kernel.state_dict()["state"]
    assert all(set(s) == {"step", "exp_avg", "exp_avg_sq"} and s["step"].item() == 6 for s in state.values())


def test_kernel_fold_state_continues_in_torchs_adamw():
    torch.manual_seed(0)
    a, b = _net(), _net()
    kernel = ClippedOptimizer(torch.optim.AdamW(a.parameters(), lr=1e-2, weight_decay=0.1), 1e6, fold="kernel")
    plain = torch.optim.AdamW(b.parameters(), lr=1e-2, weight_decay=0.1)
    for step in range(3):
        optimizer_step(kernel, a(torch.randn(4, 7)).pow(2).sum(), step)
    b.load_state_dict(a.state_dict())
    plain.load_state_dict(copy.deepcopy(kernel.state_dict()))      # torch's AdamW picks up where the kernel stopped
    x = torch.randn(4, 7)
    optimizer_step(kernel, a(x).pow(2).sum(), 3)
    optimizer_step(plain, b(x).pow(2).sum(), 3)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 300), lr=st.floats(1e-4, 1e-1), weight_decay=st.floats(0.0, 0.5),
       beta1=st.floats(0.0, 0.99), beta2=st.floats(0.9, 0.9999), gamma=st.floats(1e-3, 1e3),
       seed=st.integers(0, 2**16))
def test_kernel_fold_one_step_matches_fp64(n, lr, weight_decay, beta1, beta2, gamma, seed):
    g = torch.Generator().manual_seed(seed)
    start, grad = torch.randn(n, generator=g), torch.randn(n, generator=g) * 10
    p = torch.nn.Parameter(start.clone())
    p.grad = grad.clone()
    kernel = ClippedOptimizer(torch.optim.AdamW([p], lr=lr, betas=(beta1, beta2), weight_decay=weight_decay), gamma,
                              fold="kernel")
    for _ in range(2):
        kernel.step()
    x, m, v, gg = start.double(), 0.0, 0.0, grad.double()
    gg = gg * min(1.0, gamma / gg.norm().item())
    for t in (1, 2):
        m, v = beta1 * m + (1 - beta1) * gg, beta2 * v + (1 - beta2) * gg * gg
        x = x * (1 - lr * weight_decay) - lr / (1 - beta1**t) * m / (v.sqrt() / math.sqrt(1 - beta2**t) + 1e-8)
    assert ((p.double() - x).norm() / x.norm()).item() < 1e-6


def test_kernel_fold_refuses_what_it_does_not_compute():
    net = _net()
    for optimizer, match in [(torch.optim.SGD(net.parameters(), lr=0.1), "needs torch.optim.AdamW or Adam"),
                             (torch.optim.AdamW(net.parameters(), lr=0.1, amsgrad=True), "amsgrad"),
                             (torch.optim.Adam(net.parameters(), lr=0.1, weight_decay=0.1), "weight_decay=0"),
                             (torch.optim.AdamW(net.parameters(), lr=torch.tensor(0.1)), "float learning rates"),
                             (torch.optim.AdamW(_net(dtype=torch.float64).parameters(), lr=0.1), "float32 CPU")]:
        with pytest.raises(ValueError, match=match):
            ClippedOptimizer(optimizer, 1.0, fold="kernel")


def test_kernel_fold_falls_back_without_a_compiler(monkeypatch, tmp_path):
    from simbook.optim.clipping import clipped_adamw_kernel
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    clipped_adamw_kernel.cache_clear()
    try:
        net = _net()
        with pytest.warns(RuntimeWarning, match="fold='kernel' is not available .*falling back to fold='grad_scale'"):
            opt = ClippedOptimizer(torch.optim.AdamW(net.parameters(), lr=0.1, fused=True), 1.0, fold="kernel")
        assert opt.fold == "grad_scale"
        with pytest.warns(RuntimeWarning, match="could not run"):
            assert ClippedOptimizer(torch.optim.AdamW(net.parameters(), lr=0.1), 1.0, fold="kernel").fold == ""
    finally:
        clipped_adamw_kernel.cache_clear()

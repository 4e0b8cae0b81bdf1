"""simbook.experiments.smoothness over seeds: the interval and steps-to-target helpers against independent
references, the probe measurement (it must not change the training path, and it must measure what
local_smoothness measures), the soft-clip/adaptive-step identities of the chapter, the config and the
`simbook clipping-seeds` command."""
import json
import math

import pytest
import torch

from simbook.experiments.smoothness import (ClippingSeedsConfig, LSTMLanguageModel, char_stream, lm_loss,
                                            smoothness_trajectory, steps_to_target, train_lm,
                                            windows)
from simbook.optim.clipping import ClippedOptimizer, clip_coefficient, global_norm, local_smoothness
from simbook.utils import correlation_interval, mean_interval, optimizer_step


# --- helpers -----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [2, 3, 5, 10, 31, 40])
def test_mean_interval_matches_scipy(n):
    stats = pytest.importorskip("scipy.stats")
    values = torch.randn(n, generator=torch.Generator().manual_seed(n), dtype=torch.float64).tolist()
    got = mean_interval(values)
    low, high = stats.t.interval(0.95, n - 1, loc=stats.tmean(values), scale=stats.sem(values))
    assert got["n"] == n and got["mean"] == pytest.approx(sum(values) / n)
    assert got["sd"] == pytest.approx(torch.tensor(values).std().item())
    assert got["low"] == pytest.approx(low, rel=2e-3) and got["high"] == pytest.approx(high, rel=2e-3)


def test_mean_interval_refuses_too_few_or_nonfinite():
    with pytest.raises(ValueError, match="at least 2"):
        mean_interval([1.0])
    with pytest.raises(ValueError, match="finite"):
        mean_interval([1.0, math.inf])


def test_steps_to_target_is_the_first_window_at_or_below_target():
    losses = [10.0] * 5 + [1.0] * 10
    # windows of 4: the mean first reaches <= 3.25 when 3 of its 4 losses are 1 (10 + 3 = 13, 13/4 = 3.25)
    assert steps_to_target(losses, 3.25, window=4) == 8
    assert steps_to_target(losses, 1.0, window=4) == 9
    assert steps_to_target(losses, 0.5, window=4) is None
    assert steps_to_target([1.0, 1.0, math.inf, 0.0], 0.5, window=1) is None      # diverged before reaching
    brute = lambda ls, t, w: next((k for k in range(w, len(ls) + 1) if sum(ls[k - w:k]) / w <= t), None)  # noqa
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        ls = (torch.rand(40, generator=g) * 5).tolist()
        assert steps_to_target(ls, 2.0, window=3) == brute(ls, 2.0, 3)
    with pytest.raises(ValueError, match="window"):
        steps_to_target(losses, 1.0, window=0)


# --- the probe measurement ---------------------------------------------------------------------------------------------

def _tiny():
    stream, tok = char_stream(["今天天气不错，明天也不错，后天下雨"] * 6, vocab=30)
    torch.manual_seed(0)
    return stream, LSTMLanguageModel(tok.vocab_size, embed_size=4, hidden_size=8)


def test_probe_and_clip_do_not_change_the_training_path():
    stream, model = _tiny()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    probe = windows(stream, 8, 6, torch.Generator().manual_seed(3))
    traj = smoothness_trajectory(model, stream, steps=5, lr=3.0, max_norm=0.1, probe=probe, probe_every=2,
                                 batch_size=2, seq_len=6, device="cpu")
    model.load_state_dict(start)
    assert train_lm(model, stream, steps=5, lr=3.0, max_norm=0.1, batch_size=2, seq_len=6, device="cpu") \
        == traj["loss"]
    assert traj["probe_step"] == [1, 3, 5]
    assert all(v > 0 for v in traj["probe_grad_norm"] + traj["probe_smoothness"])
    model.load_state_dict(start)
    plain = smoothness_trajectory(model, stream, steps=5, lr=3.0, batch_size=2, seq_len=6, device="cpu")
    assert plain["probe_step"] == [] and plain["loss"] != traj["loss"]           # the clip did bite


def test_probe_numbers_are_the_probe_loss_gradient_and_smoothness():
    stream, model = _tiny()
    probe = windows(stream, 8, 6, torch.Generator().manual_seed(3))
    params = list(model.parameters())
    x0 = [p.detach().clone() for p in params]
    grad0 = torch.autograd.grad(lm_loss(model, probe), params)
    traj = smoothness_trajectory(model, stream, steps=1, lr=1.0, probe=probe, probe_every=1, batch_size=2,
                                 seq_len=6, device="cpu")
    x1 = [p.detach().clone() for p in params]
    assert traj["probe_grad_norm"][0] == pytest.approx(global_norm(list(grad0)), rel=1e-6)
    expected = local_smoothness(lambda: lm_loss(model, probe), params, x0, x1)
    assert traj["probe_smoothness"][0] == pytest.approx(expected, rel=1e-5)


def test_bad_probe_is_refused():
    stream, model = _tiny()
    for bad in (torch.zeros(4, 6), torch.zeros(6, dtype=torch.long), torch.zeros(4, 1, dtype=torch.long)):
        with pytest.raises(ValueError, match="probe must be"):
            smoothness_trajectory(model, stream, steps=1, lr=1.0, probe=bad, batch_size=2, seq_len=6, device="cpu")


# --- the chapter's soft-clip / adaptive-step identities ------------------------------------------------------------

@pytest.mark.parametrize("eta, gamma", [(0.05, 2.0), (0.01, 0.3), (1.0, 1e-2)])
def test_soft_clip_is_rmsprop_and_adam_without_memory_on_one_parameter(eta, gamma):
    def path(make):
        theta = torch.nn.Parameter(torch.tensor([2.5], dtype=torch.float64))
        opt, out = make([theta]), []
        for step in range(40):
            optimizer_step(opt, theta.pow(4).sum() + 3 * theta.sum(), step)
            out.append(theta.item())
        return out

    soft = path(lambda ps: ClippedOptimizer(torch.optim.SGD(ps, lr=eta), gamma, mode="soft"))
    for make in (lambda ps: torch.optim.RMSprop(ps, lr=eta * gamma, alpha=0.0, eps=gamma),
                 lambda ps: torch.optim.Adam(ps, lr=eta * gamma, betas=(0.0, 0.0), eps=gamma)):
        assert path(make) == pytest.approx(soft, rel=1e-12, abs=1e-14)
    hard = path(lambda ps: ClippedOptimizer(torch.optim.SGD(ps, lr=eta), gamma))
    assert hard != pytest.approx(soft, rel=1e-6)                     # the identity can fail


@pytest.mark.parametrize("gnorm", [1e-4, 0.5, 2.0, 1e4])
def test_adam_under_a_constant_gradient_takes_the_soft_clipped_step(gnorm):
    eta, gamma = 0.1, 2.0
    w = torch.nn.Parameter(torch.zeros((), dtype=torch.float64))
    opt = torch.optim.Adam([w], lr=eta * gamma, betas=(0.9, 0.999), eps=gamma)
    for _ in range(6):
        before = w.item()
        opt.zero_grad()
        (gnorm * w).backward()
        opt.step()
        assert (before - w.item()) / gnorm == pytest.approx(eta * clip_coefficient(gnorm, gamma, "soft"), rel=1e-12)


# --- config and command ------------------------------------------------------------------------------------------------

def test_config_checks_and_small_preset():
    assert ClippingSeedsConfig().seeds == (0, 1, 2, 3, 4) and len(ClippingSeedsConfig.small().seeds) == 3
    assert ("plain", 3.0) in ClippingSeedsConfig().grid()
    for bad, match in [(dict(seeds=(1,)), "seeds"), (dict(seeds=(1, 1)), "seeds"), (dict(plain_lrs=()), "plain_lrs"),
                       (dict(hard_lrs=(0.0,)), "hard_lrs"), (dict(target_loss=math.nan), "target_loss"),
                       (dict(max_norm=-1.0), "max_norm"), (dict(probe_every=0), "probe_every")]:
        with pytest.raises(ValueError, match=match):
            ClippingSeedsConfig(**bad)


def test_cli_defaults_are_the_config_defaults():
    from simbook.cli import build_parser
    from simbook.training import config_from_args

    args = build_parser().parse_args(["clipping-seeds"])
    assert config_from_args(ClippingSeedsConfig, args) == ClippingSeedsConfig()


def test_cli_runs_a_tiny_experiment(capsys, tmp_path):
    from simbook.cli import main

    save = tmp_path / "run"
    assert main(["clipping-seeds", "--seeds", "0", "1", "--compare-steps", "4", "--plain-lrs", "1", "--hard-lrs", "3",
                 "--soft-lrs", "3", "--trajectory-steps", "6", "--probe-windows", "4", "--probe-every", "2",
                 "--target-window", "2", "--target-loss", "100", "--embed-size", "4", "--hidden-size", "8",
                 "--batch-size", "2", "--seq-len", "8", "--no-progress", "--device", "cpu", "--save",
                 str(save)]) == 0
    out = capsys.readouterr().out
    assert "paired by seed" in out and "probe" in out and "2 seeds" in out
    record = json.loads((save / "record.json").read_text())
    assert record["status"] == "finished" and record["final"]["seeds"] == 2
    assert record["final"]["best_plain_reached"] == 2 and "correlation_clipped_probe_mean" in record["final"]
    with pytest.raises(SystemExit) as exit_info:
        main(["clipping-seeds", "--resume", "--no-progress", "--save", str(tmp_path / "bad")])
    assert exit_info.value.code == 2 and "keeps no checkpoint" in capsys.readouterr().err


def test_correlation_interval_stays_inside_minus_one_one_and_matches_fisher_z():

    rs = [0.9, 0.95, 0.99]
    got = correlation_interval(rs)
    z = [math.atanh(r) for r in rs]
    zi = mean_interval(z)
    assert got["high"] == pytest.approx(math.tanh(zi["high"])) and got["high"] < 1
    assert got["low"] == pytest.approx(math.tanh(zi["low"])) and got["mean"] == pytest.approx(sum(rs) / 3)
    with pytest.raises(ValueError, match=r"\(-1, 1\)"):
        correlation_interval([0.5, 1.0])

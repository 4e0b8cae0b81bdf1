"""Tests of simbook.models.vae: shapes of every model, the closed-form KL against Monte Carlo, the reparameterised
gradient against the analytic and a finite-difference value, the diagnostics on constructed cases, a short training
run, the `simbook vae` command, checkpoints, and the argument checks."""
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.distributions import Normal, kl_divergence

from simbook.experiments.vae import (DigitClassifier, VAEExperimentConfig, confident_share, evaluate_vae,
                                     format_metrics, label_distance, train_classifier, train_vae)
from simbook.models.vae import (LOGVAR_RANGE, VAE, VAEConfig, active_units, aggregate_posterior_samples, check_pixels,
                                elbo, encode_all, gaussian_fit_kl, kl_per_dimension, kl_to_standard_normal, mmd,
                                naive_regulariser, pixels_to_unit, reconstruction_error, reparameterize, vae_loss)

PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


def _digits(n=64, seed=0):
    """Synthetic 28x28 'digits' in [0, 1]: a bright blob whose position depends on the class."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 4
    rows, cols = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    centres = torch.tensor([[8.0, 8.0], [8.0, 20.0], [20.0, 8.0], [20.0, 20.0]])[labels]
    dist2 = (rows - centres[:, 0, None, None]) ** 2 + (cols - centres[:, 1, None, None]) ** 2
    x = torch.exp(-dist2 / 18) + 0.05 * torch.rand(n, 28, 28, generator=g)
    return x.clamp(0, 1).reshape(n, 784), labels


# ----------------------------------------------------------------------------------------------------- shapes

@pytest.mark.parametrize("arch", ["mlp", "conv"])
@pytest.mark.parametrize("variational", [True, False])
@pytest.mark.parametrize("latent_dim", [1, 2, 5])
def test_shapes(arch, variational, latent_dim):
    torch.manual_seed(0)
    model = VAE(VAEConfig(latent_dim=latent_dim, arch=arch, variational=variational, hidden_dims=(32,),
                          channels=(4, 8)))
    x, _ = _digits(6)
    out = model(x, torch.Generator().manual_seed(0))
    assert out.x_hat.shape == (6, 784) and out.mu.shape == out.z.shape == (6, latent_dim)
    assert (out.logvar is None) == (not variational)
    if variational:
        assert out.logvar.shape == (6, latent_dim)
        assert LOGVAR_RANGE[0] <= out.logvar.min() and out.logvar.max() <= LOGVAR_RANGE[1]
    else:
        assert torch.equal(out.z, out.mu)
    assert ((out.x_hat > 0) & (out.x_hat < 1)).all()
    assert model.sample(3, torch.Generator().manual_seed(0)).shape == (3, 784)
    assert model.reconstruct(x).shape == (6, 784)
    path = model.interpolate(x[0], x[1], steps=5)
    assert path.shape == (5, 784)
    assert torch.allclose(path[0], model.reconstruct(x[:1])[0], atol=1e-6)
    assert torch.allclose(path[-1], model.reconstruct(x[1:2])[0], atol=1e-6)


def test_decode_grid_layout():
    torch.manual_seed(0)
    model = VAE(VAEConfig(latent_dim=2, hidden_dims=(16,)))
    grid = model.decode_grid(steps=3, span=1.0)
    assert grid.shape == (3, 3, 784)
    # row 0 is the top (z2 = +span), column 0 the left (z1 = -span)
    with torch.no_grad():
        assert torch.allclose(grid[0, 0], model.decode(torch.tensor([[-1.0, 1.0]]))[0], atol=1e-6)
        assert torch.allclose(grid[2, 1], model.decode(torch.tensor([[0.0, -1.0]]))[0], atol=1e-6)
    with pytest.raises(ValueError, match="2-D latent"):
        VAE(VAEConfig(latent_dim=3)).decode_grid()


def test_mlp_layer_sizes():
    model = VAE(VAEConfig(latent_dim=3, hidden_dims=(64, 32)))
    linear = [m for m in model.encoder if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linear] == [(784, 64), (64, 32), (32, 6)]
    linear = [m for m in model.decoder if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linear] == [(3, 32), (32, 64), (64, 784)]
    assert VAE(VAEConfig(latent_dim=3, variational=False)).encoder[-1].out_features == 3


# ------------------------------------------------------------------------------------------------ regularisers

def test_kl_against_torch_and_monte_carlo():
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(5, 3, generator=g, dtype=torch.float64)
    logvar = 2 * torch.randn(5, 3, generator=g, dtype=torch.float64)
    closed = kl_to_standard_normal(mu, logvar)
    reference = kl_divergence(Normal(mu, (0.5 * logvar).exp()), Normal(torch.zeros_like(mu), torch.ones_like(mu)))
    assert torch.allclose(closed, reference, rtol=1e-10, atol=1e-12)
    n = 100_000
    z = reparameterize(mu[0].expand(n, 3), logvar[0].expand(n, 3), g)
    log_ratio = Normal(mu[0], (0.5 * logvar[0]).exp()).log_prob(z) - Normal(0.0, 1.0).log_prob(z)
    stderr = log_ratio.std(0) / math.sqrt(n)
    assert ((log_ratio.mean(0) - closed[0]).abs() < 5 * stderr).all()


@PROPERTY
@given(st.floats(-3, 3), st.floats(-8, 4))
def test_regularisers_nonnegative_and_zero_only_at_prior(m, lv):
    mu, logvar = torch.tensor([[m]], dtype=torch.float64), torch.tensor([[lv]], dtype=torch.float64)
    kl, naive = kl_to_standard_normal(mu, logvar).item(), naive_regulariser(mu, logvar).item()
    assert kl >= -1e-12 and naive >= 0
    assert naive == pytest.approx(m ** 2 + (math.exp(lv / 2) - 1) ** 2)
    assert naive <= m ** 2 + 1 or lv > 0                      # the naive sigma term is bounded by 1 below sigma = 1


def test_regulariser_limits():
    zero = torch.zeros(1, 1, dtype=torch.float64)
    assert kl_to_standard_normal(zero, zero).item() == naive_regulariser(zero, zero).item() == 0
    tiny = torch.full((1, 1), -30.0, dtype=torch.float64)
    assert naive_regulariser(zero, tiny).item() == pytest.approx(1, abs=1e-6)
    assert kl_to_standard_normal(zero, tiny).item() > 14


# ---------------------------------------------------------------------------------------- reparameterisation

def test_reparameterize_distribution_and_clamp():
    g = torch.Generator().manual_seed(0)
    mu, logvar = torch.tensor([[1.0, -2.0]]), torch.tensor([[0.5, -1.0]])
    z = reparameterize(mu.expand(200_000, 2), logvar.expand(200_000, 2), g)
    assert torch.allclose(z.mean(0), mu[0], atol=0.01)
    assert torch.allclose(z.std(0), (0.5 * logvar[0]).exp(), atol=0.01)
    huge = reparameterize(torch.zeros(10_000, 1), torch.full((10_000, 1), 80.0), g)
    assert torch.isfinite(huge).all() and huge.std().item() == pytest.approx(math.exp(5), rel=0.05)


def test_reparameterize_any_shape_and_checks():
    z = reparameterize(torch.zeros(3), torch.zeros(3), torch.Generator().manual_seed(0))
    assert z.shape == (3,)
    assert reparameterize(torch.zeros(2, 4, 5), torch.zeros(2, 4, 5)).shape == (2, 4, 5)
    with pytest.raises(ValueError, match="logvar has size"):
        reparameterize(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(TypeError, match="mu must have a float dtype"):
        reparameterize(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3))
    with pytest.raises(TypeError, match="mu must have a float dtype"):
        kl_to_standard_normal(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3))


def test_reparameterize_fresh_noise_per_entry():
    z = reparameterize(torch.zeros(4, 3), torch.zeros(4, 3), torch.Generator().manual_seed(0))
    assert len(set(z.flatten().tolist())) == 12


def test_reparameterised_gradient_matches_analytic_and_finite_difference():
    # E sin(mu + sigma eps) = sin(mu) exp(-sigma^2 / 2)
    def expectation(mu, logvar):
        sigma = (0.5 * logvar).exp()
        return (torch.sin(mu) * torch.exp(-sigma ** 2 / 2)).sum()

    mu = torch.tensor([[0.4, -1.1, 2.0]], dtype=torch.float64, requires_grad=True)
    logvar = torch.tensor([[-0.5, 0.3, -2.0]], dtype=torch.float64, requires_grad=True)
    n = 400_000
    z = reparameterize(mu.expand(n, 3), logvar.expand(n, 3), torch.Generator().manual_seed(3))
    torch.sin(z).mean(0).sum().backward()
    mc_mu, mc_logvar = mu.grad.clone(), logvar.grad.clone()
    exact_mu, exact_logvar = torch.autograd.grad(expectation(mu, logvar), (mu, logvar))
    assert torch.allclose(mc_mu, exact_mu, atol=5e-3) and torch.allclose(mc_logvar, exact_logvar, atol=5e-3)
    # central finite differences of the same reparameterised estimate (common random numbers)
    eps = torch.randn(n, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)

    def estimate(m, lv):
        return torch.sin(m + eps * (0.5 * lv).exp()).mean(0).sum().item()

    m0, lv0 = mu.detach(), logvar.detach()
    h = 1e-5
    for i in range(3):
        e = torch.zeros_like(m0)
        e[0, i] = h
        fd_mu = (estimate(m0 + e, lv0) - estimate(m0 - e, lv0)) / (2 * h)
        fd_lv = (estimate(m0, lv0 + e) - estimate(m0, lv0 - e)) / (2 * h)
        assert fd_mu == pytest.approx(exact_mu[0, i].item(), abs=5e-3)
        assert fd_lv == pytest.approx(exact_logvar[0, i].item(), abs=5e-3)


# --------------------------------------------------------------------------------------------- the objective

def test_reconstruction_error_and_loss_scaling():
    x, _ = _digits(4)
    x_hat = torch.full_like(x, 0.5)
    summed, averaged = reconstruction_error(x, x_hat), reconstruction_error(x, x_hat, "mean")
    assert torch.allclose(summed, ((x - 0.5) ** 2).sum(1)) and torch.allclose(averaged * 784, summed)
    torch.manual_seed(0)
    model = VAE(VAEConfig(latent_dim=2, hidden_dims=(16,)))
    out = model(x, torch.Generator().manual_seed(0))
    mean_loss = vae_loss(x, out, reduction="mean")["loss"]
    assert torch.isclose(784 * mean_loss, vae_loss(x, out, beta=784.0)["loss"], rtol=1e-5)
    parts = vae_loss(x, out, regulariser="naive", beta=2.0)
    assert torch.isclose(parts["loss"], parts["reconstruction"] + 2 * parts["regulariser"])
    assert vae_loss(x, out, regulariser=None)["regulariser"].item() == 0


def test_elbo_is_gaussian_log_likelihood_minus_kl():
    x, _ = _digits(5)
    torch.manual_seed(0)
    model = VAE(VAEConfig(latent_dim=2, hidden_dims=(16,)))
    value = elbo(model, x, generator=torch.Generator().manual_seed(0))
    mu, logvar = model.encode(x)
    z = reparameterize(mu, logvar, torch.Generator().manual_seed(0))
    expected = Normal(model.decode(z), math.sqrt(0.5)).log_prob(x).sum(-1) - kl_to_standard_normal(mu, logvar).sum(-1)
    assert torch.allclose(value, expected, rtol=1e-5)
    # more samples: the same expectation, lower variance
    many = elbo(model, x, samples=64, generator=torch.Generator().manual_seed(1))
    assert (many - value).abs().max() < 20


# ------------------------------------------------------------------------------------------------- diagnostics

def test_active_units_and_kl_per_dimension():
    g = torch.Generator().manual_seed(0)
    mu = torch.stack([torch.randn(500, generator=g), torch.zeros(500), 0.05 * torch.randn(500, generator=g)], 1)
    count, variances = active_units(mu)
    assert count == 1 and variances.shape == (3,)
    assert active_units(mu, threshold=1e-4)[0] == 2
    logvar = torch.zeros(500, 3)
    per_dim = kl_per_dimension(mu, logvar)
    assert torch.allclose(per_dim, 0.5 * mu.pow(2).mean(0)) and per_dim[1] == 0


def test_mmd_properties():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(600, 2, generator=g), torch.randn(600, 2, generator=g)
    same, shifted = mmd(a, b), mmd(a, b + torch.tensor([1.5, 0.0]))
    assert abs(same) < 0.02 < shifted
    assert mmd(a, b) == pytest.approx(mmd(b, a), abs=1e-12)
    # against a direct double loop on a tiny case
    u, v = torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randn(5, 3, generator=g, dtype=torch.float64)
    k = lambda p, q: sum(math.exp(-float(((p - q) ** 2).sum()) / (2 * s * 3)) for s in (0.05, 0.2, 1.0, 5.0))
    uu = sum(k(u[i], u[j]) for i in range(4) for j in range(4) if i != j) / 12
    vv = sum(k(v[i], v[j]) for i in range(5) for j in range(5) if i != j) / 20
    uv = sum(k(u[i], v[j]) for i in range(4) for j in range(5)) / 20
    assert mmd(u, v) == pytest.approx(uu + vv - 2 * uv, rel=1e-9)


def test_gaussian_fit_kl_cases():
    assert gaussian_fit_kl(torch.zeros(10, 2), torch.zeros(10, 2)) == pytest.approx(0, abs=1e-12)
    # all posteriors N(m, s^2 I) with the same m: the aggregate is that Gaussian
    mu, logvar = torch.full((10, 2), 0.5), torch.full((10, 2), math.log(2.0))
    closed = kl_to_standard_normal(mu[:1].double(), logvar[:1].double()).sum().item()
    assert gaussian_fit_kl(mu, logvar) == pytest.approx(closed, rel=1e-9)
    # plain autoencoder codes on a line: singular covariance, a huge (finite or inf) distance
    line = torch.linspace(-1, 1, 50)[:, None] * torch.tensor([[1.0, 1.0]])
    assert gaussian_fit_kl(line) > 10


def test_aggregate_posterior_samples_moments():
    g = torch.Generator().manual_seed(0)
    mu, logvar = torch.randn(50, 2, generator=g), torch.full((50, 2), -2.0)
    draws = aggregate_posterior_samples(mu, logvar, 100_000, g)
    cov = torch.cov(mu.T, correction=0) + torch.diag(logvar.exp().mean(0))
    assert torch.allclose(draws.mean(0), mu.mean(0), atol=0.02) and torch.allclose(torch.cov(draws.T), cov, atol=0.03)
    points = aggregate_posterior_samples(mu, None, 20, g)
    assert all(any(torch.equal(p, m) for m in mu) for p in points)


def test_confident_share_and_label_distance():
    class Fixed(torch.nn.Module):
        def forward(self, x):                                 # class = brightest quadrant, confidence from contrast
            return 200 * x.reshape(-1, 2, 14, 2, 14).mean((2, 4)).reshape(-1, 4)

    x, labels = _digits(40)
    judge = Fixed()
    assert confident_share(judge, x) == 1.0
    assert confident_share(judge, torch.full((5, 784), 0.5)) == 0.0
    assert label_distance(judge, x, x) == 0
    assert label_distance(judge, x[labels == 0], x[labels == 1]) == 1
    assert label_distance(judge, x[labels < 2], x[labels < 3]) == pytest.approx(1 / 3)
    assert label_distance(judge, x[labels < 2], x[labels < 3]) == pytest.approx(1 / 3)


# ------------------------------------------------------------------------------------------ training, the CLI

def test_training_learns_and_evaluates():
    x, y = _digits(200)
    torch.manual_seed(0)
    model = VAE(VAEConfig(latent_dim=2, hidden_dims=(64,)))
    losses = train_vae(model, x, epochs=15, batch_size=50, lr=3e-3, seed=0)
    assert len(losses) == 60 and sum(losses[-4:]) < 0.5 * sum(losses[:4])
    classifier = train_classifier(x, y, epochs=20, batch_size=50, seed=0)
    metrics = evaluate_vae(model, x, classifier, samples=200)
    assert set(metrics) == {"reconstruction", "elbo", "kl", "median sigma", "active units", "mmd", "gaussian kl",
                            "confident", "label distance"}
    assert metrics["active units"] >= 1 and metrics["kl"] > 0 and metrics["elbo"] < 0
    assert "elbo" in format_metrics({"m": metrics})
    mu, logvar = encode_all(model, x, batch_size=64)
    assert mu.shape == logvar.shape == (200, 2)


def test_training_is_reproducible():
    x, _ = _digits(60)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = VAE(VAEConfig(latent_dim=2, hidden_dims=(16,)))
        runs.append(train_vae(model, x, epochs=2, batch_size=20, seed=7))
    assert runs[0] == runs[1]


def test_averaged_reconstruction_collapses_the_posterior():
    x, _ = _digits(200)
    results = {}
    for reduction in ("sum", "mean"):
        torch.manual_seed(0)
        model = VAE(VAEConfig(latent_dim=4, hidden_dims=(64,)))
        train_vae(model, x, epochs=20, batch_size=50, lr=3e-3, reduction=reduction, seed=0)
        results[reduction] = active_units(encode_all(model, x)[0])[0]
    assert results["mean"] == 0 < results["sum"]


def test_plain_autoencoder_training_and_evaluation():
    x, _ = _digits(100)
    torch.manual_seed(0)
    model = VAE(VAEConfig(latent_dim=2, hidden_dims=(32,), variational=False))
    train_vae(model, x, epochs=2, batch_size=50)
    metrics = evaluate_vae(model, x, samples=100)
    assert math.isnan(metrics["elbo"]) and math.isnan(metrics["kl"]) and metrics["mmd"] > 0
    with pytest.raises(ValueError, match="no posterior to regularise"):
        train_vae(model, x, epochs=1, regulariser="kl")
    with pytest.raises(ValueError, match="no ELBO"):
        elbo(model, x)


def test_nan_loss_stops_with_the_step():
    x, _ = _digits(40)
    torch.manual_seed(0)
    model = VAE(VAEConfig(latent_dim=2, hidden_dims=(16,)))
    with torch.no_grad():
        model.decoder[-1].bias.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="at step 1"):          # the trainer counts steps from 1
        train_vae(model, x, epochs=1, batch_size=20)


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = VAE(VAEConfig(latent_dim=3, arch="conv", channels=(4, 8)))
    folder = model.save_pretrained(tmp_path / "ckpt")
    restored = VAE.from_pretrained(folder)
    x, _ = _digits(3)
    assert restored.config == model.config and torch.equal(restored.reconstruct(x), model.reconstruct(x))
    assert json.loads((folder / "config.json").read_text())["model_type"] == "VAE"
    with pytest.raises(FileNotFoundError):
        VAE.from_pretrained(tmp_path / "missing")
    other = VAE(VAEConfig(latent_dim=3, arch="conv", channels=(4, 16)))          # same config class, other shapes
    other_folder = other.save_pretrained(tmp_path / "other")
    (other_folder / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(ValueError):
        VAE.from_pretrained(other_folder)


def test_noise_argument_gives_the_draws_of_the_generator():
    torch.manual_seed(0)
    model = VAE(VAEConfig(latent_dim=2, hidden_dims=(8,)))
    x, _ = _digits(4)
    noise = torch.randn(4, 2, generator=torch.Generator().manual_seed(5))
    a = model(x, torch.Generator().manual_seed(5))
    b = model(x, noise=noise)
    assert torch.equal(a.z, b.z)
    with pytest.raises(ValueError, match="noise"):
        model(x, noise=torch.zeros(3, 2))


def test_pixels_to_unit_on_user_arrays():
    import numpy as np

    images = np.arange(2 * 28 * 28).reshape(2, 28, 28) % 256
    x = pixels_to_unit(images)
    assert x.shape == (2, 784) and x.dtype == torch.float32 and x.max() == 1.0 and x.min() == 0
    assert torch.equal(pixels_to_unit(images.reshape(2, -1)), x)
    with pytest.raises(ValueError, match=r"\[0, 255\]"):
        pixels_to_unit(images * 2.0)
    with pytest.raises(ValueError, match="NaN"):
        pixels_to_unit(np.full((1, 784), np.nan))


SIMBOOK = shutil.which("simbook") or str(Path(sys.executable).parent / "simbook")


def _cli(*args):
    env = dict(os.environ, COLUMNS="100", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-c", "import sys; from simbook.cli import main; sys.exit(main())", *args],
                          capture_output=True, text=True, timeout=300, env=env, stdin=subprocess.DEVNULL)


def test_cli_short_run_saves_the_model_and_the_record(tmp_path):
    result = _cli("vae", "--epochs", "1", "--classifier-epochs", "1", "--latent-dim", "3", "--save",
                  str(tmp_path / "run"), "--no-progress", "--device", "cpu", "--seed", "3")
    assert result.returncode == 0, result.stderr
    assert "elbo" in result.stdout and "active units" in result.stdout and "saved to" in result.stdout
    assert VAE.from_pretrained(tmp_path / "run").config.latent_dim == 3
    record = json.loads((tmp_path / "run" / "record.json").read_text())
    assert record["status"] == "finished" and record["seed"] == 3 and record["config"]["epochs"] == 1
    assert "elbo" in record["final"] and record["command"]


def test_cli_defaults_are_the_config_defaults():
    from simbook.cli import build_parser
    from simbook.training import config_from_args

    assert config_from_args(VAEExperimentConfig, build_parser().parse_args(["vae"])) == VAEExperimentConfig()
    assert VAEExperimentConfig().epochs == 30 and VAEExperimentConfig.small().epochs == 12


def test_resumed_training_equals_the_uninterrupted_run(tmp_path):
    x, _ = _digits(60)
    runs = []
    for resume in (False, True):
        torch.manual_seed(0)
        model = VAE(VAEConfig(latent_dim=2, hidden_dims=(16,)))
        folder = tmp_path / ("resumed" if resume else "straight")
        if resume:                                   # stop after epoch 1, then continue from the checkpoint
            train_vae(model, x, epochs=1, batch_size=20, seed=1, device="cpu", checkpoint_dir=folder,
                      config={"run": 1})
            torch.manual_seed(1)
            model = VAE(VAEConfig(latent_dim=2, hidden_dims=(16,)))
        losses = train_vae(model, x, epochs=2, batch_size=20, seed=1, device="cpu", checkpoint_dir=folder,
                           resume=resume, config={"run": 1})
        runs.append((losses, model))
    (straight, a), (resumed, b) = runs
    assert resumed == straight[3:]
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q)


@pytest.mark.parametrize("args, message", [
    (["vae", "--latent-dim", "0"], "latent_dim must be >= 1"),
    (["vae", "--epochs", "0"], "epochs must be >= 1"),
    (["vae", "--arch", "rnn"], "invalid choice"),
    (["vae", "--beta", "-1", "--epochs", "1", "--classifier-epochs", "1"], "beta must be"),
])
def test_cli_bad_arguments(args, message):
    result = _cli(*args)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


# ------------------------------------------------------------------------------------------------- bad input

@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    return VAE(VAEConfig(latent_dim=2, hidden_dims=(8,)))


@pytest.mark.parametrize("x, error, message", [
    (torch.rand(3, 100), ValueError, "size 100 on axis 1"),
    (torch.rand(784), ValueError, "2 dimensions"),
    (torch.rand(3, 784) * 255, ValueError, r"in \[0, 1\]"),
    (-torch.rand(3, 784), ValueError, r"in \[0, 1\]"),
    (torch.full((3, 784), float("nan")), ValueError, "NaN"),
    (torch.ones(3, 784, dtype=torch.long), TypeError, "float dtype"),
    (torch.rand(0, 784), ValueError, "empty"),
    ([[0.5] * 784], TypeError, "torch.Tensor"),
])
def test_bad_inputs(small, x, error, message):
    with pytest.raises(error, match=message):
        small(x)
    with pytest.raises(error, match=message):
        check_pixels(x, dim=784)


@pytest.mark.parametrize("kwargs, error, message", [
    ({"latent_dim": 0}, ValueError, "latent_dim must be >= 1"),
    ({"latent_dim": 2.5}, TypeError, "latent_dim must be an int"),
    ({"arch": "rnn"}, ValueError, "arch must be"),
    ({"arch": "conv", "input_dim": 64}, ValueError, "28x28"),
    ({"hidden_dims": (0,)}, ValueError, "hidden_dims entry must be >= 1"),
    ({"channels": (4, 8, 16)}, ValueError, "two widths"),
])
def test_bad_configs(kwargs, error, message):
    with pytest.raises(error, match=message):
        VAEConfig(**kwargs)


def test_bad_arguments(small):
    x, _ = _digits(4)
    with pytest.raises(TypeError, match="VAEConfig"):
        VAE({"latent_dim": 2})
    with pytest.raises(ValueError, match="z has size 3"):
        small.decode(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="z contains NaN"):
        small.decode(torch.full((2, 2), float("nan")))
    with pytest.raises(ValueError, match="n must be >= 1"):
        small.sample(0)
    with pytest.raises(ValueError, match="steps must be >= 2"):
        small.interpolate(x[0], x[1], steps=1)
    out = small(x)
    with pytest.raises(ValueError, match="regulariser must be one of"):
        vae_loss(x, out, regulariser="l2")
    with pytest.raises(ValueError, match="beta must be"):
        vae_loss(x, out, beta=float("nan"))
    with pytest.raises(ValueError, match="reduction must be"):
        reconstruction_error(x, out.x_hat, "max")
    with pytest.raises(ValueError, match="x_hat has size"):
        reconstruction_error(x, out.x_hat[:2])
    with pytest.raises(ValueError, match="logvar has size"):
        kl_to_standard_normal(torch.zeros(2, 3), torch.zeros(2, 2))
    with pytest.raises(ValueError, match="mu contains NaN"):
        active_units(torch.full((4, 2), float("nan")))
    with pytest.raises(ValueError, match="at least 2"):
        active_units(torch.zeros(1, 2))
    with pytest.raises(ValueError, match="b has size 3"):
        mmd(torch.zeros(5, 2), torch.zeros(5, 3))
    with pytest.raises(ValueError, match="epochs must be >= 1"):
        train_vae(small, x, epochs=0)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        train_vae(small, x * 3)
    with pytest.raises(ValueError, match="threshold"):
        confident_share(DigitClassifier(), x, threshold=1.5)
    with pytest.raises(ValueError, match="y has size"):
        train_classifier(x, torch.zeros(3, dtype=torch.long))


def test_cli_under_torchrun_gives_the_one_process_losses(tmp_path):
    """`simbook vae` runs unchanged under torchrun (2 gloo processes): the same per-step losses as one process."""
    torchrun = Path(sys.executable).parent / "torchrun"
    if not torchrun.exists():
        pytest.skip("torchrun is not installed next to this interpreter")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    args = ["vae", "--epochs", "1", "--classifier-epochs", "1", "--device", "cpu", "--no-progress"]
    one = _cli(*args, "--save", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([str(torchrun), "--nproc_per_node", "2", "-m", "simbook.cli", *args, "--save",
                          str(tmp_path / "two")], capture_output=True, text=True, timeout=300, env=env,
                         stdin=subprocess.DEVNULL)
    assert two.returncode == 0, two.stderr[-2000:]
    records = [json.loads((tmp_path / name / "record.json").read_text()) for name in ("one", "two")]
    one_losses, two_losses = dict(records[0]["losses"]), dict(records[1]["losses"])    # [step, loss] pairs
    assert one_losses.keys() == two_losses.keys() and len(one_losses) >= 4
    for step, loss in one_losses.items():
        assert two_losses[step] == pytest.approx(loss, rel=1e-5)
    assert two.stdout.count("saved to") == 1                    # one process reports

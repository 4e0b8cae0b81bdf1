"""Tests of the latent-path measures of simbook.models.vae (speed, its coefficient of variation, nonlinearity) against
decoders with known answers and a loop-by-loop reference, the path builders, `latent_geometry`, the multi-seed driver
and the `simbook vae-latent` command, and their argument checks."""
import json
import math
import os
import statistics
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from simbook.experiments.vae import (LATENT_METRICS, LatentGeometryConfig, axis_ranges, decode_paths,
                                     format_latent_table, latent_geometry, latent_geometry_experiment,
                                     summarise_seeds)
from simbook.models.vae import (VAE, VAEConfig, axis_codes, line_codes, path_nonlinearity, path_smoothness,
                                path_speeds)

PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


def _reference(codes, images):
    """Loop-by-loop speeds and nonlinearity of one path (lists of tensors), written from the definitions."""
    codes, images = [c.double() for c in codes], [x.double() for x in images]
    speeds = [float((images[k + 1] - images[k]).norm() / (codes[k + 1] - codes[k]).norm())
              for k in range(len(codes) - 1)]
    lengths = [0.0]
    for k in range(len(codes) - 1):
        lengths.append(lengths[-1] + float((codes[k + 1] - codes[k]).norm()))
    chord = float((images[-1] - images[0]).norm())
    deviations = []
    for k in range(1, len(codes) - 1):
        t = lengths[k] / lengths[-1]
        deviations.append(float((images[k] - ((1 - t) * images[0] + t * images[-1])).norm()) / chord)
    return speeds, sum(deviations) / len(deviations)


# ------------------------------------------------------------------------------------------ known answers

@PROPERTY
@given(seed=st.integers(0, 10_000), d=st.integers(1, 5), dim=st.integers(1, 30), points=st.integers(3, 12),
       scale=st.floats(0.01, 100))
def test_a_linear_decoder_has_constant_speed_and_no_nonlinearity(seed, d, dim, points, scale):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(dim, d, generator=g, dtype=torch.float64)
    b = torch.randn(dim, generator=g, dtype=torch.float64)
    start, end = torch.randn(2, 3, d, generator=g, dtype=torch.float64) * scale
    t = torch.cat([torch.zeros(1), torch.rand(points - 2, generator=g).sort().values * 0.98 + 0.01, torch.ones(1)])
    codes = (1 - t.double()[None, :, None]) * start[:, None] + t.double()[None, :, None] * end[:, None]  # uneven
    images = codes @ A.T + b
    mean, cv = path_smoothness(codes, images)
    u = (end - start) / (end - start).norm(dim=-1, keepdim=True)
    torch.testing.assert_close(mean, (u @ A.T).norm(dim=-1))
    torch.testing.assert_close(path_speeds(codes, images), (u @ A.T).norm(dim=-1, keepdim=True).expand(3, points - 1))
    assert cv.abs().max() < 1e-9
    assert path_nonlinearity(codes, images).abs().max() < 1e-9


def test_linear_decoder_along_axes():
    g = torch.Generator().manual_seed(1)
    A = torch.randn(20, 4, generator=g, dtype=torch.float64)
    base = torch.randn(6, 4, generator=g, dtype=torch.float64)
    for axis in range(4):
        codes = axis_codes(base, axis, torch.linspace(-2, 3, 9, dtype=torch.float64))
        mean, cv = path_smoothness(codes, codes @ A.T)
        torch.testing.assert_close(mean, A[:, axis].norm().expand(6))         # speed |A e_i|, whatever the start
        assert cv.max() < 1e-12 and path_nonlinearity(codes, codes @ A.T).max() < 1e-12


@pytest.mark.parametrize("angle, points, expected", [
    (math.pi, 3, 0.5),                                    # (0, 1) against the chord midpoint (0, 0), chord 2
    (math.pi / 2, 3, (math.sqrt(2) - 1) / 2),             # (cos 45, sin 45) against (1/2, 1/2), chord sqrt 2
])
def test_circle_decoder_is_steady_but_curved(angle, points, expected):
    z = torch.linspace(0, angle, points, dtype=torch.float64)[None, :, None]
    images = torch.cat([z.cos(), z.sin()], -1)
    mean, cv = path_smoothness(z, images)
    h = angle / (points - 1)
    assert mean.item() == pytest.approx(2 * math.sin(h / 2) / h) and cv.item() < 1e-12
    assert path_nonlinearity(z, images).item() == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("segments", [2, 5, 10, 31])
def test_a_single_jump_gives_the_largest_coefficient_of_variation(segments):
    z = torch.linspace(0, 1, segments + 1, dtype=torch.float64)[None, :, None]
    jump = 0.5 / segments + (segments // 2) / segments           # between two points, never on one
    images = torch.cat([(z > jump).double(), torch.zeros_like(z)], -1)
    assert path_smoothness(z, images)[1].item() == pytest.approx(math.sqrt(segments - 1))


@PROPERTY
@given(seed=st.integers(0, 10_000), points=st.integers(3, 10), c=st.floats(0.01, 100))
def test_against_the_loop_reference_and_scale_invariance(seed, points, c):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randn(4, points, 3, generator=g, dtype=torch.float64)
    images = torch.rand(4, points, 7, generator=g, dtype=torch.float64)
    speeds, nonlinearity = path_speeds(codes, images), path_nonlinearity(codes, images)
    for p in range(4):
        want_speeds, want_nl = _reference(list(codes[p]), list(images[p]))
        assert speeds[p].tolist() == pytest.approx(want_speeds, rel=1e-9)
        assert nonlinearity[p].item() == pytest.approx(want_nl, rel=1e-9)
    mean, cv = path_smoothness(codes, images)
    scaled_mean, scaled_cv = path_smoothness(c * codes, images)
    torch.testing.assert_close(scaled_mean, mean / c)
    torch.testing.assert_close(scaled_cv, cv)
    torch.testing.assert_close(path_nonlinearity(c * codes, images), nonlinearity)
    # the mean speed is the image arc length over the latent arc length only for equal steps, the CV never negative
    assert (cv >= 0).all()


def test_a_detour_scores_higher_than_a_cross_fade():
    a, b, c = torch.eye(3, dtype=torch.float64)                    # three "images"
    z = torch.linspace(0, 1, 5, dtype=torch.float64)[None, :, None]
    fade = (1 - z) * a + z * b                                    # a straight cross-fade a -> b
    detour = torch.stack([a, (a + c) / 2, c, (c + b) / 2, b])[None]   # a -> c -> b
    assert path_nonlinearity(z, fade).item() < 1e-12 < 0.3 < path_nonlinearity(z, detour).item()


# ------------------------------------------------------------------------------------------ path builders

def test_line_and_axis_codes():
    start, end = torch.tensor([[0.0, 1.0], [2.0, 2.0]]), torch.tensor([[1.0, -1.0], [2.0, 4.0]])
    line = line_codes(start, end, 5)
    assert line.shape == (2, 5, 2) and torch.equal(line[:, 0], start) and torch.equal(line[:, -1], end)
    torch.testing.assert_close(line[:, 2], (start + end) / 2)
    traversal = axis_codes(start, 0, torch.tensor([-1.0, 0.0, 1.0]))
    assert traversal.shape == (2, 3, 2) and torch.equal(traversal[:, :, 1], start[:, 1:].expand(2, 3))
    assert torch.equal(traversal[0, :, 0], torch.tensor([-1.0, 0.0, 1.0]))
    assert torch.equal(start, torch.tensor([[0.0, 1.0], [2.0, 2.0]]))           # the base is not modified


def test_axis_ranges():
    mu = torch.arange(101.0)[:, None] * torch.tensor([[1.0, -2.0]])
    low, high = axis_ranges(mu, 0.1)
    torch.testing.assert_close(low, torch.tensor([10.0, -180.0]))
    torch.testing.assert_close(high, torch.tensor([90.0, -20.0]))
    low, high = axis_ranges(mu, 0)
    torch.testing.assert_close(low, mu.min(0).values) and torch.testing.assert_close(high, mu.max(0).values)


# ------------------------------------------------------------------------------------------ on models

def _digits(n=60, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 784, generator=g)


def _near_linear_model(seed=0):
    torch.manual_seed(seed)
    model = VAE(VAEConfig(latent_dim=2, hidden_dims=()))          # one Linear layer each way
    with torch.no_grad():
        model.encoder[-1].weight.mul_(10.0)
        model.decoder[-1].weight.mul_(1e-3)                       # tiny logit changes: the sigmoid is ~linear
    return model


def test_latent_geometry_of_a_nearly_linear_decoder():
    metrics = latent_geometry(_near_linear_model(), _digits(), paths=30, steps=9)
    assert set(metrics) == set(LATENT_METRICS) and metrics["active axes"] == 2
    assert metrics["axis nonlinearity"] < 1e-3 and metrics["path nonlinearity"] < 1e-3
    assert metrics["axis speed cv"] < 1e-2 and metrics["path speed cv"] < 1e-2
    assert metrics["axis speed"] > 0 and metrics["path speed"] > 0


def test_latent_geometry_finds_a_jumping_decoder():
    model = _near_linear_model()
    with torch.no_grad():
        model.decoder[-1].weight.mul_(1e5)                        # logits x 100: the sigmoid is now a step
    metrics = latent_geometry(model, _digits(), paths=30, steps=9)
    smooth = latent_geometry(_near_linear_model(), _digits(), paths=30, steps=9)
    assert metrics["axis speed cv"] > 10 * smooth["axis speed cv"]
    assert metrics["path nonlinearity"] > 10 * smooth["path nonlinearity"]


def test_latent_geometry_skips_dead_axes_and_is_seeded():
    model = _near_linear_model()
    with torch.no_grad():
        model.encoder[-1].weight[1].zero_()                       # mu_2 is the same for every input: a dead axis
        model.encoder[-1].bias[1] = 0.3
    x = _digits()
    metrics = latent_geometry(model, x, paths=20, steps=5, seed=3)
    assert metrics["active axes"] == 1 and math.isfinite(metrics["axis speed cv"])
    assert metrics == latent_geometry(model, x, paths=20, steps=5, seed=3)
    with torch.no_grad():
        model.encoder[-1].weight[0].zero_()
    with pytest.raises(ValueError, match="same code"):                 # every input on one code: no path at all
        latent_geometry(model, x, paths=20, steps=5)


def test_decode_paths_matches_decode():
    model = _near_linear_model()
    codes = torch.randn(3, 4, 2)
    images = decode_paths(model, codes)
    with torch.no_grad():
        torch.testing.assert_close(images[1, 2], model.decode(codes[1, 2:3])[0])
    with pytest.raises(ValueError, match="codes has size 3"):
        decode_paths(model, torch.zeros(1, 4, 3))


def test_summarise_seeds_and_table():
    rows = []
    for seed in range(3):
        for name in ("AE", "VAE"):
            rows.append({"seed": seed, "latent_dim": 2, "model": name,
                         **{m: float(seed * (1 + (name == "VAE")) + i) for i, m in enumerate(LATENT_METRICS)}})
    summary = summarise_seeds(rows)
    assert list(summary) == ["d=2 AE", "d=2 VAE"]
    values = [r["axis speed cv"] for r in rows if r["model"] == "VAE"]
    entry = summary["d=2 VAE"]["axis speed cv"]
    assert entry["n"] == 3 and entry["mean"] == pytest.approx(statistics.mean(values))
    assert entry["sd"] == pytest.approx(statistics.stdev(values))
    table = format_latent_table(summary)
    assert "±" in table and "d=2 VAE" in table and len(table.splitlines()) == 3
    assert "±" not in format_latent_table({"one": {m: 1.0 for m in LATENT_METRICS}})
    assert math.isnan(summarise_seeds(rows[:1])["d=2 AE"]["reconstruction"]["sd"])


def test_experiment_small_run_trains_every_model_and_seed():
    config = LatentGeometryConfig.small(latent_dims=(2,), seeds=2, epochs=1, paths=10, steps=5)
    result = latent_geometry_experiment(config, seed=4, device="cpu")
    assert [(r["seed"], r["model"]) for r in result["rows"]] == [(s, m) for s in (4, 5) for m in ("AE", "VAE", "β-VAE")]
    assert set(result["summary"]) == {"d=2 AE", "d=2 VAE", "d=2 β-VAE"}
    assert all(entry["n"] == 2 for entry in result["summary"]["d=2 VAE"].values())


# ------------------------------------------------------------------------------------------ the command

def _cli(*args):
    env = dict(os.environ, COLUMNS="100", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-c", "import sys; from simbook.cli import main; sys.exit(main())", *args],
                          capture_output=True, text=True, timeout=300, env=env, stdin=subprocess.DEVNULL)


def test_cli_writes_the_record(tmp_path):
    result = _cli("vae-latent", "--latent-dims", "2", "--seeds", "2", "--epochs", "1", "--paths", "8", "--steps", "4",
                  "--save", str(tmp_path / "run"), "--device", "cpu", "--no-progress", "--seed", "1")
    assert result.returncode == 0, result.stderr
    assert "±" in result.stdout and "d=2 β-VAE" in result.stdout
    record = json.loads((tmp_path / "run" / "record.json").read_text())
    assert record["status"] == "finished" and record["final"]["seeds"] == 2 and len(record["evaluations"]) == 6
    assert record["final"]["summary"]["d=2 AE"]["path speed cv"]["n"] == 2
    assert not (tmp_path / "run" / "checkpoint").exists()


def test_cli_defaults_are_the_config_defaults():
    from simbook.cli import build_parser
    from simbook.training import config_from_args

    args = build_parser().parse_args(["vae-latent"])
    assert config_from_args(LatentGeometryConfig, args) == LatentGeometryConfig()
    assert LatentGeometryConfig().seeds >= 3 and args.save == "runs/vae-latent"


@pytest.mark.parametrize("args, message", [
    (["vae-latent", "--beta", "1"], "beta must be a finite number > 1"),
    (["vae-latent", "--seeds", "0"], "seeds must be >= 1"),
    (["vae-latent", "--steps", "2"], "steps must be >= 3"),
    (["vae-latent", "--quantile", "0.5"], "quantile must be in"),
    (["vae-latent", "--latent-dims", "0"], "latent_dims entry must be >= 1"),
    (["vae-latent", "--resume", "--save", "/nonexistent/vae-latent"], "resume"),
])
def test_cli_bad_arguments(args, message):
    result = _cli(*args)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


# ------------------------------------------------------------------------------------------ bad input

@pytest.mark.parametrize("codes, images, error, message", [
    ([[[0.0], [1.0]]], torch.rand(1, 2, 3), TypeError, "codes must be a torch.Tensor"),
    (torch.rand(2, 3), torch.rand(2, 3), ValueError, "3 dimensions"),
    (torch.rand(2, 3, 1), torch.rand(3, 3, 4), ValueError, "images has size 3 on axis 0"),
    (torch.rand(2, 3, 1), torch.rand(2, 4, 4), ValueError, "images has size 4 on axis 1"),
    (torch.arange(6).reshape(1, 3, 2), torch.rand(1, 3, 4), TypeError, "float dtype"),
    (torch.full((1, 3, 2), float("nan")), torch.rand(1, 3, 4), ValueError, "NaN"),
    (torch.rand(1, 1, 2), torch.rand(1, 1, 4), ValueError, "at least 2 points"),
    (torch.zeros(1, 3, 2), torch.rand(1, 3, 4), ValueError, "coincide"),
])
def test_bad_paths(codes, images, error, message):
    with pytest.raises(error, match=message):
        path_speeds(codes, images)


def test_bad_paths_for_the_summaries():
    z = torch.linspace(0, 1, 4)[None, :, None]
    with pytest.raises(ValueError, match="same image everywhere"):
        path_smoothness(z, torch.ones(1, 4, 3))
    with pytest.raises(ValueError, match="at least 3 points"):
        path_nonlinearity(z[:, :2], torch.rand(1, 2, 3))
    loop = torch.tensor([[0.0, 1.0, 0.0]]).T[None]                 # starts and ends on the same image
    with pytest.raises(ValueError, match="no chord"):
        path_nonlinearity(z[:, :3], loop)
    with pytest.raises(ValueError, match="no latent length"):
        path_nonlinearity(torch.zeros(1, 3, 1), torch.rand(1, 3, 2))


def test_bad_builder_arguments():
    base = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="axis must be in"):
        axis_codes(base, 3, torch.zeros(4))
    with pytest.raises(TypeError, match="axis must be an int"):
        axis_codes(base, True, torch.zeros(4))
    with pytest.raises(ValueError, match="values must have 1 dimensions"):
        axis_codes(base, 0, torch.zeros(4, 1))
    with pytest.raises(ValueError, match="steps must be >= 2"):
        line_codes(base, base, 1)
    with pytest.raises(ValueError, match="end has size 2"):
        line_codes(base, torch.zeros(2, 2), 3)
    with pytest.raises(ValueError, match="quantile must be in"):
        axis_ranges(base, 0.6)
    model = _near_linear_model()
    with pytest.raises(ValueError, match="steps must be >= 3"):
        latent_geometry(model, _digits(), steps=2)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        latent_geometry(model, _digits() * 3)
    with pytest.raises(TypeError, match="LatentGeometryConfig"):
        latent_geometry_experiment({"seeds": 3})

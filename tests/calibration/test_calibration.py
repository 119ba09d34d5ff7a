"""Calibration: losses, observation model, synthetic-truth recovery, GVI, CalibNN, sensitivity."""

import subprocess
import sys

import pytest
import torch

from simulation.calibration import (
    ObservationModel,
    calibrate,
    load_nyc_cases,
    log_mse,
    negbin_nll,
    poisson_nll,
)
from simulation.calibration.calibnn import CalibNN, calibnn_features
from simulation.calibration.data import DataError
from simulation.calibration.metrics import fit_quality
from simulation.calibration.nyc import fit_nyc_first_wave
from simulation.calibration.point import CalibrationError
from simulation.calibration.sensitivity import forward_sensitivity, reverse_sensitivity
from simulation.calibration.synthetic import recover_beta
from simulation.calibration.vi import DiagonalGaussian, PlanarFlow, fit_gvi
from simulation.engine import simulate
from simulation.models import SIR
from simulation.population import random_contact_graph


def test_nyc_data_bundled_and_from_path(tmp_path):
    s = load_nyc_cases()
    assert len(s) == 122 and str(s.dates[0]) == "2020-03-01"
    assert s.counts.max() > 5000  # early April peak, confirmed + probable
    bx = load_nyc_cases(column="BX_CASE_COUNT")
    assert bx.counts.sum() < s.counts.sum()
    with pytest.raises(DataError):
        load_nyc_cases(tmp_path / "missing.csv")
    with pytest.raises(DataError):
        load_nyc_cases(column="NOPE")


def test_losses_are_minimised_at_the_truth():
    y = torch.tensor([0.0, 3.0, 10.0, 40.0])
    for loss in (poisson_nll, negbin_nll, log_mse):
        at_truth = loss(y.clamp(min=1e-3), y)
        assert loss(y * 1.3 + 1, y) > at_truth
        assert loss(y * 0.7, y) > at_truth


def test_observation_model_scales_and_delays():
    obs = ObservationModel(ascertainment=0.25, delay_mean=4.0)
    infections = torch.zeros(40)
    infections[5] = 100.0
    reported = obs(infections).detach()
    assert reported.sum() == pytest.approx(25.0, rel=0.02)
    mean_day = (torch.arange(40) * reported).sum() / reported.sum()
    assert 5 + 3 < mean_day < 5 + 5
    assert reported[:5].sum() == 0
    with pytest.raises(ValueError):
        ObservationModel(ascertainment=1.5)


def test_recover_beta_synthetic_truth_small():
    res = recover_beta(agents=10_000, days=30, steps=30, seed=3)
    assert abs(res.params["beta"] / 0.5 - 1) < 0.05


@pytest.mark.slow
def test_recover_beta_synthetic_truth_100k_within_5_percent():
    res = recover_beta(agents=100_000)
    assert abs(res.params["beta"] / 0.5 - 1) < 0.05
    assert res.seconds < 60


def test_calibrate_rejects_bad_settings_and_nan():
    p = torch.nn.Parameter(torch.tensor(1.0))
    with pytest.raises(CalibrationError):
        calibrate(lambda: p * 2, {}, steps=3)
    with pytest.raises(CalibrationError):
        calibrate(lambda: p * float("nan"), {"p": p}, steps=3)


@pytest.mark.parametrize("family", [DiagonalGaussian, PlanarFlow])
def test_gvi_recovers_a_gaussian_posterior(family):
    torch.manual_seed(0)
    # loss = negative log-likelihood of N(1.0, 0.2²) in z; prior N(0, 10²): posterior ≈ N(1, 0.2²)
    prior = torch.distributions.Normal(torch.zeros(1), torch.full((1,), 10.0))
    res = fit_gvi(lambda z: 0.5 * ((z[0] - 1.0) / 0.2) ** 2, family(torch.zeros(1)), prior,
                  steps=400, samples=8, lr=0.03)
    lo, med, hi = res.interval(level=0.9)
    assert med.item() == pytest.approx(1.0, abs=0.07)
    assert (hi - lo).item() == pytest.approx(2 * 1.645 * 0.2, rel=0.35)


def test_calibnn_features_and_range():
    cases = torch.arange(50, dtype=torch.float32)
    f = calibnn_features(cases)
    assert f.shape == (50, 9)
    assert torch.all(f[:7, 0] == 0)  # nothing known before the lag
    beta = CalibNN(9)(f)
    assert beta.shape == (50,) and torch.all((beta > 0.02) & (beta < 1.5))


def test_nyc_first_wave_fit_small():
    # 25 steps stopped short of convergence on some populations (R² 0.78 vs 0.96 at 40)
    fit = fit_nyc_first_wave(agents=5_000, steps=40, posterior_steps=2, posterior_samples=1)
    assert fit.quality["r2_7day"] > 0.8
    assert 0.01 < fit.ascertainment < 0.9
    lo, med, hi = fit.band
    assert torch.all(lo <= hi)


def test_sensitivity_forward_matches_reverse():
    g = random_contact_graph(3000, 10, seed=1)
    m = SIR()
    fwd = forward_sensitivity(m, lambda: simulate(m, g, 15, seed=1, estimator="straight_through")["I"])
    rev = reverse_sensitivity(m, lambda: simulate(m, g, 15, seed=1, estimator="straight_through")["I"][-1])
    for name in rev:
        assert fwd[name][-1].item() == pytest.approx(rev[name].item(), rel=1e-3)
    assert rev["substeps.recovery.gamma"] < 0 < rev["substeps.infection.beta"]


def test_fit_quality_perfect_and_bad():
    y = torch.rand(60) * 100 + 10
    assert fit_quality(y, y)["r2_7day"] == pytest.approx(1.0)
    assert fit_quality(torch.zeros(60), y)["r2_7day"] < 0


def test_cli_calibrate_synthetic(tmp_path):
    res = subprocess.run([sys.executable, "-m", "lpm_cli", "calibrate", "--scenario", "synthetic",
                          "--agents", "5000", "--steps", "5", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "synthetic.json").exists()
    bad = subprocess.run([sys.executable, "-m", "lpm_cli", "calibrate", "--scenario", "mars"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0

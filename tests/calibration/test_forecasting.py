"""Warm-started window fits, forecasts with bands, baselines, scores and backtests (small, fast)."""

import subprocess
import sys
from datetime import date

import numpy as np
import pandas as pd
import pytest

from simulation.calibration.backtest import run_backtest
from simulation.calibration.baselines import baseline_forecast, log_linear_path, persistence_path
from simulation.calibration.data import DataError, load_case_frame
from simulation.calibration.forecast import ForecastConfig, growth_volatility, run_forecast
from simulation.calibration.scoring import QUANTILES, coverage, mae_7day, seven_day, wis
from simulation.calibration.window import WindowConfig, day_of_week_profile, fit_window

SMALL = WindowConfig(agents=3_000, steps=25, posterior_steps=3)
TINY = ForecastConfig(window=SMALL, fit_days=28, draws=4, noise_samples=5)


def test_wis_and_coverage_known_values():
    y = np.array([10.0, 20.0])
    exact = np.repeat(y[:, None], 7, axis=1)
    assert np.allclose(wis(exact, y), 0.0)
    q = np.array([[8, 9, 9.5, 10, 10.5, 11, 12]], dtype=float)
    # ½|y−m| = 0; intervals (α=.05: 4, α=.2: 2, α=.5: 1) → (0.025·4 + 0.1·2 + 0.25·1) / 3.5
    assert wis(q, np.array([10.0]))[0] == pytest.approx((0.1 + 0.2 + 0.25) / 3.5)
    far = wis(q, np.array([20.0]))[0]
    assert far > 5  # outside every interval: penalties dominate
    assert coverage(np.vstack([q, q]), np.array([10.0, 20.0])) == 0.5
    assert mae_7day(np.array([1.0, 3.0]), np.array([2.0, 2.0])) == 1.0
    assert np.allclose(seven_day(np.full(3, 7.0), np.zeros(6)), [1, 2, 3])


def test_baselines_on_known_series():
    flat = np.full(40, 100.0)
    assert np.allclose(persistence_path(flat, 5), 100.0)
    growing = 50 * np.exp(0.05 * np.arange(60))
    path = log_linear_path(growing, 10)
    avg_now = growing[-7:].mean()
    assert path[0] == pytest.approx(avg_now * np.exp(0.05), rel=1e-3)
    history = pd.Series(np.random.default_rng(0).poisson(200, 150).astype(float),
                        index=pd.date_range("2021-01-01", periods=150))
    for name in ("persistence", "log_linear"):
        q, p7 = baseline_forecast(name, history, 14, np.ones(7))
        assert q.shape == (14, 7) and p7.shape == (14,)
        assert np.all(np.diff(q, axis=1) >= 0)
        assert np.all((q[:, 0] < 200) & (q[:, 6] > 200))  # Poisson(200) noise inside the 95 % band


def test_day_of_week_profile_recovers_weekday_effects():
    prof = np.array([1.3, 1.1, 1.0, 1.0, 1.0, 0.7, 0.6])
    prof = prof / np.exp(np.log(prof).mean())
    idx = pd.date_range("2021-03-01", periods=120)
    series = pd.Series(500 * prof[idx.weekday], index=idx)
    assert np.allclose(day_of_week_profile(series), prof, rtol=0.02)


def test_growth_volatility_small_for_steady_growth_large_for_jumps():
    idx = pd.date_range("2021-01-01", periods=140)
    steady = pd.Series(100 * np.exp(0.02 * np.arange(140)), index=idx)
    assert growth_volatility(steady) == pytest.approx(0.03)  # floor
    jumpy = pd.Series(1e4 * np.exp(np.cumsum(np.random.default_rng(1).normal(0, 0.1, 140))), index=idx)
    assert growth_volatility(jumpy) > 0.05


def test_warm_start_window_fit_small():
    fit = fit_window("2020-10-01", "2020-11-15", config=SMALL)
    assert fit.quality["r2_7day"] > 0.8
    assert 0.1 < fit.r0 < 0.5  # immunity from the spring wave (cases / historical ascertainment)
    assert fit.dates[0] == date(2020, 10, 1) and len(fit.observed) == 46
    with pytest.raises(DataError, match="shorter than 14 days"):
        fit_window("2020-10-01", "2020-10-05", config=SMALL)


def test_forecast_reproducible_and_well_formed(tmp_path):
    a = run_forecast("2020-11-01", 14, config=TINY)
    b = run_forecast("2020-11-01", 14, config=TINY)
    assert np.array_equal(a.quantiles, b.quantiles)
    frame = a.to_frame()
    assert list(frame.columns) == ["date"] + [f"q{q}" for q in QUANTILES]
    assert frame.date.iloc[0] == "2020-11-02" and len(frame) == 14
    assert np.all(np.diff(a.quantiles, axis=1) >= 0)
    with pytest.raises(DataError, match="after the last date"):
        run_forecast("2021-02-01", 14, config=TINY)
    with pytest.raises(DataError, match="fewer than"):
        run_forecast("2020-03-10", 14, config=TINY)


def test_backtest_scores_model_and_baselines(tmp_path):
    bt = run_backtest(["2020-09-01"], (7, 14), config=TINY)
    assert set(bt.summary.method) == {"simulator", "ensemble", "persistence", "log_linear"}
    assert len(bt.rows) == 8 and bt.rows.mae.notna().all()
    paths = bt.write(tmp_path)
    assert all(p.exists() for p in paths)
    assert "| 14 | simulator |" in (tmp_path / "summary.md").read_text()
    with pytest.raises(DataError, match="past the last date"):
        run_backtest(["2020-12-20"], (28,), config=TINY)


def test_cli_forecast(tmp_path):
    common = ["--agents", "2000", "--fit-days", "28", "--draws", "3", "--steps", "10"]
    res = subprocess.run([sys.executable, "-m", "lpm_cli", "forecast", "--origin", "2020-10-15",
                          "--horizon", "7", *common, "--out", str(tmp_path / "f")],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    head = (tmp_path / "f" / "forecast.csv").read_text().splitlines()[0]
    assert head == "date,q0.025,q0.1,q0.25,q0.5,q0.75,q0.9,q0.975"
    assert (tmp_path / "f" / "forecast.png").exists()
    bad = subprocess.run([sys.executable, "-m", "lpm_cli", "forecast", "--origin", "10/15/2020", *common,
                          "--out", str(tmp_path / "g")], capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "YYYY-MM-DD" in bad.stderr + bad.stdout


@pytest.mark.slow
def test_cli_backtest(tmp_path):
    common = ["--agents", "2000", "--fit-days", "28", "--draws", "3", "--steps", "10"]
    res = subprocess.run([sys.executable, "-m", "lpm_cli", "backtest", "--origins", "2020-09-01",
                          "--horizons", "7", *common, "--out", str(tmp_path / "b")],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "b" / "summary.md").exists() and (tmp_path / "b" / "backtest.png").exists()


@pytest.mark.slow
@pytest.mark.parametrize(("start", "end"), [("2020-03-01", "2020-06-30"), ("2020-06-01", "2020-08-31"),
                                            ("2020-09-01", "2020-11-30"), ("2020-10-15", "2020-12-31")])
def test_in_window_r2_at_least_0_9_on_2020_windows(start, end):
    fit = fit_window(start, end, config=WindowConfig(agents=20_000))
    assert fit.quality["r2_7day"] >= 0.9


def test_shared_csv_is_accepted():
    s = load_case_frame("/work/shared/data/nyc/cases-by-day-2020.csv")
    assert s.index[0] == pd.Timestamp("2020-02-29")

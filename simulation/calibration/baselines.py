"""Baseline forecasts of daily cases with empirical quantiles: persistence and log-linear trend.

* persistence — the last observed 7-day average held flat;
* log-linear — least squares of log(7-day average) on time over the last ``fit_days`` days,
  extrapolated.

Both multiply the 7-day-average path by the day-of-week profile for daily medians. Their
quantiles are empirical: the same method is run at every past origin whose outcome was known
by the forecast origin (up to ``lookback`` days back) and the quantiles of log(observed daily /
forecast daily) at each horizon are applied to today's point forecast. Nothing after the origin
is read.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd

from simulation.calibration.scoring import QUANTILES

__all__ = ["BASELINES", "baseline_forecast", "log_linear_path", "persistence_path"]


def persistence_path(daily: np.ndarray, horizon: int) -> np.ndarray:
    """7-day-average path: the last 7-day average, flat."""
    return np.full(horizon, float(np.mean(daily[-7:])))


def log_linear_path(daily: np.ndarray, horizon: int, fit_days: int = 14) -> np.ndarray:
    """7-day-average path: exponential trend fitted to the last ``fit_days`` 7-day averages."""
    c = np.cumsum(np.concatenate([[0.0], daily]))
    avg = (c[7:] - c[:-7]) / 7.0
    y = np.log(np.maximum(avg[-fit_days:], 0.5))
    t = np.arange(len(y), dtype=float)
    b, a = np.polyfit(t, y, 1)
    future = t[-1] + np.arange(1, horizon + 1)
    return np.exp(a + b * future)


BASELINES: dict[str, Callable[[np.ndarray, int], np.ndarray]] = {
    "persistence": persistence_path,
    "log_linear": log_linear_path,
}


def baseline_forecast(name: str, history: pd.Series, horizon: int, dow: np.ndarray,
                      lookback: int = 120, min_history: int = 21) -> tuple[np.ndarray, np.ndarray]:
    """(quantiles [horizon, 7] of daily cases, 7-day-average point path [horizon]) from
    ``history`` (daily counts indexed by date, ending at the origin)."""
    method = BASELINES[name]
    daily = history.to_numpy(dtype=float)
    origin = history.index[-1]
    weekdays = np.array([(origin + pd.Timedelta(days=h)).weekday() for h in range(1, horizon + 1)])
    point7 = method(daily, horizon)
    median = point7 * dow[weekdays]
    errors = []
    for o in range(max(min_history, len(daily) - lookback), len(daily) - horizon):
        past = method(daily[: o + 1], horizon)
        wd = np.array([(history.index[o] + pd.Timedelta(days=h)).weekday() for h in range(1, horizon + 1)])
        obs = daily[o + 1: o + 1 + horizon]
        errors.append(np.log(np.maximum(obs, 0.5)) - np.log(np.maximum(past * dow[wd], 0.5)))
    if len(errors) >= 10:
        e = np.quantile(np.stack(errors), QUANTILES, axis=0).T  # [horizon, 7]
        e = e - e[:, 3:4]  # keep the method's own median as the point
    else:  # too little history: a symmetric log-normal spread growing with the horizon
        from scipy.stats import norm

        sd = 0.15 + 0.02 * np.arange(1, horizon + 1)
        e = sd[:, None] * norm.ppf(QUANTILES)[None, :]
    return median[:, None] * np.exp(e), point7

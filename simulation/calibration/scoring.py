"""Forecast scores: MAE/MAPE of the 7-day average, weighted interval score, interval coverage.

Quantile forecasts are arrays [days, len(QUANTILES)] at the levels of ``QUANTILES`` (the columns
of ``forecast.csv``). WIS follows Bracher et al. (2021, PLoS Comput Biol): with the median m and
central intervals at levels 1 − α (α ∈ {0.05, 0.2, 0.5}),
WIS = (½|y − m| + Σ_α α/2 · IS_α) / (K + ½), IS_α = (u − l) + 2/α · (l − y)⁺ + 2/α · (y − u)⁺.
"""

from __future__ import annotations

import numpy as np

__all__ = ["QUANTILES", "coverage", "mae_7day", "mape_7day", "seven_day", "wis"]

QUANTILES = (0.025, 0.1, 0.25, 0.5, 0.75, 0.9, 0.975)
_INTERVALS = ((0.05, 0, 6), (0.2, 1, 5), (0.5, 2, 4))  # α, index of lower, index of upper


def seven_day(daily: np.ndarray, before: np.ndarray) -> np.ndarray:
    """Trailing 7-day average of ``daily`` (the 6 days in ``before`` precede its first day)."""
    x = np.concatenate([np.asarray(before, float)[-6:], np.asarray(daily, float)])
    c = np.cumsum(np.concatenate([[0.0], x]))
    return (c[7:] - c[:-7]) / 7.0


def wis(q: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Weighted interval score per day (q [days, 7] at ``QUANTILES``, y [days])."""
    q = np.asarray(q, float)
    y = np.asarray(y, float)
    total = 0.5 * np.abs(y - q[:, 3])
    for alpha, lo_i, hi_i in _INTERVALS:
        lo, hi = q[:, lo_i], q[:, hi_i]
        score = (hi - lo) + 2 / alpha * np.clip(lo - y, 0, None) + 2 / alpha * np.clip(y - hi, 0, None)
        total = total + alpha / 2 * score
    return total / (len(_INTERVALS) + 0.5)


def coverage(q: np.ndarray, y: np.ndarray, level: float = 0.8) -> float:
    """Fraction of days with y inside the central ``level`` interval (0.5 or 0.8 or 0.95)."""
    idx = {0.95: (0, 6), 0.8: (1, 5), 0.5: (2, 4)}[level]
    q = np.asarray(q, float)
    return float(np.mean((q[:, idx[0]] <= y) & (y <= q[:, idx[1]])))


def mae_7day(point7: np.ndarray, obs7: np.ndarray) -> float:
    """Mean absolute error of the 7-day averages over the horizon."""
    return float(np.mean(np.abs(np.asarray(point7, float) - np.asarray(obs7, float))))


def mape_7day(point7: np.ndarray, obs7: np.ndarray) -> float:
    """Mean absolute percentage error of the 7-day averages (days with an observed average ≥ 1)."""
    o = np.asarray(obs7, float)
    m = o >= 1
    return float(np.mean(np.abs(np.asarray(point7, float)[m] - o[m]) / o[m])) if m.any() else float("nan")

"""Fit-quality metrics for observed vs simulated series."""

from __future__ import annotations

import torch

from simulation.calibration.data import rolling_mean

__all__ = ["fit_quality"]


def fit_quality(simulated: torch.Tensor, observed: torch.Tensor) -> dict[str, float]:
    """R² and MAPE of the 7-day averages (MAPE over days where the observed average ≥ 1)."""
    s = rolling_mean(simulated.detach().double(), 7)
    o = rolling_mean(observed.detach().double(), 7)
    r2 = 1 - ((o - s) ** 2).sum() / ((o - o.mean()) ** 2).sum().clamp(min=1e-12)
    mask = o >= 1
    mape = ((s[mask] - o[mask]).abs() / o[mask]).mean() if mask.any() else torch.tensor(float("nan"))
    return {"r2_7day": float(r2), "mape_7day": float(mape)}

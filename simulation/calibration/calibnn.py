"""CalibNN (LPM paper Fig. 8): features of the observed data → time-varying parameters.

A small MLP maps per-day features (log of lagged 7-day-average cases, day-of-week one-hot,
normalised time) to β_t within (β_min, β_max). It is trained end to end through the
simulator: the loss gradient reaches the network's weights via ∂ℓ/∂β_t.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from simulation.calibration.data import rolling_mean

__all__ = ["CalibNN", "calibnn_features"]


def calibnn_features(cases: torch.Tensor, lag: int = 7, n_time_basis: int = 8) -> torch.Tensor:
    """[days, 1 + n_time_basis] features: lagged log 7-day average of the observed cases
    (what was known ``lag`` days earlier) and Gaussian bumps over time (smooth β_t)."""
    days = cases.numel()
    avg = torch.log1p(rolling_mean(cases, 7))
    lagged = torch.cat([avg.new_zeros(lag), avg[:-lag]]) if lag else avg
    lagged = lagged / lagged.max().clamp(min=1.0)
    t = torch.linspace(0, 1, days).unsqueeze(1)
    centres = torch.linspace(0, 1, n_time_basis).unsqueeze(0)
    basis = torch.exp(-0.5 * ((t - centres) * (n_time_basis - 1)) ** 2)
    return torch.cat([lagged.unsqueeze(1), basis], 1)


class CalibNN(nn.Module):
    """MLP features → β_t ∈ (beta_min, beta_max)."""

    def __init__(self, n_features: int, hidden: int = 16, beta_min: float = 0.02,
                 beta_max: float = 1.5, beta_init: float = 0.5) -> None:
        super().__init__()
        self.beta_min, self.beta_max = beta_min, beta_max
        head = nn.Linear(hidden, 1)
        self.net = nn.Sequential(nn.Linear(n_features, hidden), nn.Tanh(), head)
        frac = (beta_init - beta_min) / (beta_max - beta_min)
        with torch.no_grad():
            head.weight.mul_(0.1)
            head.bias.fill_(math.log(frac / (1 - frac)))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        s = torch.sigmoid(self.net(features).squeeze(-1))
        return self.beta_min + (self.beta_max - self.beta_min) * s

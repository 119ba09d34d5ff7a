"""Generalised variational inference (Knoblauch et al.): loss = E_q[ℓ(x(θ), y)] + w·KL(q‖prior).

θ lives in an unconstrained space (e.g. log β). Two reparameterised families: a diagonal
Gaussian and a planar normalising flow on top of it (richer: skewed, non-Gaussian
posteriors). KL is estimated by Monte Carlo (log q − log prior) at the same samples.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["DiagonalGaussian", "PlanarFlow", "GVIResult", "fit_gvi"]


class DiagonalGaussian(nn.Module):
    """q(z) = N(μ, diag σ²); ``sample(k)`` returns (z [k, d], log q(z) [k])."""

    def __init__(self, mean: torch.Tensor, log_std: float = -2.0) -> None:
        super().__init__()
        self.mean = nn.Parameter(mean.detach().clone().float())
        self.log_std = nn.Parameter(torch.full_like(self.mean, log_std))

    def sample(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        eps = torch.randn(k, self.mean.numel())
        z = self.mean + torch.exp(self.log_std) * eps
        logq = (-0.5 * eps**2 - self.log_std - 0.5 * math.log(2 * math.pi)).sum(-1)
        return z, logq


class PlanarFlow(nn.Module):
    """A diagonal Gaussian base pushed through ``layers`` planar transforms (Rezende & Mohamed)."""

    def __init__(self, mean: torch.Tensor, layers: int = 4, log_std: float = -2.0) -> None:
        super().__init__()
        self.base = DiagonalGaussian(mean, log_std)
        d = self.base.mean.numel()
        self.u = nn.Parameter(torch.zeros(layers, d))
        self.w = nn.Parameter(torch.randn(layers, d) * 0.1)
        self.b = nn.Parameter(torch.zeros(layers))

    def sample(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        z, logq = self.base.sample(k)
        for u, w, b in zip(self.u, self.w, self.b, strict=True):
            # invertibility: û = u + (m(wᵀu) − wᵀu) w/‖w‖², m(x) = −1 + softplus(x)
            wu = w @ u
            u_hat = u + (-1 + torch.nn.functional.softplus(wu) - wu) * w / (w @ w + 1e-9)
            a = torch.tanh(z @ w + b)
            z = z + a.unsqueeze(-1) * u_hat
            psi = (1 - a**2).unsqueeze(-1) * w
            logq = logq - torch.log((1 + psi @ u_hat).abs() + 1e-9)
        return z, logq


Family = DiagonalGaussian | PlanarFlow  # what ``fit_gvi`` fits: anything with ``sample(k)``


@dataclass
class GVIResult:
    family: Family
    losses: list[float]
    runs: int
    seconds: float

    def samples(self, k: int = 500) -> torch.Tensor:
        with torch.no_grad():
            return self.family.sample(k)[0]

    def interval(self, transform: Callable[[torch.Tensor], torch.Tensor] = lambda z: z,
                 level: float = 0.9, k: int = 2000) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(lower, median, upper) of transform(θ) at the central ``level``."""
        x = transform(self.samples(k))
        q = torch.tensor([(1 - level) / 2, 0.5, (1 + level) / 2])
        lo, med, hi = torch.quantile(x, q, dim=0)
        return lo, med, hi


def fit_gvi(
    loss_of: Callable[[torch.Tensor], torch.Tensor],
    family: Family,
    prior: torch.distributions.Distribution,
    *,
    steps: int = 100,
    samples: int = 4,
    kl_weight: float = 1.0,
    lr: float = 0.05,
    progress: Callable[[int, float], None] | None = None,
) -> GVIResult:
    """Fit ``family`` by minimising E_q[loss_of(z)] + w·KL(q‖prior) with reparameterised samples.

    ``loss_of(z)`` runs the simulator at unconstrained parameters z [d] and returns ℓ.
    """
    opt = torch.optim.Adam(family.parameters(), lr=lr)
    losses: list[float] = []
    t0 = time.perf_counter()
    for step in range(steps):
        opt.zero_grad()
        z, logq = family.sample(samples)
        expected = torch.stack([loss_of(zi) for zi in z]).mean()
        kl = (logq - prior.log_prob(z).sum(-1)).mean()
        objective = expected + kl_weight * kl
        objective.backward()
        opt.step()
        losses.append(float(objective.detach()))
        if progress is not None:
            progress(step, losses[-1])
    return GVIResult(family, losses, steps * samples, time.perf_counter() - t0)

"""Count-data losses between simulated expected counts μ and observed counts y (means)."""

from __future__ import annotations

import torch

__all__ = ["LOSSES", "log_mse", "negbin_nll", "poisson_nll"]


def poisson_nll(mu: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean Poisson negative log-likelihood (dropping the log y! constant)."""
    mu = mu.clamp(min=1e-6)
    return (mu - y * torch.log(mu)).mean()


def negbin_nll(mu: torch.Tensor, y: torch.Tensor, dispersion: float | torch.Tensor = 10.0) -> torch.Tensor:
    """Mean negative-binomial NLL with mean μ and dispersion r (variance μ + μ²/r)."""
    mu = mu.clamp(min=1e-6)
    r = torch.as_tensor(dispersion, dtype=mu.dtype)
    ll = (
        torch.lgamma(y + r) - torch.lgamma(r) - torch.lgamma(y + 1)
        + r * torch.log(r / (r + mu)) + y * torch.log(mu / (r + mu))
    )
    return -ll.mean()


def log_mse(mu: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean squared error of log(1 + counts)."""
    return ((torch.log1p(mu.clamp(min=0)) - torch.log1p(y)) ** 2).mean()


LOSSES = {"poisson": poisson_nll, "negbin": negbin_nll, "log_mse": log_mse}

"""From simulated infections to reported cases: ascertainment and reporting delay.

reported(t) = ρ · Σ_k w_k · infections(t − k), with ρ ∈ (0, 1) the ascertainment (reporting
fraction) and w a discretised gamma delay distribution whose mean is a parameter. Both
are ``nn.Parameter``s (in unconstrained form), so calibration fits them with the rest.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ObservationModel"]


class ObservationModel(nn.Module):
    """Ascertainment ρ and a gamma reporting delay (mean ``delay_mean`` days, shape 2)."""

    def __init__(self, ascertainment: float = 0.2, delay_mean: float = 5.0, max_delay: int = 21,
                 delay_shape: float = 2.0) -> None:
        super().__init__()
        if not 0 < ascertainment < 1:
            raise ValueError("ascertainment must be in (0, 1)")
        if delay_mean <= 0:
            raise ValueError("delay_mean must be positive")
        self.logit_ascertainment = nn.Parameter(torch.logit(torch.tensor(ascertainment)))
        self.log_delay_mean = nn.Parameter(torch.log(torch.tensor(delay_mean)))
        self.max_delay = max_delay
        self.delay_shape = delay_shape

    @property
    def ascertainment(self) -> torch.Tensor:
        return torch.sigmoid(self.logit_ascertainment)

    @property
    def delay_mean(self) -> torch.Tensor:
        return torch.exp(self.log_delay_mean)

    def delay_kernel(self) -> torch.Tensor:
        """w_k for k = 0..max_delay (sums to 1)."""
        k = torch.arange(self.max_delay + 1, dtype=torch.float32) + 0.5
        rate = self.delay_shape / self.delay_mean
        logpdf = (self.delay_shape - 1) * torch.log(k) - rate * k
        return torch.softmax(logpdf, 0)

    def forward(self, infections: torch.Tensor) -> torch.Tensor:
        """Expected reported cases per day (same length as ``infections``)."""
        w = self.delay_kernel()
        padded = torch.cat([infections.new_zeros(self.max_delay), infections])
        conv = torch.nn.functional.conv1d(padded.view(1, 1, -1), w.flip(0).view(1, 1, -1))
        return self.ascertainment * conv.view(-1)

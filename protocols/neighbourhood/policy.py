"""Policies of the secure neighbourhood sum: variant, minimum size, padding or refusal,
dropout handling and the range check on decoded sums."""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import IntEnum, StrEnum

import torch

from protocols.neighbourhood.errors import NeighbourSumOutOfRangeError


class Variant(StrEnum):
    """Which protocol computes the sum."""

    PEER = "peer"  # GMW-style additive sharing among the contacts; O(n_i^2) messages
    ASSISTED = "assisted"  # masks known to the coordinator; O(n_i) messages


class BelowMinimum(StrEnum):
    """What happens to a neighbourhood with fewer than ``min_size`` live contacts."""

    PAD = "pad"  # the relay adds dummy contacts that contribute exactly 0
    REFUSE = "refuse"  # no sum is computed; the agent falls back to the public estimate


class Outcome(IntEnum):
    """Per-agent outcome of one step (stored as int8 in fleet mode)."""

    OK = 0
    PADDED = 1
    REFUSED = 2
    EMPTY = 3  # no contacts at all: the sum is 0 and no protocol runs
    DROPPED = 4  # the agent itself went offline during the step: it gets no sum


@dataclass(frozen=True)
class NeighbourhoodPolicy:
    """Explicit settings of the neighbourhood sum.

    ``min_size``: fewest live contacts a neighbourhood may have (counted before padding).
    ``below_minimum``: ``pad`` (dummy zero contributions from the relay, the sum is unchanged)
    or ``refuse`` (the agent gets no private sum and uses ``public_prevalence * sum(w)``).
    Both apply at planning time and again after dropouts.
    ``public_prevalence``: the public estimate used for refused neighbourhoods.
    ``range_tolerance_ulps``: slack, in units of the fixed-point resolution per summand, of the
    range check ``0 <= S <= sum(w)``.
    ``noise_scale``: optional discrete-Laplace noise (scale in contribution units, 0 = off)
    that a relay-run party folds into every sum before the target sees it, clipped to
    ``noise_bound`` (default ``10 * noise_scale``); noisy sums are range-checked against
    ``[-bound, sum(w) + bound]`` and then clamped to ``[0, sum(w)]``.
    """

    min_size: int = 3
    below_minimum: BelowMinimum = BelowMinimum.PAD
    public_prevalence: float = 0.0
    range_tolerance_ulps: float = 1.0
    noise_scale: float = 0.0
    noise_bound: float | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.noise_scale) and self.noise_scale >= 0.0):
            raise ValueError("noise_scale must be finite and >= 0")
        if self.noise_bound is not None and not (
            math.isfinite(self.noise_bound) and self.noise_bound >= 0.0
        ):
            raise ValueError("noise_bound must be finite and >= 0")
        if self.min_size < 1:
            raise ValueError(f"min_size must be >= 1, got {self.min_size}")
        if not 0.0 <= self.public_prevalence <= 1.0:
            raise ValueError(f"public_prevalence must be in [0, 1], got {self.public_prevalence}")
        if self.range_tolerance_ulps < 0 or not math.isfinite(self.range_tolerance_ulps):
            raise ValueError("range_tolerance_ulps must be finite and >= 0")
        object.__setattr__(self, "below_minimum", BelowMinimum(self.below_minimum))

    @property
    def noisy(self) -> bool:
        return self.noise_scale > 0.0

    @property
    def effective_noise_bound(self) -> float:
        if not self.noisy:
            return 0.0
        return 10.0 * self.noise_scale if self.noise_bound is None else self.noise_bound

    def padding_needed(self, live_contacts: int) -> int:
        """Dummy contacts to add to a neighbourhood with ``live_contacts`` (0 if none)."""
        if live_contacts <= 0 or live_contacts >= self.min_size:
            return 0
        return self.min_size - live_contacts if self.below_minimum is BelowMinimum.PAD else 0

    def refuses(self, live_contacts: int) -> bool:
        """True if a neighbourhood of this size is refused."""
        return (
            0 < live_contacts < self.min_size and self.below_minimum is BelowMinimum.REFUSE
        )


def check_range(
    sums: torch.Tensor,
    weight_sums: torch.Tensor,
    n_summands: torch.Tensor | int,
    frac_bits: int,
    tolerance_ulps: float = 1.0,
    extra: float = 0.0,
) -> None:
    """Raise :class:`NeighbourSumOutOfRangeError` if any decoded sum is outside
    ``[0, sum(w)]`` (with ``tolerance_ulps * 2**-frac_bits`` slack per summand, plus
    ``extra`` for the noise bound)."""
    sums = torch.as_tensor(sums, dtype=torch.float64)
    weight_sums = torch.as_tensor(weight_sums, dtype=torch.float64)
    slack = torch.as_tensor(n_summands, dtype=torch.float64) * (
        tolerance_ulps * 2.0**-frac_bits
    ) + extra
    bad = (sums < -slack) | (sums > weight_sums + slack) | ~torch.isfinite(sums)
    if bool(bad.any()):
        where = torch.nonzero(bad).flatten()
        first = int(where[0])
        raise NeighbourSumOutOfRangeError(
            f"{where.numel()} decoded neighbour sum(s) outside [0, sum(w)]; first at index "
            f"{first}: {float(sums.flatten()[first])!r} not in "
            f"[0, {float(weight_sums.flatten()[first])!r}] — tampered or inconsistent shares"
        )

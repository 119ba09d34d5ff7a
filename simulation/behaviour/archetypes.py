"""Archetypes: agents grouped by static attributes (age band, income band, occupation) and a
dynamic one (disease status S/E/I/R). Disease status changes daily, so agents move between
archetypes over time; the grouping is a mixed-radix code, computed in one pass. (Employment
is not a separate dynamic attribute yet: the synthetic population has none.)"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

__all__ = ["ArchetypeSpec", "assign_archetypes", "income_band", "STATUS_NAMES"]

STATUS_NAMES = ("susceptible", "exposed", "infectious", "recovered")
N_INCOME_BANDS = 3


def income_band(attributes: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Income band 0 (low) – 2 (high): from an ``income`` attribute if the population has
    one, otherwise a deterministic proxy from area (areas alternate between bands)."""
    if "income" in attributes:
        return attributes["income"].long().clamp(0, N_INCOME_BANDS - 1)
    return attributes["area"].long() % N_INCOME_BANDS


@dataclass(frozen=True)
class ArchetypeSpec:
    """Which attributes define an archetype, and how many values each takes."""

    age_bands: int = 9
    income_bands: int = N_INCOME_BANDS
    occupations: int = 3  # 0 none/retired, 1 student, 2 worker
    statuses: int = len(STATUS_NAMES)

    @property
    def count(self) -> int:
        """K, the number of archetypes."""
        return self.age_bands * self.income_bands * self.occupations * self.statuses

    def decode(self, k: int) -> dict[str, int]:
        k, status = divmod(k, self.statuses)
        k, occupation = divmod(k, self.occupations)
        age_band, income = divmod(k, self.income_bands)
        return {"age_band": age_band, "income": income, "occupation": occupation, "status": status}


def disease_status(state: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """0 S, 1 E, 2 I, 3 R/M, from the one-hot SEIRM indicators: 3 − 3S − 2E − I."""
    s, e, i = state["S"].detach(), state["E"].detach(), state["I"].detach()
    return (3 - 3 * s - 2 * e - i).round_().long()


def static_code(spec: ArchetypeSpec, attributes: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The part of the archetype id fixed for the run (age, income, occupation) × statuses."""
    code = attributes["age_band"].long().clamp(0, spec.age_bands - 1)
    code = code * spec.income_bands + income_band(attributes)
    occupation = attributes.get("occupation")
    occ = occupation.long() if occupation is not None else torch.zeros_like(code)
    code = code * spec.occupations + occ.clamp(0, spec.occupations - 1)
    return code * spec.statuses


def assign_archetypes(
    spec: ArchetypeSpec,
    attributes: Mapping[str, torch.Tensor],
    state: Mapping[str, torch.Tensor],
    static: torch.Tensor | None = None,
) -> torch.Tensor:
    """Archetype id per agent (int64 in [0, K)); pass ``static`` (from :func:`static_code`)
    to skip recomputing the fixed part every day."""
    base = static if static is not None else static_code(spec, attributes)
    return base + disease_status(state)

"""What a run simulates: the one definition every entry point uses (HTTP ``POST /runs``, the
central runner, ``lpm fleet``, the Flower ServerApp's run config)."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from simulation.population import PRESETS

__all__ = ["MAX_SEED", "RunConfig", "RunConfigError", "population_size"]

MAX_SEED = 2**32 - 1


class RunConfigError(ValueError):
    """Invalid run configuration (one line naming the fields at fault)."""


@functools.lru_cache(maxsize=8)
def _preset_size(population: str) -> tuple[int, int]:
    """(default size, number of areas) of a preset, as ``synthesize`` computes them."""
    preset = PRESETS[population]
    marginals = preset.load()
    base = preset.n if preset.n is not None else marginals.population
    return int(base), len(marginals.areas)


def population_size(population: str, scale: float) -> int:
    """Agents ``synthesize(population, scale=scale)`` builds."""
    base, areas = _preset_size(population)
    return max(int(round(base * scale)), 10 * areas)


class RunConfig(BaseModel):
    """A run's population, size, seed, devices and epidemic parameters (stored with the run).

    Construct with :meth:`make` (raises :class:`RunConfigError`) or validate a request body
    (FastAPI answers 422). Non-finite numbers are refused."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)

    population: str = Field("tiny", description="population preset")
    scale: float = Field(1.0, gt=0, le=1.0, description="fraction of the preset's size")
    days: int = Field(10, ge=1, le=365)
    seed: int = Field(0, ge=0, le=MAX_SEED)
    devices: int = Field(50, ge=1, le=100_000, description="physical agents (devices)")
    beta: float = Field(0.5, gt=0, le=10)
    gamma: float = Field(0.1, gt=0, le=1)
    initial_infected: float = Field(0.01, ge=0, le=1)
    variant: Literal["assisted", "peer"] = "assisted"

    @field_validator("population")
    @classmethod
    def _known_preset(cls, value: str) -> str:
        if value not in PRESETS:
            raise ValueError(f"unknown population preset {value!r}; choose from {sorted(PRESETS)}")
        return value

    @model_validator(mode="after")
    def _devices_fit(self) -> RunConfig:
        n = population_size(self.population, self.scale)
        if self.devices > n:
            raise ValueError(f"{self.devices} devices for a population of {n} agents")
        return self

    @classmethod
    def make(cls, **fields: Any) -> RunConfig:
        """Validate ``fields``; every problem becomes one :class:`RunConfigError`."""
        try:
            return cls(**fields)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}"
                                 for e in exc.errors())
            raise RunConfigError(f"invalid run config: {problems}") from None

    @classmethod
    def from_stored(cls, config: Mapping[str, Any]) -> RunConfig:
        """The config of a stored run (which also carries flags such as ``federated``)."""
        return cls.make(**{k: v for k, v in config.items() if k in cls.model_fields})

    def replace(self, **changes: Any) -> RunConfig:
        return RunConfig.make(**{**self.to_dict(), **changes})

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()

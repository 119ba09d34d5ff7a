"""The coordinator's run loop without Flower: a hybrid run in fleet mode, one stored round per
day, resumable after a crash from the last completed round."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from coordinator.hybrid import HybridSimulation
from coordinator.store import CoordinatorStore
from simulation.models import SIR
from simulation.population import PRESETS, synthesize

__all__ = ["RunConfig", "RunConfigError", "build_simulation", "execute_run"]


class RunConfigError(ValueError):
    """Invalid run configuration."""


@dataclass(frozen=True)
class RunConfig:
    """What a run simulates (stored as the run's config)."""

    population: str = "tiny"
    scale: float = 1.0
    days: int = 10
    seed: int = 0
    devices: int = 50
    beta: float = 0.5
    gamma: float = 0.1
    initial_infected: float = 0.01
    variant: str = "assisted"

    def __post_init__(self) -> None:
        if self.population not in PRESETS:
            raise RunConfigError(f"unknown population preset {self.population!r}")
        if self.days < 1 or self.devices < 1 or self.scale <= 0:
            raise RunConfigError("days, devices and scale must be positive")
        if self.variant not in ("assisted", "peer"):
            raise RunConfigError("variant must be 'assisted' or 'peer'")

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def physical_agents(n: int, devices: int) -> torch.Tensor:
    """Evenly spread physical agent indices (deterministic, public)."""
    if devices > n:
        raise RunConfigError(f"{devices} devices for {n} agents")
    return torch.linspace(0, n - 1, devices).round().to(torch.int64).unique()


def build_simulation(cfg: RunConfig, *, remote: bool = False) -> HybridSimulation:
    pop = synthesize(cfg.population, seed=cfg.seed, scale=cfg.scale)
    model = SIR(beta=cfg.beta, gamma=cfg.gamma, initial_infected=cfg.initial_infected)
    return HybridSimulation(model, pop, physical_agents(pop.n, cfg.devices), cfg.seed,
                            variant=cfg.variant, remote=remote)


def execute_run(store: CoordinatorStore, run_id: str,
                on_day: Callable[[int, dict[str, object]], None] | None = None,
                sim: HybridSimulation | None = None) -> None:
    """Run (or resume) ``run_id`` to completion; each day is committed with its checkpoint."""
    rec = store.get_run(run_id)
    cfg = RunConfig(**rec.config)
    store.set_status(run_id, "running")
    try:
        sim = sim or build_simulation(cfg)
        point = store.resume(run_id)
        if point is not None:
            sim.load_state(point.state)
        while sim.day < cfg.days:
            agg = sim.step()
            store.commit_round(run_id, sim.day, agg, state=sim.state_bytes())
            if on_day is not None:
                on_day(sim.day, agg)
    except Exception as exc:
        store.set_status(run_id, "failed", f"{type(exc).__name__}: {exc}")
        raise
    store.set_status(run_id, "completed")

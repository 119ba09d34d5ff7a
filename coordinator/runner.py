"""The coordinator's run loop without Flower: a hybrid run in fleet mode, one stored round per
day, resumable after a crash from the last completed round. A runner owns its run through a
lease in the store (renewed every day), and never runs a federated run (``"federated"`` in
its config: its ServerApp and devices run it)."""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Callable

import torch

from coordinator.hybrid import HybridSimulation
from coordinator.run_config import RunConfig, RunConfigError
from coordinator.store import CoordinatorStore
from simulation.models import SIR
from simulation.population import synthesize

__all__ = ["DEFAULT_MIN_DEVICES", "LEASE_SECONDS", "RunConfig", "RunConfigError", "RunOwnershipError",
           "build_simulation", "execute_run", "lease_owner", "take_lease"]


DEFAULT_MIN_DEVICES = 10  # minimum cohort: no run, day or published aggregate below it
LEASE_SECONDS = 120.0  # a runner renews its lease every day; a dead one's expires


class RunOwnershipError(RuntimeError):
    """The run belongs to another kind of runner (a federated run to its ServerApp)."""


def lease_owner(kind: str) -> str:
    """A unique lease owner id: ``kind:host:pid:random``."""
    return f"{kind}:{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _dead_local_owner(owner: str) -> bool:
    """True if ``owner`` names a process on this host that no longer exists."""
    parts = owner.split(":")
    if len(parts) != 4 or parts[1] != socket.gethostname() or not parts[2].isdigit():
        return False
    try:
        os.kill(int(parts[2]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def take_lease(store: CoordinatorStore, run_id: str, kind: str) -> str:
    """Acquire ``run_id``'s lease for a new owner of ``kind``; a lease left by a dead process
    on this host is taken over at once (a crashed runner restarts without waiting for the
    lease to expire). Raises :class:`LeaseHeldError` if a live runner holds it."""
    owner = lease_owner(kind)
    held = store.lease(run_id)
    if held is not None and held.expires > time.time() and _dead_local_owner(held.owner):
        store.release_lease(run_id, held.owner)
    store.acquire_lease(run_id, owner, kind, LEASE_SECONDS)
    return owner


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
    if rec.config.get("federated"):
        raise RunOwnershipError(f"run {run_id} is a federated run (its ServerApp and devices "
                                "run it); the central runner never simulates its devices")
    owner = take_lease(store, run_id, "coordinator")  # LeaseHeldError if someone alive has it
    cfg = RunConfig.from_stored(rec.config)
    with store.running(run_id, owner):
        sim = sim or build_simulation(cfg)
        point = store.resume(run_id)
        if point is not None:
            sim.load_state(point.state)
        while sim.day < cfg.days:
            agg = sim.step()
            store.acquire_lease(run_id, owner, "coordinator", LEASE_SECONDS)  # renew
            store.commit_round(run_id, sim.day, agg, state=sim.state_bytes())
            if on_day is not None:
                on_day(sim.day, agg)

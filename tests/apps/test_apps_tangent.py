"""Exact decentralised gradients in the Flower deployment: every device (a real ClientApp in
a device-host process) carries ∂state/∂β, the secure neighbourhood sum carries its
neighbours' tangents in a second round, its SecAgg+'d report carries ∂new_i/∂β; the
coordinator adds the synthetic agents' tangents. The federated per-day Σ ∂new_i/∂β equals
central autograd of the same model and the fleet-mode (simulated devices) value."""

from __future__ import annotations

import pytest
import torch

from coordinator.fleet import ProcessTransport
from coordinator.flower.server_app import FederatedRun, FederatedSettings
from coordinator.hybrid import HybridSimulation
from coordinator.runner import RunConfig, physical_agents
from simulation.engine import simulate
from simulation.models import SIR
from simulation.population import synthesize


@pytest.fixture(autouse=True)
def _threads(monkeypatch):
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")
    torch.set_num_threads(1)


def _central(cfg: RunConfig, estimator: str) -> torch.Tensor:
    pop = synthesize(cfg.population, seed=cfg.seed, scale=cfg.scale)
    model = SIR(cfg.beta, cfg.gamma, cfg.initial_infected)
    new = simulate(model, pop, cfg.days, cfg.seed, estimator=estimator)["new_infections"][1:]
    return torch.tensor([float(torch.autograd.grad(new[t], model.beta, retain_graph=True)[0])
                         for t in range(cfg.days)], dtype=torch.float64)


def _fleet_mode(cfg: RunConfig, estimator: str) -> torch.Tensor:
    pop = synthesize(cfg.population, seed=cfg.seed, scale=cfg.scale)
    sim = HybridSimulation(SIR(cfg.beta, cfg.gamma, cfg.initial_infected), pop,
                           physical_agents(pop.n, cfg.devices), cfg.seed, estimator=estimator,
                           tangents=True, frac_bits=40)
    return torch.tensor([float(sim.step()["d_new_dbeta"]) for _ in range(cfg.days)],
                        dtype=torch.float64)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).abs() / b.abs().clamp(min=1e-12)).max())


@pytest.mark.parametrize("estimator", ["expected", "straight_through"])
def test_flower_devices_carry_tangents_exact_gradient(estimator):
    cfg = RunConfig(population="tiny", days=6, seed=3, devices=50, initial_infected=0.05,
                    beta=0.6)
    central = _central(cfg, estimator)
    fleet = _fleet_mode(cfg, estimator)
    t = ProcessTransport(cfg.devices)
    try:
        run = FederatedRun(t, cfg, settings=FederatedSettings(
            shared_seed=True, tangents=True, estimator=estimator))
        rows = run.run()
    finally:
        t.close()
    fed = torch.tensor([float(r["d_new_dbeta"]) for r in rows], dtype=torch.float64)
    phys = torch.tensor([float(r["d_new_dbeta_physical"]) for r in rows])
    one_step = torch.tensor([float(r["physical_dp_dbeta"]) for r in rows])
    print("central", central.tolist(), "\nfed", fed.tolist(), "\nfleet", fleet.tolist(),
          "\nrel fed/central", _rel(fed, central), "rel fed/fleet", _rel(fed, fleet),
          "\nphys", phys.tolist(), "\none-step phys", one_step.tolist())
    assert len(rows) == cfg.days and all(r["survivors"] == cfg.devices for r in rows)
    assert _rel(fed, central) < 1e-5
    assert _rel(fed, fleet) < 1e-5
    assert all(float(p) != 0.0 for p in phys[1:])  # the devices' tangents are in it
    # the devices' Eq. 11 one-step sum (neighbours held fixed) is not the full-path one
    assert float(((one_step[1:] - phys[1:]).abs() / phys[1:].abs()).min()) > 0.1

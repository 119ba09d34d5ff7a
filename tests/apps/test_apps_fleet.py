"""A simulated fleet of 50 devices (real ClientApps in a device-host process) gives the same
per-day results as the centralised run (and the fleet-mode hybrid run) in the explicit
shared-seed equivalence mode; reports cross SecAgg+. The same with the devices split over
two device-host processes (as a large fleet is by default)."""

from __future__ import annotations

import pytest
import torch

from coordinator.fleet import run_fleet
from coordinator.flower.server_app import FederatedSettings
from coordinator.runner import RunConfig, build_simulation
from coordinator.store import CoordinatorStore
from simulation.engine import simulate
from simulation.models import SIR
from simulation.population import synthesize


@pytest.mark.parametrize("hosts", [1, 2])
def test_fleet_50_devices_equals_central(tmp_path, monkeypatch, hosts):
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")
    torch.set_num_threads(1)
    cfg = RunConfig(population="tiny", days=3, seed=3, devices=50, initial_infected=0.05,
                    beta=0.9)
    store = CoordinatorStore(tmp_path / "c.db")
    rid = store.create_run(cfg.to_dict(), cfg.days)
    rows = run_fleet(cfg, settings=FederatedSettings(shared_seed=True), store=store, run_id=rid,
                     hosts=hosts)
    with torch.no_grad():
        central = simulate(SIR(cfg.beta, cfg.gamma, cfg.initial_infected),
                           synthesize("tiny", seed=cfg.seed), cfg.days, cfg.seed)
    for c in ("S", "I", "R", "new_infections"):
        assert [r[c] for r in rows] == central[c][1:].tolist(), c
    ref = build_simulation(cfg)
    ref_rows = [ref.step() for _ in range(cfg.days)]
    for r, f in zip(rows, ref_rows, strict=True):
        assert r["physical_I"] == f["physical_I"]
        assert r["physical_new_infections"] == f["physical_new_infections"]
        # SecAgg+ fixed-point sum of 50 reports: within 50 half-ulps of 2^-16
        assert r["physical_dp_dbeta"] == pytest.approx(f["physical_dp_dbeta"], abs=1e-3)
        assert r["physical_expected_new"] == pytest.approx(f["physical_expected_new"], abs=1e-3)
    assert all(r["survivors"] == 50 for r in rows)
    assert [r["day"] for r in store.series(rid)] == [1, 2, 3]
    assert store.resume(rid).day == 3

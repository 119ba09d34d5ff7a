"""Seconds per simulated day of a federated hybrid run with 50 devices (real ClientApps in the
fleet's device-host process, SecAgg+ reports), against two same-run baselines on the same
population and seed: the fleet-mode hybrid run (FleetNeighbourhoodSum, no devices) and the
plain central simulator. Target: ≤ 3 s per simulated day with 50 devices. Start-up is
reported separately (first day excluded); the devices run in the shared-seed equivalence
mode so the run can be compared with the hybrid run."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from coordinator.fleet import ProcessTransport, run_fleet  # noqa: E402
from coordinator.runner import RunConfig, build_simulation  # noqa: E402
from coordinator.server_app import FederatedSettings  # noqa: E402
from simulation.engine import simulate  # noqa: E402
from simulation.models import SIR  # noqa: E402
from simulation.population import synthesize  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=int, default=50)
    ap.add_argument("--days", type=int, default=6)
    ap.add_argument("--population", default="oxford")
    ap.add_argument("--scale", type=float, default=0.67)
    args = ap.parse_args()
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    torch.set_num_threads(1)
    cfg = RunConfig(population=args.population, scale=args.scale, days=args.days,
                    devices=args.devices, seed=1)
    stamps: list[float] = []
    t0 = time.perf_counter()
    transport = ProcessTransport(cfg.devices)
    try:
        rows = run_fleet(cfg, settings=FederatedSettings(shared_seed=True), transport=transport,
                         on_day=lambda d, r: stamps.append(time.perf_counter()))
    finally:
        transport.close()
    total = time.perf_counter() - t0
    flower = (stamps[-1] - stamps[0]) / (len(stamps) - 1)

    sim = build_simulation(cfg)
    t = time.perf_counter()
    ref = [sim.step() for _ in range(cfg.days)]
    hybrid = (time.perf_counter() - t) / cfg.days
    torch.set_num_threads(1)
    pop = synthesize(cfg.population, seed=cfg.seed, scale=cfg.scale)
    with torch.no_grad():
        t = time.perf_counter()
        simulate(SIR(cfg.beta, cfg.gamma, cfg.initial_infected), pop, cfg.days, cfg.seed)
        central = (time.perf_counter() - t) / cfg.days
    same = [r["I"] for r in rows] == [r["I"] for r in ref]
    print(f"population {pop.n:,} agents, {args.devices} devices, {cfg.days} days "
          f"(measured on a loaded 2-core host)")
    print(f"federated fleet: {flower:.2f} s/day (steady state); whole run incl. start-up "
          f"{total:.1f} s, of which waiting for the devices {transport.device_seconds:.1f} s; "
          f"target <= 3 s/day: {'met' if flower <= 3 else 'NOT met'}")
    print(f"fleet-mode hybrid (no Flower): {hybrid:.3f} s/day   central simulator: "
          f"{central:.3f} s/day")
    print(f"ratios: federated/hybrid {flower / hybrid:.1f}x, federated/central "
          f"{flower / central:.1f}x; federated run == hybrid run: {same}")


if __name__ == "__main__":
    main()

"""Seconds per simulated day of a federated hybrid run with 50 devices (real ClientApps in the
fleet's device-host process, SecAgg+ reports), against two same-run baselines on the same
population and seed: the fleet-mode hybrid run (FleetNeighbourhoodSum, no devices) and the
plain central simulator. Target: ≤ 3 s per simulated day with 50 devices. Start-up is
reported separately (first day excluded); the devices run in the shared-seed equivalence
mode so the run can be compared with the hybrid run.

Issue 12's 1000-device figure: ``--devices 1000 --scale 0.1 --days 3`` (oxford × 0.1, target
≤ 20 s per simulated day); the per-day list shows day 1 (start-up, enrolment, first key
agreements) apart from the steady days."""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from coordinator.fleet import ProcessTransport, run_fleet  # noqa: E402
from coordinator.flower.server_app import FederatedSettings  # noqa: E402
from coordinator.runner import RunConfig, build_simulation  # noqa: E402
from simulation.engine import simulate  # noqa: E402
from simulation.models import SIR  # noqa: E402
from simulation.population import synthesize  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=int, default=50)
    ap.add_argument("--days", type=int, default=6)
    ap.add_argument("--population", default="oxford")
    ap.add_argument("--scale", type=float, default=0.67)
    ap.add_argument("--hosts", type=int, default=0,
                    help="device-host processes (0: coordinator.fleet.default_device_hosts)")
    args = ap.parse_args()
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    torch.set_num_threads(1)
    cfg = RunConfig(population=args.population, scale=args.scale, days=args.days,
                    devices=args.devices, seed=1)
    stamps: list[float] = []
    t0 = time.perf_counter()
    transport = ProcessTransport(cfg.devices, hosts=args.hosts or None)
    try:
        rows = run_fleet(cfg, settings=FederatedSettings(shared_seed=True), transport=transport,
                         on_day=lambda d, r: stamps.append(time.perf_counter()))
    finally:
        transport.close()
    total = time.perf_counter() - t0
    target = 3 if args.devices <= 50 else 20
    flower = (stamps[-1] - stamps[0]) / (len(stamps) - 1)
    per_day = [round(b - a, 2) for a, b in zip([t0, *stamps[:-1]], stamps, strict=True)]
    rss_coord = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    rss_host = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1e6  # largest host
    hosts = len(transport.procs)

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
    print(f"population {pop.n:,} agents, {args.devices} devices in {hosts} device-host "
          f"process(es), {cfg.days} days (measured on a loaded 2-core host)")
    print(f"federated fleet: {flower:.2f} s/day (steady state); whole run incl. start-up "
          f"{total:.1f} s, of which waiting for the devices {transport.device_seconds:.1f} s; "
          f"target <= {target} s/day: {'met' if flower <= target else 'NOT met'}")
    print(f"seconds per day (day 1 includes start-up, enrolment and the first key "
          f"agreements): {per_day}; peak RSS coordinator {rss_coord:.2f} GB, device host "
          f"{rss_host:.2f} GB; load average {os.getloadavg()[0]:.1f}")
    print(f"fleet-mode hybrid (no Flower): {hybrid:.3f} s/day   central simulator: "
          f"{central:.3f} s/day")
    print(f"ratios: federated/hybrid {flower / hybrid:.1f}x, federated/central "
          f"{flower / central:.1f}x; federated run == hybrid run: {same}")


if __name__ == "__main__":
    main()

"""`lpm fleet`: a federated run over N simulated devices (light module: heavy imports happen
when the command runs, so `lpm --help` stays fast)."""

from __future__ import annotations

import subprocess
import time
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from coordinator.fleet_procs import FleetProcs

__all__ = ["fleet_command"]

_DEFAULT = "Default: RunConfig's (coordinator/run_config.py; listed in docs/federated.md)."


def fleet_command(
    devices: Annotated[int, typer.Option(min=1, help="Simulated devices (real ClientApps in a "
                                                     "device-host process).")],
    days: Annotated[int | None, typer.Option(min=1, help=_DEFAULT)] = None,
    population: Annotated[str | None, typer.Option(help="Population preset. " + _DEFAULT)] = None,
    scale: Annotated[float | None, typer.Option(help="Fraction of the preset. " + _DEFAULT)] = None,
    seed: Annotated[int | None, typer.Option(help="Public seed. " + _DEFAULT)] = None,
    beta: Annotated[float | None, typer.Option(help="β of the simulated world (devices' own "
                                                    "dynamics and the synthetic agents). "
                                                    + _DEFAULT)] = None,
    initial_infected: Annotated[float | None, typer.Option(min=0.0, max=1.0, help=_DEFAULT)
                                ] = None,
    db: Annotated[Path, typer.Option(help="Coordinator SQLite store.")] = Path(
        "lpm-coordinator.db"),
    calibrate: Annotated[str, typer.Option(help="Calibrate θ online: 'beta' (or '' for none).")
                         ] = "",
    beta_init: Annotated[float, typer.Option(help="Starting β of the calibration.")] = 0.3,
    calibrate_every: Annotated[int, typer.Option(min=1, help="Update θ every K days.")] = 1,
    calibrate_steps: Annotated[int, typer.Option(min=1, help="Gauss–Newton steps per update."
                                                 )] = 5,
    beta_segment_days: Annotated[int, typer.Option(min=0, help="β_t: one β per segment of "
                                                   "this many days (0: one β).")] = 0,
    observed_csv: Annotated[Path | None, typer.Option(
        help="Observed series (column new_infections, one row per day); default: the run's "
             "own reported counts.")] = None,
    drop_fraction: Annotated[float, typer.Option(min=0.0, max=0.99, help="Share of devices "
                                                 "that go offline at random days.")] = 0.0,
    drop_seed: int = 0,
    dropout_plan: Annotated[float | None, typer.Option(
        min=0.0, max=0.49, help="Planned share of devices missing a day, which sizes the "
        "daily reports' SecAgg+ graph (docs/secagg.md). Default: the larger of 0.05 and "
        "--drop-fraction.")] = None,
    min_devices: Annotated[int, typer.Option(min=1, help="Minimum cohort.")] = 10,
    shared_seed: Annotated[bool, typer.Option(help="Equivalence-test mode: devices use the "
                                              "public seed (their states become public).")
                           ] = False,
    out: Annotated[Path | None, typer.Option(help="Write OUT/summary.json.")] = None,
    tangents: Annotated[bool, typer.Option(help="Exact decentralised gradients (devices carry "
                                           "∂state/∂β); with --calibrate, θ is fitted with "
                                           "the full-path model (docs/calibration.md).")
                        ] = False,
    estimator: Annotated[str, typer.Option(help="The step's gradient estimator (devices and "
                                           "synthetic agents).")] = "straight_through",
    device_hosts: Annotated[int, typer.Option(min=0, help="Device-host processes the devices "
                                              "are split over (0: one per core from 200 "
                                              "devices, at most 4; else one).")] = 0,
    procs: Annotated[int, typer.Option(min=1, help="Local processes the synthetic population "
                                       "is partitioned over (torch.distributed gloo on "
                                       "127.0.0.1; this process is rank 0 and runs the "
                                       "devices' protocol and calibration; results equal 1 "
                                       "process's). See docs/distributed.md.")] = 1,
) -> None:
    """Run a hybrid run with N simulated devices (optionally calibrating θ and with dropouts)."""
    options = dict(locals())  # every option above, passed on to _fleet
    from coordinator.fleet import (
        FleetError,
        check_procs,
        default_device_hosts,
        start_device_hosts,
        stop_device_host,
    )

    try:  # refused before anything starts
        check_procs(procs)
    except FleetError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=2) from None
    # the device hosts (and the worker ranks of --procs) import their stack (torch, Flower,
    # the ClientApp) while this process imports the coordinator and builds the population:
    # the start-ups overlap
    host = start_device_hosts(min(device_hosts or default_device_hosts(devices), devices))
    workers = None
    try:
        if procs > 1:
            from coordinator.fleet_procs import FleetProcs
            workers = FleetProcs.launch(procs)
        _fleet(host, workers, **options)
    finally:  # no-ops once the run has closed them
        stop_device_host(host)
        if workers is not None:
            workers.close()


def _fleet(host: list[subprocess.Popen], workers: FleetProcs | None, *, devices: int, days: int | None, population: str | None,
           scale: float | None, seed: int | None, beta: float | None,
           initial_infected: float | None, db: Path, calibrate: str, beta_init: float,
           calibrate_every: int, calibrate_steps: int, beta_segment_days: int,
           observed_csv: Path | None, drop_fraction: float, drop_seed: int,
           dropout_plan: float | None, min_devices: int, shared_seed: bool, out: Path | None, tangents: bool,
           estimator: str, device_hosts: int, procs: int) -> None:
    from coordinator.calibration import CalibrationError, CalibrationSettings, read_observed_csv
    from coordinator.fleet import FleetError, run_fleet, timed, write_summary
    from coordinator.flower.secagg import DROPOUT_PLAN
    from coordinator.flower.server_app import FederatedRunError, FederatedSettings
    from coordinator.run_config import RunConfig, RunConfigError
    from coordinator.store import CoordinatorStore, StoreError

    try:
        given = {"population": population, "scale": scale, "days": days, "seed": seed,
                 "devices": devices, "beta": beta, "initial_infected": initial_infected}
        cfg = RunConfig.make(**{k: v for k, v in given.items() if v is not None})
        cal = None
        if calibrate:
            cal = CalibrationSettings(
                params=tuple(p for p in calibrate.split(",") if p), beta_init=beta_init,
                every=calibrate_every, steps=calibrate_steps, segment_days=beta_segment_days,
                observed=tuple(read_observed_csv(observed_csv)) if observed_csv else None)
            if observed_csv and not tangents:
                typer.echo("warning: --observed-csv without --tangents fits θ with Eq. 11, "
                           "which conditions on this run's own states: against another "
                           "series it recovers β only near the truth (docs/calibration.md, "
                           "grid); --tangents fits the full path", err=True)
        if devices < min_devices:
            raise FederatedRunError(f"--devices {devices} is below the minimum cohort "
                                    f"--min-devices {min_devices}")
        if dropout_plan is None:  # plan for the simulated dropouts (capped below a majority)
            dropout_plan = min(max(DROPOUT_PLAN, drop_fraction), 0.45)
        settings = FederatedSettings(min_devices=min_devices, shared_seed=shared_seed,
                                     calibration=cal, tangents=tangents, estimator=estimator,
                                     dropout_plan=dropout_plan)
    except (RunConfigError, CalibrationError, FederatedRunError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=2) from None
    try:
        store = CoordinatorStore(db)
    except StoreError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=2) from None
    rid = store.create_run({**cfg.to_dict(), "federated": True}, cfg.days)

    def show(d: int, r: dict[str, object]) -> None:
        extra = f" β={r['theta_beta']:.4f} loss={r['loss']:.4g}" if "theta_beta" in r else ""
        typer.echo(f"day {d}: S={r['S']:.0f} I={r['I']:.0f} R={r['R']:.0f} devices "
                   f"infected={r['physical_I']} survivors={r['survivors']}{extra}")

    cpu: list[float] = []

    def record(d: int, r: dict[str, object]) -> None:  # this process's (rank 0's) CPU
        cpu.append(time.process_time())
        show(d, r)

    on_day, times = timed(record)
    t0, cpu0 = time.perf_counter(), time.process_time()
    try:
        with store.running(rid):
            if workers is not None:  # launched before the imports: the run, now it is valid
                workers.configure(cfg.to_dict(), devices=cfg.devices, estimator=estimator,
                                  tangents=tangents, replay=tangents and cal is not None)
            rows = run_fleet(cfg, settings=settings, store=store, run_id=rid, on_day=on_day,
                             drop_fraction=drop_fraction, drop_seed=drop_seed, process=host,
                             procs=workers or 1)
    except (FederatedRunError, FleetError) as exc:  # already marked failed
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=1) from None
    typer.echo(f"run {rid} stored in {db}")
    if out is not None:
        extra: dict[str, object] = {
            "run_id": rid, "seconds_total": round(time.perf_counter() - t0, 2),
            "beta_true": beta, "procs": procs,
            "cpu_seconds_per_day": [round(b - a, 3) for a, b in pairwise([cpu0, *cpu])]}
        if workers is not None:  # each worker rank's CPU seconds: setup, then day by day
            extra["worker_cpu_seconds_setup"] = {str(r): round(c[0], 3)
                                                 for r, c in workers.worker_cpu.items()}
            extra["worker_cpu_seconds_per_day"] = {
                str(r): [round(b - a, 3) for a, b in pairwise(c)]
                for r, c in workers.worker_cpu.items()}
        path = write_summary(out, rows, times, extra)
        typer.echo(f"summary: {path}")

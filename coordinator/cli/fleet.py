"""`lpm fleet`: a federated run over N simulated devices (light module: heavy imports happen
when the command runs, so `lpm --help` stays fast)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Annotated

import typer

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
) -> None:
    """Run a hybrid run with N simulated devices (optionally calibrating θ and with dropouts)."""
    options = dict(locals())  # every option above, passed on to _fleet
    from coordinator.fleet import default_device_hosts, start_device_hosts, stop_device_host

    # the device hosts import their stack (torch, Flower, the ClientApp) while this process
    # imports the coordinator and builds the population: the start-ups overlap
    host = start_device_hosts(min(device_hosts or default_device_hosts(devices), devices))
    try:
        _fleet(host, **options)
    finally:  # a no-op once the run's transport has closed it
        stop_device_host(host)


def _fleet(host: list[subprocess.Popen], *, devices: int, days: int | None, population: str | None,
           scale: float | None, seed: int | None, beta: float | None,
           initial_infected: float | None, db: Path, calibrate: str, beta_init: float,
           calibrate_every: int, calibrate_steps: int, beta_segment_days: int,
           observed_csv: Path | None, drop_fraction: float, drop_seed: int,
           min_devices: int, shared_seed: bool, out: Path | None, tangents: bool,
           estimator: str, device_hosts: int) -> None:
    from coordinator.calibration import CalibrationError, CalibrationSettings, read_observed_csv
    from coordinator.fleet import run_fleet, timed, write_summary
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
        if devices < min_devices:
            raise FederatedRunError(f"--devices {devices} is below the minimum cohort "
                                    f"--min-devices {min_devices}")
        settings = FederatedSettings(min_devices=min_devices, shared_seed=shared_seed,
                                     calibration=cal, tangents=tangents, estimator=estimator)
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

    on_day, times = timed(show)
    t0 = time.perf_counter()
    try:
        with store.running(rid):
            rows = run_fleet(cfg, settings=settings, store=store, run_id=rid, on_day=on_day,
                             drop_fraction=drop_fraction, drop_seed=drop_seed, process=host)
    except FederatedRunError as exc:  # already marked failed
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=1) from None
    typer.echo(f"run {rid} stored in {db}")
    if out is not None:
        path = write_summary(out, rows, times, {"run_id": rid, "seconds_total":
                                                round(time.perf_counter() - t0, 2),
                                                "beta_true": beta})
        typer.echo(f"summary: {path}")

"""`lpm calibrate`, `lpm forecast` and `lpm backtest`: fit the simulator to data, forecast with
bands, score forecasts against baselines (`lpm sensitivity` is in simulation/cli.py)."""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

console = Console()


def _bar() -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                    TextColumn("{task.completed}/{task.total} · loss {task.fields[loss]}"),
                    TimeElapsedColumn(), console=console)


class Scenario(StrEnum):
    nyc = "nyc"
    synthetic = "synthetic"


def calibrate_command(
    scenario: Annotated[Scenario, typer.Option(
        help="nyc: first wave, real data; synthetic: recover a known β.")] = Scenario.nyc,
    agents: Annotated[int, typer.Option(min=1_000, help="Synthetic population size.")] = 100_000,
    steps: Annotated[int | None, typer.Option(min=1, help="Adam steps (default 80 for nyc, 40 otherwise).")] = None,
    posterior_steps: Annotated[int, typer.Option(min=1, help="Variational posterior steps (nyc).")] = 15,
    data: Annotated[Path | None, typer.Option(help="Cases CSV in the NYC Health trends/cases-by-day.csv "
                                     "layout (default: the bundled 2020 copy).")] = None,
    start: Annotated[str, typer.Option(help="First day of the fitted window (YYYY-MM-DD).")] = "2020-03-01",
    end: Annotated[str, typer.Option(help="Last day of the fitted window (YYYY-MM-DD).")] = "2020-06-30",
    out: Annotated[Path, typer.Option(help="Output directory.")] = Path("out/calibrate"),
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    institutions: Annotated[str | None, typer.Option(help="Private multi-institution calibration under MPC, e.g. BX,BK,MN,QN,SI "
        "(each institution process reads only its own column of --data).")] = None,
) -> None:
    """Calibrate by gradient descent through the simulator; writes JSON and a PNG."""
    from simulation.calibration.data import DataError

    out.mkdir(parents=True, exist_ok=True)
    steps = steps or (80 if scenario is Scenario.nyc and institutions is None else 40)
    if institutions is not None:
        _institutional(institutions, data, steps, out)
        return
    if scenario is Scenario.synthetic:
        from simulation.calibration.synthetic import recover_beta

        with _bar() as bar:
            task = bar.add_task("recovering β", total=steps, loss="-")
            res = recover_beta(agents=agents, steps=steps, seed=seed + 7,
                               progress=lambda s, v: bar.update(task, completed=s + 1, loss=f"{v:.4f}"))
        beta = res.params["beta"]
        console.print(f"true β 0.5 · recovered {beta:.4f} ({abs(beta / 0.5 - 1):.1%} off) · "
                      f"{res.runs} simulator runs · {res.seconds:.1f} s")
        (out / "synthetic.json").write_text(json.dumps({"beta": beta, "runs": res.runs, "seconds": res.seconds}))
        return
    from simulation.calibration.window import WindowConfig, fit_window

    cfg = WindowConfig(agents=agents, steps=steps, posterior_steps=posterior_steps, seed=seed)
    with _bar() as bar:
        tasks = {"map": bar.add_task("fit (MAP, random-walk β_t)", total=steps, loss="-"),
                 "posterior": bar.add_task("posterior (variational)", total=posterior_steps, loss="-")}
        try:
            fit = fit_window(start, end, path=data, config=cfg,
                             progress=lambda ph, s, v: bar.update(tasks[ph], completed=s + 1, loss=f"{v:.3f}"))
        except DataError as exc:
            raise typer.BadParameter(str(exc)) from exc
    png = fit.plot(out / "calibration.png")
    summary = {"start": start, "end": end, "agents": agents, "fit_agents": min(agents, cfg.fit_agents or agents),
               "seed": seed, **fit.quality,
               "ascertainment": fit.ascertainment, "immune_at_run_start": fit.r0,
               "dispersion": fit.dispersion, "simulator_runs": fit.runs, "seconds": fit.seconds,
               "beta_t": fit.beta_t.tolist()}
    (out / "calibration.json").write_text(json.dumps(summary, indent=2))
    console.print(f"{start} → {end} on {agents:,} agents (seed {seed}): R² (7-day) {fit.quality['r2_7day']:.3f}, "
                  f"MAPE {fit.quality['mape_7day']:.1%}, ascertainment {fit.ascertainment:.1%}, "
                  f"immune at start {fit.r0:.1%}; {fit.runs} runs in {fit.seconds:.0f} s")
    console.print(f"wrote {png} and {out / 'calibration.json'}")


def forecast_command(
    origin: Annotated[str, typer.Option(help="Last day of data used (YYYY-MM-DD); the forecast starts the day after.")],
    horizon: Annotated[int, typer.Option(min=1, max=120, help="Days to forecast.")] = 28,
    data: Annotated[Path | None, typer.Option(help="Cases CSV in the NYC Health trends/cases-by-day.csv layout "
                                     "(default: the bundled 2020 copy).")] = None,
    agents: Annotated[int, typer.Option(min=1_000, help="Synthetic population size.")] = 100_000,
    fit_days: Annotated[int, typer.Option(min=14, help="Days of data fitted before the origin.")] = 56,
    draws: Annotated[int, typer.Option(min=2, help="Posterior draws × future β paths (one simulator run each).")] = 40,
    steps: Annotated[int, typer.Option(min=1, help="Adam steps of the fit.")] = 80,
    seed: Annotated[int, typer.Option(help="Fixes every random choice (population, posterior, noise).")] = 0,
    out: Annotated[Path, typer.Option(help="Output directory.")] = Path("out/forecast"),
) -> None:
    """Forecast daily reported cases with posterior-predictive quantiles; writes forecast.csv + PNG."""
    from simulation.calibration.data import DataError
    from simulation.calibration.forecast import ForecastConfig, run_forecast
    from simulation.calibration.window import WindowConfig

    cfg = ForecastConfig(window=WindowConfig(agents=agents, steps=steps, seed=seed),
                         fit_days=fit_days, draws=draws)
    with _bar() as bar:
        tasks = {"map": bar.add_task("fit (MAP)", total=steps, loss="-"),
                 "posterior": bar.add_task("posterior", total=cfg.window.posterior_steps, loss="-")}
        try:
            fc = run_forecast(origin, horizon, path=data, config=cfg,
                              progress=lambda ph, s, v: bar.update(tasks[ph], completed=s + 1, loss=f"{v:.3f}"))
        except DataError as exc:
            raise typer.BadParameter(str(exc)) from exc
    out.mkdir(parents=True, exist_ok=True)
    csv = fc.write_csv(out / "forecast.csv")
    png = fc.plot(out / "forecast.png")
    q = fc.quantiles
    console.print(f"forecast from {fc.origin} on {agents:,} agents: in-window R² {fc.fit.quality['r2_7day']:.3f}; "
                  f"day {horizon}: median {q[-1, 3]:.0f} cases, 80 % {q[-1, 1]:.0f}–{q[-1, 5]:.0f}; "
                  f"{fc.runs} runs in {fc.seconds:.0f} s")
    console.print(f"wrote {csv} and {png}")


def backtest_command(
    origins: Annotated[str, typer.Option(help="Comma-separated forecast origins (YYYY-MM-DD,...).")],
    horizons: Annotated[str, typer.Option(help="Comma-separated horizons in days.")] = "14,28",
    data: Annotated[Path | None, typer.Option(help="Cases CSV (default: the bundled 2020 copy).")] = None,
    agents: Annotated[int, typer.Option(min=1_000, help="Synthetic population size.")] = 20_000,
    fit_days: Annotated[int, typer.Option(min=14, help="Days of data fitted before each origin.")] = 56,
    draws: Annotated[int, typer.Option(min=2, help="Posterior draws × future β paths per origin.")] = 40,
    steps: Annotated[int, typer.Option(min=1, help="Adam steps per fit.")] = 80,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    out: Annotated[Path, typer.Option(help="Output directory.")] = Path("out/backtest"),
) -> None:
    """Score forecasts from each origin against the data and the persistence / log-linear baselines."""
    from simulation.calibration.backtest import run_backtest
    from simulation.calibration.data import DataError
    from simulation.calibration.forecast import ForecastConfig
    from simulation.calibration.window import WindowConfig

    try:
        origin_list = [o.strip() for o in origins.split(",") if o.strip()]
        horizon_list = [int(h) for h in horizons.split(",") if h.strip()]
    except ValueError as exc:
        raise typer.BadParameter(f"horizons must be integers: {horizons!r}") from exc
    cfg = ForecastConfig(window=WindowConfig(agents=agents, steps=steps, seed=seed),
                         fit_days=fit_days, draws=draws)
    with _bar() as bar:
        task = bar.add_task("origins", total=len(origin_list), loss="-")
        try:
            bt = run_backtest(origin_list, horizon_list, path=data, config=cfg,
                              progress=lambda o, fc: bar.update(task, advance=1, loss=f"R² {fc.fit.quality['r2_7day']:.2f}"))
        except DataError as exc:
            raise typer.BadParameter(str(exc)) from exc
    paths = bt.write(out)
    console.print(bt.markdown())
    console.print("wrote " + ", ".join(str(p) for p in paths))


def _institutional(institutions: str, data: Path | None, steps: int, out: Path) -> None:
    from importlib import resources

    from coordinator.institutional import run_institutional_calibration
    from protocols.mpc.institutional import MPCError

    names = [s.strip().upper() for s in institutions.split(",") if s.strip()]
    path = data or Path(str(resources.files("simulation.data").joinpath("nyc_cases_2020.csv")))
    with _bar() as bar:
        task = bar.add_task(f"MPC calibration ({len(names)} institutions)", total=steps, loss="-")
        try:
            run = run_institutional_calibration(path, names, steps=steps,
                                                progress=lambda s, v: bar.update(task, completed=s + 1, loss=f"{v:.3f}"))
        except (ValueError, FileNotFoundError) as exc:
            raise typer.BadParameter(str(exc)) from exc
        except MPCError as exc:  # an institution refused or died: say which, no traceback
            console.print(f"[red]MPC calibration failed:[/red] {exc}")
            raise typer.Exit(1) from exc
    console.print(f"coordinator learned only loss and gradient: final loss {run.losses[-1]:.3f} "
                  f"(from {run.losses[0]:.3f}); θ = " + ", ".join(f"{k} {v:.3f}" for k, v in run.theta.items()))
    console.print(f"{run.seconds_per_round:.2f} s and {run.bytes_per_round / 1e3:.1f} kB (coordinator traffic) per MPC round")
    (out / "institutional.json").write_text(json.dumps({"losses": run.losses, "theta": run.theta,
                                                         "seconds_per_round": run.seconds_per_round,
                                                         "bytes_per_round": run.bytes_per_round}, indent=2))


def register(app: typer.Typer) -> None:
    app.command("calibrate")(calibrate_command)
    app.command("forecast")(forecast_command)
    app.command("backtest")(backtest_command)

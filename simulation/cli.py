"""`lpm simulate`: run a preset population, write the daily series and a compartment plot."""

from __future__ import annotations

import time
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

console = Console()


def simulate_command(
    preset: str = typer.Option("oxford", help="Population preset: tiny, oxford or nyc."),
    days: int = typer.Option(60, min=1, max=3650, help="Days to simulate."),
    model: str = typer.Option("sir", help="Model: sir or seirm."),
    scale: float = typer.Option(1.0, help="Population scale factor (nyc 0.12 ≈ 1M agents)."),
    beta: float = typer.Option(0.5, min=0.0, help="Transmission rate β per day."),
    seed: int = typer.Option(0, help="Random seed (population and events)."),
    estimator: str = typer.Option("auto", help="Gradient estimator (auto: nonbacktracking for SIR)."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    out: Path = typer.Option(Path("out/simulate"), help="Output directory."),
    fmt: str = typer.Option("csv", "--format", help="Series format: csv or parquet."),
    stimulus: float | None = typer.Option(
        None, min=0.0, help="Compare SEIRM with archetype behaviour with/without this payment ($)."
    ),
    procs: int = typer.Option(
        1, min=1, max=4096,
        help="Partition the city over this many processes (starts torchrun; simulation.distributed).",
    ),
) -> None:
    """Simulate a synthetic city and write the daily series and a PNG of the compartments."""
    import torch

    from simulation.engine import SimulationError, simulate
    from simulation.estimators import ESTIMATORS
    from simulation.models import SEIRM, SIR
    from simulation.plots import plot_compartments
    from simulation.population import PRESETS, synthesize

    if preset not in PRESETS:
        raise typer.BadParameter(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    if model not in ("sir", "seirm"):
        raise typer.BadParameter("model must be 'sir' or 'seirm'")
    if estimator not in (*ESTIMATORS, "auto", "nonbacktracking"):
        raise typer.BadParameter(f"estimator must be auto, nonbacktracking or one of {sorted(ESTIMATORS)}")
    if fmt not in ("csv", "parquet"):
        raise typer.BadParameter("format must be csv or parquet")
    if procs > 1:
        if stimulus is not None:
            raise typer.BadParameter("--stimulus runs in one process; drop --procs")
        _run_partitioned(procs, preset=preset, scale=scale, days=days, model=model, beta=beta,
                         seed=seed, estimator=estimator, device=device, out=out, fmt=fmt)
        return
    t0 = time.perf_counter()
    with console.status(f"building population '{preset}' (scale {scale})"):
        pop = synthesize(preset, seed=seed, scale=scale)
    console.print(
        f"population: {pop.n:,} agents, {pop.graph.merged().nnz / pop.n:.1f} contacts each "
        f"({time.perf_counter() - t0:.1f} s)"
    )
    if stimulus is not None:
        _stimulus_scenario(pop, days, stimulus, seed, device, out)
        return
    m = SIR(beta=beta) if model == "sir" else SEIRM(beta=beta)
    with Progress(
        TextColumn("[bold]simulating"), BarColumn(), TextColumn("day {task.completed}/{task.total}"),
        TimeElapsedColumn(), console=console,
    ) as bar:
        task = bar.add_task("sim", total=days)
        t1 = time.perf_counter()
        try:
            with torch.no_grad():
                traj = simulate(m, pop, days, seed, estimator=estimator, device=device,
                                progress=lambda d: bar.update(task, completed=d + 1))
        except SimulationError as exc:
            raise typer.BadParameter(str(exc)) from exc
        elapsed = time.perf_counter() - t1
    out.mkdir(parents=True, exist_ok=True)
    frame = traj.to_frame()
    series_path = out / f"series.{fmt}"
    frame.to_csv(series_path, index=False) if fmt == "csv" else frame.to_parquet(series_path)
    png = plot_compartments(traj, out / "compartments.png", title=f"{model.upper()} · {preset} · {pop.n:,} agents")
    console.print(
        f"{days} days in {elapsed:.1f} s ({pop.n * days / elapsed / 1e6:.1f} M agent-steps/s); "
        f"total infections {int(traj.total_infections):,} ({traj.total_infections / pop.n:.0%})"
    )
    console.print(f"wrote {series_path} and {png}")


def _run_partitioned(procs: int, *, out: Path, fmt: str, **opts: object) -> None:
    """Re-launch as ``torchrun --standalone --nproc-per-node P -m simulation.distributed``."""
    import os
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={procs}", "-m", "simulation.distributed", "run",
           "--out", str(out), "--format", fmt]
    for key, value in opts.items():
        cmd += [f"--{key}", str(value)]
    env = {"OMP_NUM_THREADS": "1", **os.environ}
    console.print(f"starting {procs} processes: torchrun --standalone --nproc-per-node {procs} "
                  "-m simulation.distributed ...")
    code = subprocess.run(cmd, env=env, check=False).returncode
    if code != 0:
        console.print(f"[red]partitioned run failed (exit {code})")
        raise typer.Exit(code)


def _stimulus_scenario(pop, days: int, amount: float, seed: int, device: str, out: Path) -> None:
    from simulation.behaviour.scenario import run_stimulus_comparison

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                  TextColumn("day {task.completed}/{task.total}"), TimeElapsedColumn(),
                  console=console) as bar:
        task = bar.add_task("with and without stimulus", total=2 * days)
        done = [0]

        def tick(_day: int) -> None:
            done[0] += 1
            bar.update(task, completed=done[0])

        cmp = run_stimulus_comparison(pop, days, amount, seed=seed, device=device, progress=tick)
    out.mkdir(parents=True, exist_ok=True)
    png = cmp.plot(out / "stimulus.png")
    base, stim = int(cmp.baseline.total_infections), int(cmp.stimulus.total_infections)
    console.print(f"behaviour queries per day (K×A×M): {cmp.queries_per_day:.0f} "
                  f"(K = {cmp.archetypes:.1f} archetypes present on average × A = {cmp.actions} actions "
                  f"× M = {cmp.samples} samples; {pop.n:,} agents)")
    console.print(f"infections: {base:,} without, {stim:,} with ${amount:.0f} "
                  f"({(stim - base) / max(base, 1):+.1%}); wrote {png}")


def gradcheck_command(
    model: str = typer.Option("sir", help="Model: sir or seirm."),
    beta: float = typer.Option(0.3, min=0.0, help="Transmission rate β per day."),
    gamma: float = typer.Option(0.15, min=0.0, help="SIR recovery rate γ per day."),
    latent_days: float = typer.Option(3.0, min=1.0, help="SEIRM mean latent period (days)."),
    infectious_days: float = typer.Option(7.0, min=1.0, help="SEIRM mean infectious period (days)."),
    agents: int = typer.Option(50_000, min=100, help="Agents (random contact graph)."),
    degree: float = typer.Option(10.0, min=1.0, help="Mean contacts per agent."),
    preset: str | None = typer.Option(None, help="Use a population preset instead of a random graph."),
    scale: float = typer.Option(1.0, help="Preset scale factor."),
    initial_infected: float = typer.Option(0.01, min=0.0, max=1.0, help="Fraction infected on day 0."),
    days: int = typer.Option(40, min=1, max=3650, help="Days to simulate."),
    seeds: int = typer.Option(8, min=2, help="Seeds (paired AD and FD runs)."),
    params: str | None = typer.Option(None, help="Comma-separated parameters (default: the model's rates)."),
    estimator: str = typer.Option("auto", help="Gradient estimator to check (auto: the engine default)."),
    fd_step: float = typer.Option(0.05, help="Relative FD step h/|θ|."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    json_out: Path | None = typer.Option(None, "--json", help="Write the per-parameter statistics here."),
) -> None:
    """Check AD gradients of total infections against CRN central finite differences."""
    import json

    from simulation.engine import SimulationError
    from simulation.estimators import ESTIMATORS, RUN_ESTIMATORS
    from simulation.gradcheck import format_table, gradcheck
    from simulation.models import SEIRM, SIR
    from simulation.population import random_contact_graph, synthesize

    if model not in ("sir", "seirm"):
        raise typer.BadParameter("model must be 'sir' or 'seirm'")
    if estimator not in (*ESTIMATORS, *RUN_ESTIMATORS):
        raise typer.BadParameter(f"estimator must be one of {sorted([*ESTIMATORS, *RUN_ESTIMATORS])}")
    names = [p.strip() for p in params.split(",")] if params else (
        ["beta", "gamma"] if model == "sir" else ["beta", "latent_days", "infectious_days"])
    pop = synthesize(preset, seed=0, scale=scale) if preset else random_contact_graph(agents, degree, seed=0)

    def make():
        if model == "sir":
            return SIR(beta, gamma, initial_infected)
        return SEIRM(beta=beta, latent_days=latent_days, infectious_days=infectious_days,
                     initial_infected=initial_infected)

    t0 = time.perf_counter()
    with console.status(f"{seeds} seeds × (1 AD + {2 * len(names)} FD runs) of {days} days"):
        try:
            report = gradcheck(make, pop, days, seeds, names, estimator=estimator, fd_step=fd_step,
                               device=device)
        except SimulationError as exc:
            raise typer.BadParameter(str(exc)) from exc
    n = pop.n
    console.print(f"{model.upper()}, {n:,} agents, {days} days, {seeds} seeds, FD step {fd_step:.0%} "
                  f"(common random numbers), d(total infections)/dθ — {time.perf_counter() - t0:.0f} s")
    typer.echo(format_table(report, estimator))
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps({k: v.as_dict() for k, v in report.items()}, indent=2))
        console.print(f"wrote {json_out}")


def register(app: typer.Typer) -> None:
    app.command("simulate")(simulate_command)
    app.command("gradcheck")(gradcheck_command)

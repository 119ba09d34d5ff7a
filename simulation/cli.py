"""`lpm simulate`: run a preset population, write the daily series and a compartment plot."""

from __future__ import annotations

import json
import time
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

if TYPE_CHECKING:
    from simulation.substeps import SubstepModel

console = Console()


class ModelName(StrEnum):
    """The epidemic models the commands build."""

    sir = "sir"
    seirm = "seirm"


class SeriesFormat(StrEnum):
    csv = "csv"
    parquet = "parquet"


def _model(name: ModelName, **kwargs: Any) -> SubstepModel:
    from simulation.models import SEIRM, SIR

    return SIR(**kwargs) if name is ModelName.sir else SEIRM(**kwargs)


def simulate_command(
    preset: Annotated[str, typer.Option(help="Population preset: tiny, oxford or nyc.")] = "oxford",
    days: Annotated[int, typer.Option(min=1, max=3650, help="Days to simulate.")] = 60,
    model: Annotated[ModelName, typer.Option(help="Epidemic model.")] = ModelName.sir,
    scale: Annotated[float, typer.Option(help="Population scale factor (nyc 0.12 ≈ 1M agents).")] = 1.0,
    beta: Annotated[float, typer.Option(min=0.0, help="Transmission rate β per day.")] = 0.5,
    seed: Annotated[int, typer.Option(help="Random seed (population and events).")] = 0,
    estimator: Annotated[str, typer.Option(
        help="Gradient estimator (auto: triples for SIR on a unit-weight graph).")] = "auto",
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    out: Annotated[Path, typer.Option(help="Output directory.")] = Path("out/simulate"),
    fmt: Annotated[SeriesFormat, typer.Option("--format", help="Series format.")] = SeriesFormat.csv,
    stimulus: Annotated[float | None, typer.Option(
        min=0.0, help="Compare SEIRM with archetype behaviour with/without this payment ($).")] = None,
    procs: Annotated[int, typer.Option(
        min=1, max=4096,
        help="Partition the city over this many processes (starts torchrun; simulation.distributed).",
    )] = 1,
) -> None:
    """Simulate a synthetic city and write the daily series and a PNG of the compartments."""
    import torch

    from simulation.engine import SimulationError, simulate
    from simulation.estimators import ESTIMATORS, RUN_ESTIMATORS
    from simulation.plots import plot_compartments
    from simulation.population import PRESETS, synthesize

    if preset not in PRESETS:
        raise typer.BadParameter(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    if estimator not in (*ESTIMATORS, *RUN_ESTIMATORS):
        raise typer.BadParameter(f"estimator must be one of {sorted([*ESTIMATORS, *RUN_ESTIMATORS])}")
    if procs > 1:
        if stimulus is not None:
            raise typer.BadParameter("--stimulus runs in one process; drop --procs")
        _run_partitioned(procs, preset=preset, scale=scale, days=days, model=model.value, beta=beta,
                         seed=seed, estimator=estimator, device=device, out=out, fmt=fmt.value)
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
    m = _model(model, beta=beta)
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
    series_path = out / f"series.{fmt.value}"
    frame.to_csv(series_path, index=False) if fmt is SeriesFormat.csv else frame.to_parquet(series_path)
    png = plot_compartments(traj, out / "compartments.png",
                            title=f"{model.value.upper()} · {preset} · {pop.n:,} agents")
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
    model: Annotated[ModelName, typer.Option(help="Epidemic model.")] = ModelName.sir,
    beta: Annotated[float, typer.Option(min=0.0, help="Transmission rate β per day.")] = 0.3,
    gamma: Annotated[float, typer.Option(min=0.0, help="SIR recovery rate γ per day.")] = 0.15,
    latent_days: Annotated[float, typer.Option(min=1.0, help="SEIRM mean latent period (days).")] = 3.0,
    infectious_days: Annotated[float, typer.Option(
        min=1.0, help="SEIRM mean infectious period (days).")] = 7.0,
    agents: Annotated[int, typer.Option(min=100, help="Agents (random contact graph).")] = 50_000,
    degree: Annotated[float, typer.Option(min=1.0, help="Mean contacts per agent.")] = 10.0,
    preset: Annotated[str | None, typer.Option(
        help="Use a population preset instead of a random graph.")] = None,
    scale: Annotated[float, typer.Option(help="Preset scale factor.")] = 1.0,
    initial_infected: Annotated[float, typer.Option(
        min=0.0, max=1.0, help="Fraction infected on day 0.")] = 0.01,
    days: Annotated[int, typer.Option(min=1, max=3650, help="Days to simulate.")] = 40,
    seeds: Annotated[int, typer.Option(min=2, help="Seeds (paired AD and FD runs).")] = 8,
    params: Annotated[str | None, typer.Option(
        help="Comma-separated parameters (default: the model's rates).")] = None,
    estimator: Annotated[str, typer.Option(
        help="Gradient estimator to check (auto: the engine default).")] = "auto",
    fd_step: Annotated[float, typer.Option(help="Relative FD step h/|θ|.")] = 0.05,
    flips: Annotated[int, typer.Option(
        min=1, help="triples: alternative paths per parameter (unbiased for any value; more = less noise).")] = 2000,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    json_out: Annotated[Path | None, typer.Option(
        "--json", help="Write the per-parameter statistics here.")] = None,
) -> None:
    """Check AD gradients of total infections against CRN central finite differences."""

    from simulation.engine import SimulationError
    from simulation.estimators import ESTIMATORS, RUN_ESTIMATORS
    from simulation.gradcheck import format_table, gradcheck
    from simulation.population import random_contact_graph, synthesize

    if estimator not in (*ESTIMATORS, *RUN_ESTIMATORS):
        raise typer.BadParameter(f"estimator must be one of {sorted([*ESTIMATORS, *RUN_ESTIMATORS])}")
    names = [p.strip() for p in params.split(",")] if params else (
        ["beta", "gamma"] if model is ModelName.sir else ["beta", "latent_days", "infectious_days"])
    pop = synthesize(preset, seed=0, scale=scale) if preset else random_contact_graph(agents, degree, seed=0)

    def make():
        if model is ModelName.sir:
            return _model(model, beta=beta, gamma=gamma, initial_infected=initial_infected)
        return _model(model, beta=beta, latent_days=latent_days, infectious_days=infectious_days,
                      initial_infected=initial_infected)

    t0 = time.perf_counter()
    with console.status(f"{seeds} seeds × (1 AD + {2 * len(names)} FD runs) of {days} days"):
        try:
            report = gradcheck(make, pop, days, seeds, names, estimator=estimator, fd_step=fd_step,
                               device=device, flips=flips)
        except SimulationError as exc:
            raise typer.BadParameter(str(exc)) from exc
    n = pop.n
    console.print(f"{model.value.upper()}, {n:,} agents, {days} days, {seeds} seeds, FD step {fd_step:.0%} "
                  f"(common random numbers), d(total infections)/dθ — {time.perf_counter() - t0:.0f} s")
    typer.echo(format_table(report, estimator))
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps({k: v.as_dict() for k, v in report.items()}, indent=2))
        console.print(f"wrote {json_out}")


def sensitivity_command(
    preset: Annotated[str, typer.Option(help="Population preset.")] = "oxford",
    scale: Annotated[float, typer.Option(help="Population scale.")] = 0.2,
    days: Annotated[int, typer.Option(min=1, help="Days to simulate.")] = 60,
    model: Annotated[ModelName, typer.Option(help="Epidemic model.")] = ModelName.seirm,
    out: Annotated[Path, typer.Option(help="Output directory.")] = Path("out/sensitivity"),
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
) -> None:
    """∂(total infections)/∂(every parameter) in one reverse pass; ∂(daily series)/∂β forward."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from rich.table import Table

    from simulation.calibration.sensitivity import forward_sensitivity, reverse_sensitivity
    from simulation.engine import simulate
    from simulation.population import synthesize

    pop = synthesize(preset, seed=seed, scale=scale)
    m = _model(model)
    grads = reverse_sensitivity(m, lambda: simulate(m, pop, days, seed).total_infections)
    rows = []
    for name, g in grads.items():
        p = dict(m.named_parameters())[name]
        for i, (v, d) in enumerate(zip(p.detach().reshape(-1).tolist(), g.reshape(-1).tolist(), strict=True)):
            label = name if p.numel() == 1 else f"{name}[{i}]"
            rows.append((label, v, d, v * d))  # elasticity-style: θ·∂M/∂θ
    rows.sort(key=lambda r: -abs(r[3]))
    table = Table(title=f"∂ total infections / ∂θ ({model.value}, {pop.n:,} agents, {days} days)")
    for col in ("parameter", "value", "∂M/∂θ", "θ·∂M/∂θ"):
        table.add_column(col, justify="right" if col != "parameter" else "left")
    for r in rows:
        table.add_row(r[0], f"{r[1]:.4g}", f"{r[2]:.4g}", f"{r[3]:.4g}")
    console.print(table)
    beta_name = next(k for k in grads if k.endswith("beta"))
    series = forward_sensitivity(m, lambda: simulate(m, pop, days, seed)["new_infections"], [beta_name])
    out.mkdir(parents=True, exist_ok=True)
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.5))
    top = rows[:12]
    ax.barh([r[0] for r in top][::-1], [r[3] for r in top][::-1])
    ax.set_title("θ·∂(total infections)/∂θ (reverse mode)")
    bx.plot(series[beta_name].numpy())
    bx.set_title("∂(new infections per day)/∂β (forward mode)")
    bx.set_xlabel("day")
    fig.tight_layout()
    fig.savefig(out / "sensitivity.png", dpi=110)
    plt.close(fig)
    (out / "sensitivity.json").write_text(json.dumps([dict(zip(("parameter", "value", "grad", "elasticity"), r, strict=True)) for r in rows], indent=2))
    console.print(f"wrote {out / 'sensitivity.png'} and {out / 'sensitivity.json'}")


def register(app: typer.Typer) -> None:
    app.command("simulate")(simulate_command)
    app.command("gradcheck")(gradcheck_command)
    app.command("sensitivity")(sensitivity_command)

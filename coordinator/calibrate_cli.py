"""`lpm calibrate` and `lpm sensitivity`: fit the simulator to data, rank parameter effects."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

console = Console()


def _bar() -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                    TextColumn("{task.completed}/{task.total} · loss {task.fields[loss]}"),
                    TimeElapsedColumn(), console=console)


def calibrate_command(
    scenario: str = typer.Option("nyc", help="nyc (first wave, real data) or synthetic (known β)."),
    agents: int = typer.Option(100_000, min=1_000, help="Synthetic population size."),
    steps: int = typer.Option(40, min=1, help="Adam steps."),
    posterior_steps: int = typer.Option(12, min=1, help="GVI steps (nyc)."),
    data: Path | None = typer.Option(None, help="Cases CSV in the NYC Health trends/cases-by-day.csv "
                                     "layout (default: the bundled 2020 copy)."),
    start: str = typer.Option("2020-03-01", help="First day of the fitted window (YYYY-MM-DD)."),
    end: str = typer.Option("2020-06-30", help="Last day of the fitted window (YYYY-MM-DD)."),
    out: Path = typer.Option(Path("out/calibrate"), help="Output directory."),
    seed: int = typer.Option(0),
    institutions: str | None = typer.Option(
        None, help="Private multi-institution calibration under MPC, e.g. BX,BK,MN,QN,SI "
        "(each institution process reads only its own column of --data)."),
) -> None:
    """Calibrate by gradient descent through the simulator; writes JSON and a PNG."""
    from simulation.calibration.data import DataError

    out.mkdir(parents=True, exist_ok=True)
    if institutions is not None:
        _institutional(institutions, data, steps, out)
        return
    if scenario == "synthetic":
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
    if scenario != "nyc":
        raise typer.BadParameter("scenario must be nyc or synthetic")
    from simulation.calibration.nyc import fit_nyc_first_wave

    with _bar() as bar:
        tasks = {"point": bar.add_task("point fit (CalibNN)", total=steps, loss="-"),
                 "posterior": bar.add_task("posterior (GVI)", total=posterior_steps, loss="-")}
        try:
            fit = fit_nyc_first_wave(agents=agents, steps=steps, posterior_steps=posterior_steps,
                                     seed=seed, path=data, start=start, end=end,
                                     progress=lambda ph, s, v: bar.update(tasks[ph], completed=s + 1, loss=f"{v:.3f}"))
        except DataError as exc:
            raise typer.BadParameter(str(exc)) from exc
    png = fit.plot(out / "nyc_first_wave.png")
    summary = {"agents": fit.n_agents, **fit.quality, "ascertainment": fit.ascertainment,
               "delay_mean_days": fit.delay_mean, "simulator_runs": fit.runs,
               "seconds": fit.seconds, "beta_t": fit.beta_t.tolist()}
    (out / "nyc_first_wave.json").write_text(json.dumps(summary, indent=2))
    console.print(f"NYC first wave on {fit.n_agents:,} agents: R² (7-day) {fit.quality['r2_7day']:.3f}, "
                  f"MAPE {fit.quality['mape_7day']:.1%}, ascertainment {fit.ascertainment:.1%}, "
                  f"reporting delay {fit.delay_mean:.1f} d; {fit.runs} runs in {fit.seconds:.0f} s")
    console.print(f"wrote {png} and {out / 'nyc_first_wave.json'}")


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


def sensitivity_command(
    preset: str = typer.Option("oxford", help="Population preset."),
    scale: float = typer.Option(0.2, help="Population scale."),
    days: int = typer.Option(60, min=1),
    model: str = typer.Option("seirm", help="sir or seirm."),
    out: Path = typer.Option(Path("out/sensitivity"), help="Output directory."),
    seed: int = typer.Option(0),
) -> None:
    """∂(total infections)/∂(every parameter) in one reverse pass; ∂(daily series)/∂β forward."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from simulation.calibration.sensitivity import forward_sensitivity, reverse_sensitivity
    from simulation.engine import simulate
    from simulation.models import SEIRM, SIR
    from simulation.population import synthesize

    if model not in ("sir", "seirm"):
        raise typer.BadParameter("model must be sir or seirm")
    pop = synthesize(preset, seed=seed, scale=scale)
    m = SIR() if model == "sir" else SEIRM()
    grads = reverse_sensitivity(m, lambda: simulate(m, pop, days, seed).total_infections)
    rows = []
    for name, g in grads.items():
        p = dict(m.named_parameters())[name]
        for i, (v, d) in enumerate(zip(p.detach().reshape(-1).tolist(), g.reshape(-1).tolist(), strict=True)):
            label = name if p.numel() == 1 else f"{name}[{i}]"
            rows.append((label, v, d, v * d))  # elasticity-style: θ·∂M/∂θ
    rows.sort(key=lambda r: -abs(r[3]))
    table = Table(title=f"∂ total infections / ∂θ ({model}, {pop.n:,} agents, {days} days)")
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
    app.command("calibrate")(calibrate_command)
    app.command("sensitivity")(sensitivity_command)

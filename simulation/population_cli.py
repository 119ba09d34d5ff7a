"""`lpm population build|info`: build a city from marginal tables into Parquet, inspect one."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, cast

import typer
from rich.console import Console
from rich.table import Table

console = Console()
population_app = typer.Typer(help="Synthetic populations from census marginals.", no_args_is_help=True)


@population_app.command("build")
def build_command(
    marginals: Annotated[str, typer.Option(help="Directory of marginal CSVs (docs/population.md), or a bundled set: nyc, oxford.")],
    out: Annotated[Path, typer.Option(help="Output FILE.parquet (edges go to FILE.edges.parquet).")],
    n: Annotated[int | None, typer.Option(min=2, help="Agents (default: the census total).")] = None,
    scale: Annotated[float | None, typer.Option(help="Fraction of the census total (instead of --n).")] = None,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    neighbourhood_size: Annotated[int, typer.Option(min=10, help="People per community group.")] = 2_000,
) -> None:
    """Fit the marginals (IPF) and stream agents and contact layers to Parquet, area by area."""
    from simulation.population import PopulationError, bundled_marginals, load_marginals
    from simulation.population.build import BuildOptions
    from simulation.population.presets import write_population

    if n is not None and scale is not None:
        raise typer.BadParameter("give --n or --scale, not both")
    if out.suffix != ".parquet":
        raise typer.BadParameter("--out must end in .parquet")
    try:
        path = Path(marginals)
        m = load_marginals(path) if path.is_dir() else bundled_marginals(marginals)
        size = n if n is not None else (round(m.population * scale) if scale is not None else None)
        t0 = time.perf_counter()
        meta = write_population(
            m, out, size, seed, BuildOptions(neighbourhood_size=neighbourhood_size),
            progress=lambda msg: console.print(f"  {msg} ({time.perf_counter() - t0:.1f} s)"),
        )
    except PopulationError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from exc
    worst = _worst_tvd(meta)
    edges = cast(dict[str, int], meta["edges"])
    console.print(
        f"wrote {out} ({meta['n']:,} agents, {sum(edges.values()):,} edges) in "
        f"{time.perf_counter() - t0:.1f} s; largest marginal TVD {worst:.2e}"
    )


def _worst_tvd(meta: dict) -> float:
    return max(max(r["tvd"].values()) for r in meta["report"])


@population_app.command("info")
def info_command(
    file: Annotated[Path, typer.Argument(help="A FILE.parquet written by `lpm population build`.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    mixing: Annotated[bool, typer.Option(help="Load the edges and compare age mixing per layer.")] = True,
) -> None:
    """The marginals the file reproduces (TVD per table and area) and its contact statistics."""
    from simulation.population import PopulationError, load_contact_matrices
    from simulation.population.store import Population, read_metadata

    try:
        meta = read_metadata(file)
        report = {"meta": {k: v for k, v in meta.items() if k != "report"}, "marginals": meta.get("report", [])}
        if mixing:
            pop = Population.load(file)
            from simulation.population.report import mixing_report

            layers = {k: (v.indptr.numpy(), v.indices.numpy()) for k, v in pop.graph.layers.items()}
            report["mixing"] = mixing_report(
                layers, pop.attributes["age"].numpy(), load_contact_matrices(meta["contact_matrices"])
            )
            report["mean_degree"] = pop.graph.merged().nnz / pop.n
    except PopulationError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from exc
    if as_json:
        console.print_json(json.dumps(report, default=str))
        return
    console.print(
        f"{file}: schema {meta['schema_version']}, {meta['n']:,} agents, {meta['name']}, seed {meta['seed']}, "
        f"contact matrices {meta['contact_matrices']}; inputs {meta['provenance']['source']}"
    )
    t = Table(title="marginals reproduced (total variation distance; rates: max |Δ| per band)")
    keys = list(report["marginals"][0]["tvd"]) if report["marginals"] else []
    for col in ("area", "agents", *keys):
        t.add_column(col, justify="right")
    for r in report["marginals"]:
        t.add_row(r["area"], f"{r['n']:,}", *(f"{r['tvd'][k]:.2e}" for k in keys))
    console.print(t)
    for key, what in (("multigenerational", "multigenerational households"),
                      ("grandparent", "households with a grandparent and a grandchild < 18")):
        rows = [(r["area"], r[key]) for r in report["marginals"] if key in r]
        if rows:
            console.print(f"{what} (by age; published share in brackets): " + ", ".join(
                f"{a} {g['share']:.1%}" + ("" if g["published"] is None else f" ({g['published']:.1%})")
                for a, g in rows))
    if meta.get("city"):
        pooled = ", ".join(f"{k} {v:.2e}" for k, v in meta["city"].items())
        console.print(f"pooled over all areas (TVD): {pooled}")
    if mixing:
        t = Table(title=f"contact layers vs {meta['contact_matrices']} (relative Frobenius norm)")
        for col in ("layer", "contacts/person", "published", "vs published", "floor (reciprocity)",
                    "vs reciprocal", "vs reciprocal, best scale", "best weight"):
            t.add_column(col, justify="right")
        for name, s in report["mixing"].items():
            t.add_row(name, f"{s['mean_contacts']:.2f}", f"{s['published_mean_contacts']:.2f}",
                      f"{s['rel_frobenius']:.1%}", f"{s['reciprocity_floor']:.1%}",
                      f"{s['rel_frobenius_reciprocal']:.1%}", f"{s['rel_frobenius_reciprocal_scaled']:.1%}",
                      f"{s['best_layer_weight']:.2f}")
        console.print(t)
        console.print(f"mean distinct contacts (merged graph): {report['mean_degree']:.2f}")


def register(app: typer.Typer) -> None:
    app.add_typer(population_app, name="population")

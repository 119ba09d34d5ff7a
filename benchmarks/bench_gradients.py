"""Gradient estimators against CRN central finite differences on a grid of parameter points.

SIR β ∈ {0.2, 0.3, 0.4, 0.6, 0.8} × γ ∈ {0.1, 0.15} on a random graph (degree 10, 1 % seeded,
40 days), SEIRM on a NYC-like synthetic population (β and stage durations, 3 points, 50 days)
and one behaviour parameter (isolation efficacy of positives, plain SEIRM with testing, and SEIRM
with archetype behaviour, which "triples" does not model). For each
point, estimator and parameter: mean ± sd over seeds of AD and of FD (the same seeds), the
bias mean(AD)/mean(FD) − 1 ± its standard error, and seconds per AD run (forward+backward)
relative to a forward run. Prints a markdown table (docs/simulation.md) and writes JSON.

    .venv/bin/python benchmarks/bench_gradients.py [--agents 50000] [--seeds 8] [--part sir,seirm,behaviour]
        [--estimators triples,nonbacktracking,smoothed,straight_through,expected,relaxed]
        [--json out/gradients.json]
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import torch

from simulation.engine import simulate
from simulation.gradcheck import gradcheck, parameter
from simulation.models import SEIRM, SIR
from simulation.population import random_contact_graph, synthesize
from simulation.stochastic_triples import DEFAULT_FLIPS

SIR_GRID = [(b, g) for g in (0.1, 0.15) for b in (0.2, 0.3, 0.4, 0.6, 0.8)]
SEIRM_POINTS = [  # (β, latent_days, infectious_days)
    (0.45, 3.0, 7.0),
    (0.3, 4.0, 5.0),
    (0.6, 2.0, 8.0),
]


def _cost(make, pop, days, estimator, params, flips) -> float:
    """(forward+backward time) / (forward time), one seed; as in gradcheck only ``params``
    require a gradient."""
    m = make()
    wanted = {id(parameter(m, name)) for name in params}
    for p in m.parameters():
        p.requires_grad_(id(p) in wanted)
    t = time.perf_counter()
    with torch.no_grad():
        simulate(m, pop, days, 0, estimator=estimator, flips=flips)
    fwd = time.perf_counter() - t
    t = time.perf_counter()
    simulate(m, pop, days, 0, estimator=estimator, flips=flips).total_infections.backward()
    return (time.perf_counter() - t) / fwd


def run_point(label, make, pop, days, seeds, params, estimators, fd_step, rows, only=None, flips=DEFAULT_FLIPS):
    if only is not None and not re.search(only, label):
        return
    for est in estimators:
        t = time.perf_counter()
        report = gradcheck(make, pop, days, seeds, params, estimator=est, fd_step=fd_step, flips=flips)
        cost = _cost(make, pop, days, est, params, flips)
        for name, r in report.items():
            row = {"point": label, "estimator": est, "parameter": name, "cost": cost, **r.as_dict()}
            rows.append(row)
            print(f"| {label} | {name} | {est} | {r.ad_mean:,.0f} ± {r.ad_sd:,.0f} | {r.fd_mean:,.0f} ± "
                  f"{r.fd_sd:,.0f} | {r.bias:+.0%} ± {r.bias_se:.0%} | {cost:.1f}× |", flush=True)
        print(f"<!-- {label} {est}: {time.perf_counter() - t:.0f} s -->", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--agents", type=int, default=50_000)
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--days", type=int, default=40)
    ap.add_argument("--seirm-days", type=int, default=50)
    ap.add_argument("--fd-step", type=float, default=0.05)
    ap.add_argument("--part", default="sir,seirm,behaviour")
    ap.add_argument("--estimators", default="smoothed,straight_through,expected,relaxed")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--flips", type=int, default=DEFAULT_FLIPS, help="triples: alternative paths per parameter")
    ap.add_argument("--only", default=None, help="regular expression: run only the points whose label matches")
    ap.add_argument("--json", type=Path, default=Path("out/gradients.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    estimators = args.estimators.split(",")
    parts = args.part.split(",")
    rows: list[dict] = []
    print(f"{args.agents:,} agents, {args.seeds} seeds, FD step {args.fd_step:.0%} (CRN); sd over seeds")
    print("| point | parameter | estimator | AD mean ± sd | FD mean ± sd | bias ± se | fwd+bwd / fwd |")
    print("|---|---|---|---|---|---|---|")
    if "sir" in parts:
        g = random_contact_graph(args.agents, 10, seed=1)
        for beta, gamma in SIR_GRID:
            run_point(f"SIR β {beta} γ {gamma}", lambda b=beta, c=gamma: SIR(b, c, 0.01), g, args.days,
                      args.seeds, ["beta", "gamma"], estimators, args.fd_step, rows, args.only, args.flips)
    if "seirm" in parts or "behaviour" in parts:
        pop = synthesize("nyc", seed=0, scale=args.agents / 8_400_000)
    if "seirm" in parts:
        for beta, lat, inf in SEIRM_POINTS:
            run_point(f"SEIRM β {beta} latent {lat} inf {inf}",
                      lambda b=beta, la=lat, i=inf: SEIRM(beta=b, latent_days=la, infectious_days=i),
                      pop, args.seirm_days, args.seeds, ["beta", "latent_days", "infectious_days"],
                      estimators, args.fd_step, rows, args.only, args.flips)
    if "behaviour" in parts:
        from simulation.behaviour import add_archetype_behaviour

        def with_behaviour():
            m = SEIRM(beta=0.6, test_rate=0.1)
            add_archetype_behaviour(m, samples=2)
            return m

        run_point("SEIRM β 0.6 test 0.1 (isolation)", lambda: SEIRM(beta=0.6, test_rate=0.1), pop, args.seirm_days,
                  args.seeds, ["efficacy"], estimators, args.fd_step, rows, args.only, args.flips)
        # archetype behaviour adds substeps, which the triples estimator does not model
        run_point("SEIRM+behaviour β 0.6 test 0.1", with_behaviour, pop, args.seirm_days, args.seeds,
                  ["efficacy"], [e for e in estimators if e != "triples"], args.fd_step, rows, args.only)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(rows, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

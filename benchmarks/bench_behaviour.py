"""Cost of archetype behaviour: a SEIRM day with and without it, same run.

    .venv/bin/python benchmarks/bench_behaviour.py [--agents 1000000] [--days 10]
"""

from __future__ import annotations

import argparse
import time

import torch

from simulation.behaviour import add_archetype_behaviour
from simulation.engine import simulate
from simulation.kernels import warm_up
from simulation.models import SEIRM
from simulation.population import synthesize


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--agents", type=int, default=1_000_000)
    ap.add_argument("--days", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warm_up()
    pop = synthesize("nyc", seed=0, scale=args.agents / 8_400_000)
    pop.graph.merged()
    times = {}
    for label in ("plain SEIRM", "SEIRM + archetypes"):
        model = SEIRM(beta=0.6)
        policy = add_archetype_behaviour(model) if label != "plain SEIRM" else None
        with torch.no_grad():
            simulate(model, pop, 2, seed=0)  # warm
            t = time.perf_counter()
            simulate(model, pop, args.days, seed=0)
        times[label] = (time.perf_counter() - t) / args.days
        if policy is not None:
            q = policy.queries_per_day[-args.days:]
            queries = sum(q) / len(q)
    base, arche = times["plain SEIRM"], times["SEIRM + archetypes"]
    print(f"SEIRM on {pop.n:,} agents (nyc preset), {args.days} days, threads {args.threads}")
    print(f"  plain SEIRM         {base * 1e3:8.1f} ms/day")
    print(f"  + archetypes        {arche * 1e3:8.1f} ms/day   overhead {arche / base - 1:+.1%} (target ≤ +20 %)")
    print(f"  behaviour queries   {queries:8.0f} per day (K×A×M) instead of {pop.n:,} agent decisions")


if __name__ == "__main__":
    main()

"""Cost of archetype behaviour: a SEIRM day with and without it, measured in the same run.

Runs alternate (plain, archetypes, plain, …) and each configuration keeps its fastest
repeat, so background load on a shared machine hurts both sides alike. Also prints the
behaviour queries per day (K×A×M) and the per-phase cost of the archetype substep.

    .venv/bin/python benchmarks/bench_behaviour.py [--agents 1000000] [--days 5] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

import torch

from simulation.behaviour import add_archetype_behaviour
from simulation.behaviour.backends import ACTIONS
from simulation.engine import simulate
from simulation.kernels import warm_up
from simulation.models import SEIRM
from simulation.population import synthesize


def _run(pop, days: int, behaviour: bool) -> tuple[float, list[int]]:
    model = SEIRM(beta=0.6)
    policy = add_archetype_behaviour(model) if behaviour else None
    with torch.no_grad():
        t = time.perf_counter()
        simulate(model, pop, days, seed=0)
        elapsed = time.perf_counter() - t
    return elapsed / days, (policy.queries_per_day if policy is not None else [])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--agents", type=int, default=1_000_000)
    ap.add_argument("--days", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warm_up()
    pop = synthesize("nyc", seed=0, scale=args.agents / 8_400_000)
    pop.graph.merged()
    _run(pop, 2, False), _run(pop, 2, True)  # compile kernels, fault in buffers
    best = {False: float("inf"), True: float("inf")}
    queries: list[int] = []
    for _ in range(args.repeats):
        for behaviour in (False, True):
            per_day, q = _run(pop, args.days, behaviour)
            best[behaviour] = min(best[behaviour], per_day)
            queries = q or queries
    base, arche = best[False], best[True]
    mean_q = sum(queries) / len(queries)
    print(f"SEIRM on {pop.n:,} agents (nyc preset), {args.days} days × {args.repeats} repeats, "
          f"torch threads {args.threads}, best repeat per configuration")
    print(f"  plain SEIRM         {base * 1e3:8.1f} ms/day")
    print(f"  + archetypes        {arche * 1e3:8.1f} ms/day   overhead {arche / base - 1:+.1%} (target ≤ +20 %)")
    print(f"  behaviour queries   {mean_q:8.0f} per day = K×A×M with K ≈ {mean_q / (len(ACTIONS) * 5):.0f} "
          f"archetypes present, A = {len(ACTIONS)}, M = 5 (instead of {pop.n:,} agent decisions)")


if __name__ == "__main__":
    main()

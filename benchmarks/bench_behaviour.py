"""Cost of archetype behaviour: a SEIRM day with and without it, measured in the same run.

Runs alternate (plain, archetypes, plain, …) and the per-day times of each configuration are compared by
their minimum and median, so background load on a shared machine hurts both sides alike. Also prints the
behaviour queries per day (K×A×M) and the per-phase cost of the archetype substep.

    .venv/bin/python benchmarks/bench_behaviour.py [--agents 1000000] [--days 5] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from simulation.behaviour import add_archetype_behaviour
from simulation.behaviour.backends import ACTIONS
from simulation.engine import simulate
from simulation.kernels import warm_up
from simulation.models import SEIRM
from simulation.population import synthesize


def _run(pop, days: int, behaviour: bool) -> tuple[list[float], list[int]]:
    """Seconds of each simulated day (from the engine's progress callback) and queries/day."""
    model = SEIRM(beta=0.6)
    policy = add_archetype_behaviour(model) if behaviour else None
    stamps = [time.perf_counter()]
    with torch.no_grad():
        # checkpoint_days=1 makes the engine report after every day (no checkpointing without grad)
        simulate(model, pop, days, seed=0, checkpoint_days=1,
                 progress=lambda _day: stamps.append(time.perf_counter()))
    return [b - a for a, b in zip(stamps, stamps[1:], strict=False)], (policy.queries_per_day if policy else [])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--agents", type=int, default=1_000_000)
    ap.add_argument("--days", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warm_up()
    pop = synthesize("nyc", seed=0, scale=args.agents / 8_400_000)
    pop.graph.merged()
    _run(pop, 2, False), _run(pop, 2, True)  # compile kernels, fault in buffers
    days: dict[bool, list[float]] = {False: [], True: []}
    queries: list[int] = []
    for _ in range(args.repeats):
        for behaviour in (False, True):
            per_day, q = _run(pop, args.days, behaviour)
            days[behaviour] += per_day
            queries = q or queries
    mean_q = sum(queries) / len(queries)
    print(f"SEIRM on {pop.n:,} agents (nyc preset), {args.days} days × {args.repeats} alternating repeats, "
          f"torch threads {args.threads}; per-day times")
    for stat, f in (("fastest day", min), ("median day", statistics.median)):
        base, arche = f(days[False]), f(days[True])
        print(f"  {stat:12s} plain {base * 1e3:7.1f} ms   + archetypes {arche * 1e3:7.1f} ms   "
              f"overhead {arche / base - 1:+.1%} (target ≤ +20 %)")
    print(f"  behaviour queries   {mean_q:8.0f} per day = K×A×M with K ≈ {mean_q / (len(ACTIONS) * 5):.0f} "
          f"archetypes present, A = {len(ACTIONS)}, M = 5 (instead of {pop.n:,} agent decisions)")


if __name__ == "__main__":
    main()

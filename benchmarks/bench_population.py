"""Structured populations: build cost, and engine throughput on them vs a random graph — one run.

For each size: build the NYC preset in memory (time, peak RSS above the start), merge the
layers, then run the same SIR (β 0.5, γ 0.1, I0 1 %) on the structured graph and on an
Erdős–Rényi graph of the same size and mean degree, alternating, and print agent-steps/s and
the ratio. ``--stream`` also streams the full-size build to Parquet (bounded memory).
``--refine-baseline N`` builds N agents with and without the session-3 refinements (workplace
swaps, multigenerational band) in the same run and prints the CPU ratio.

    .venv/bin/python benchmarks/bench_population.py [--sizes 100000,1000000] [--days 20] [--stream]
        [--refine-baseline 1000000]
"""

from __future__ import annotations

import argparse
import gc
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from peak_rss import PeakRSS  # benchmarks/peak_rss.py (the script's folder is on sys.path)

from simulation.engine import simulate
from simulation.kernels import warm_up
from simulation.models import SIR
from simulation.population import (
    BuildOptions,
    ContactGraph,
    build_population,
    bundled_marginals,
    random_contact_graph,
    synthesize,
    write_population,
)


def throughput(graph, n: int, days: int) -> float:
    t = time.perf_counter()
    with torch.no_grad():
        simulate(SIR(0.5, 0.1, 0.01), graph, days, seed=1)
    return n * days / (time.perf_counter() - t) / 1e6


def refine_ratio(n: int, repeats: int = 2) -> None:
    """CPU seconds of an NYC build of ``n`` agents without (work_refine=0, no multigenerational
    band: the session-2 build) and with the defaults, alternating, best of ``repeats``."""
    m = bundled_marginals("nyc")
    off = replace(m, areas=tuple(replace(a, multigenerational=None, grandparent=None) for a in m.areas))
    runs = {"baseline": (off, BuildOptions(work_refine=0.0)), "refined": (m, BuildOptions())}
    cpu: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(repeats):
        for name, (marg, opts) in runs.items():
            gc.collect()
            t = time.process_time()
            build_population(marg, n=n, seed=0, options=opts)
            cpu[name].append(time.process_time() - t)
    b, r = min(cpu["baseline"]), min(cpu["refined"])
    print(f"nyc {n:,} build CPU: baseline {b:.2f} s, refined {r:.2f} s (refined/baseline {r / b:.3f}x; "
          f"best of {repeats}, load {os.getloadavg()[0]:.1f})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="100000,1000000")
    ap.add_argument("--days", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--stream", action="store_true", help="also stream the full NYC build to Parquet")
    ap.add_argument("--refine-baseline", type=int, default=0, help="agents for the refinement on/off build ratio")
    args = ap.parse_args()
    warm_up()
    total = bundled_marginals("nyc").population
    print(f"torch threads {torch.get_num_threads()}; load {os.getloadavg()[0]:.1f}")
    if args.refine_baseline:
        refine_ratio(args.refine_baseline)
    for n in (int(s) for s in args.sizes.split(",")):
        with PeakRSS() as mem:
            t = time.perf_counter()
            pop = synthesize("nyc", seed=0, scale=n / total)
            build = time.perf_counter() - t
            t = time.perf_counter()
            merged = pop.graph.merged()
            merge = time.perf_counter() - t
        degree = merged.nnz / pop.n
        print(f"nyc {pop.n:,}: build {build:.1f} s + merge {merge:.1f} s, peak +{mem.extra_gib:.2f} GiB, "
              f"mean degree {degree:.2f}, weighted={merged.weights is not None}")
        rand = ContactGraph({"contacts": random_contact_graph(pop.n, degree, seed=1).merged()}, {"contacts": 1.0})
        rates: dict[str, list[float]] = {"structured": [], "random": []}
        for _ in range(args.repeats):  # alternate so load drifts hit both alike
            rates["structured"].append(throughput(pop, pop.n, args.days))
            rates["random"].append(throughput(rand, pop.n, args.days))
        s, r = max(rates["structured"]), max(rates["random"])
        print(f"  SIR {args.days} days: structured {s:.1f} vs random {r:.1f} M agent-steps/s "
              f"(random/structured {r / s:.2f}x; best of {args.repeats})")
        del pop, merged, rand
        gc.collect()
    if args.stream:
        with tempfile.TemporaryDirectory() as d, PeakRSS() as mem:
            t = time.perf_counter()
            meta = write_population(bundled_marginals("nyc"), Path(d) / "nyc.parquet", seed=0)
            took = time.perf_counter() - t
            size = sum(f.stat().st_size for f in Path(d).iterdir()) / 2**30
        print(f"streamed NYC {meta['n']:,} agents, {sum(meta['edges'].values()):,} edges to Parquet in "
              f"{took:.1f} s, peak +{mem.extra_gib:.2f} GiB, {size:.2f} GiB on disk")


if __name__ == "__main__":
    main()

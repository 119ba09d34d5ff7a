"""SIR throughput vs starsim and covasim, forward+backward cost and memory — one run.

Workload (Private-ABM SIR): β 0.5/day, γ 0.1/day, I0 1 %, 60 days, static random contact
network of mean degree 10. Per-contact daily infection probability ≈ β/n_i = 0.05 in all
three engines. Prints agent-steps/s and the ratios ours/peer.

    .venv/bin/python benchmarks/bench_simulation.py [--sizes 100000,1000000] [--days 60] [--threads 1,2]

"ours forward" is the default engine path (plain SIR: the fused numba run); "fwd+grad" the
default gradient (non-backtracking forward-mode tangents for β and γ, no tape); "smoothed" the
per-event substep path with autograd.
"""

from __future__ import annotations

import argparse
import gc
import os
import threading
import time

import psutil
import torch

from simulation.engine import simulate
from simulation.kernels import warm_up
from simulation.models import SIR
from simulation.population import random_contact_graph

BETA, GAMMA, I0, DEGREE = 0.5, 0.1, 0.01, 10


class PeakRSS:
    """Peak resident memory above the level at entry, sampled every 2 ms."""

    def __enter__(self):
        gc.collect()
        self.proc = psutil.Process(os.getpid())
        self.base = self.proc.memory_info().rss
        self.peak = self.base
        self._stop = False
        self._t = threading.Thread(target=self._poll, daemon=True)
        self._t.start()
        return self

    def _poll(self):
        while not self._stop:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.002)

    def __exit__(self, *exc):
        self._stop = True
        self._t.join()
        self.extra = self.peak - self.base


def run_ours(graph, days, backward=False, checkpoint_days=None, estimator="auto"):
    model = SIR(BETA, GAMMA, I0)
    t = time.perf_counter()
    with PeakRSS() as mem:
        if backward:
            traj = simulate(model, graph, days, seed=1, checkpoint_days=checkpoint_days, estimator=estimator)
            traj.total_infections.backward()
        else:
            with torch.no_grad():
                traj = simulate(model, graph, days, seed=1)
    return time.perf_counter() - t, mem.extra, float(traj.total_infections.detach())


def run_starsim(n, days):
    import starsim as ss

    sim = ss.Sim(
        n_agents=n, start=0, stop=days, dt=1, rand_seed=1, verbose=0,
        diseases=ss.SIR(beta=BETA / DEGREE, init_prev=I0, dur_inf=ss.expon(1 / GAMMA), p_death=0),
        networks=ss.RandomNet(n_contacts=DEGREE, dynamic=False),
    )
    t = time.perf_counter()
    sim.run()
    return time.perf_counter() - t, float(sim.results.sir.cum_infections[-1])


def run_covasim(n, days):
    import covasim as cv

    sim = cv.Sim(
        pop_size=n, pop_type="random", n_days=days, pop_infected=int(I0 * n), verbose=0,
        contacts={"a": DEGREE}, beta=BETA / DEGREE, rand_seed=1,
    )
    t = time.perf_counter()
    sim.run()
    return time.perf_counter() - t, float(sim.results["cum_infections"][-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="100000,1000000")
    ap.add_argument("--days", type=int, default=60)
    ap.add_argument("--threads", default="1,2", help="torch/numba thread counts to run, e.g. 1,2")
    ap.add_argument("--skip-peers", action="store_true")
    args = ap.parse_args()
    warm_up()
    days = args.days
    for threads in (int(t) for t in str(args.threads).split(",")):
        torch.set_num_threads(threads)
        run_all(args, days, threads)


def run_all(args, days: int, threads: int) -> None:
    print(f"\nSIR β={BETA} γ={GAMMA} I0={I0:.0%} degree {DEGREE}, {days} days, threads {threads}")
    for n in (int(s) for s in args.sizes.split(",")):
        graph = random_contact_graph(n, DEGREE, seed=0)
        steps = n * days
        fwd, fwd_mem, inf = run_ours(graph, days)
        bwd, bwd_mem, _ = run_ours(graph, days, backward=True)
        st, st_mem, _ = run_ours(graph, days, backward=True, estimator="smoothed")
        print(f"\nN = {n:,}")
        print(f"  ours forward (fused)      {fwd:8.2f} s  {steps / fwd / 1e6:7.2f} M agent-steps/s  infections {inf:,.0f}")
        print(f"  ours fwd+grad (default)   {bwd:8.2f} s  ratio to forward {bwd / fwd:.2f}×  "
              f"memory {bwd_mem / steps:.1f} B/agent-step")
        print(f"  ours fwd+bwd (smoothed)   {st:8.2f} s  ratio to forward {st / fwd:.2f}×  "
              f"memory {st_mem / steps:.1f} B/agent-step")
        if args.skip_peers:
            continue
        ss_t, ss_inf = run_starsim(n, days)
        print(f"  starsim                   {ss_t:8.2f} s  {steps / ss_t / 1e6:7.2f} M agent-steps/s  "
              f"infections {ss_inf:,.0f}  → ours is {ss_t / fwd:.1f}× faster")
        cv_t, cv_inf = run_covasim(n, days)
        print(f"  covasim                   {cv_t:8.2f} s  {steps / cv_t / 1e6:7.2f} M agent-steps/s  "
              f"infections {cv_inf:,.0f}  → ours is {cv_t / fwd:.1f}× faster")


if __name__ == "__main__":
    main()

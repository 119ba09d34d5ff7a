"""SIR throughput vs starsim and covasim, forward+backward cost and memory — one run.

Workload (Private-ABM SIR): β 0.5/day, γ 0.1/day, I0 1 %, 60 days, static random contact
network of mean degree 10. Per-contact daily infection probability ≈ β/n_i = 0.05 in all
three engines. Prints agent-steps/s and the ratios ours/peer.

    .venv/bin/python benchmarks/bench_simulation.py [--sizes 100000,1000000] [--days 60] [--threads 1,2]
        [--repeat 3] [--peers starsim,covasim] [--smoothed] [--baseline HEAD~1]

"ours forward" is the default engine path (plain SIR: the fused numba run); "fwd+grad" the
default gradient (non-backtracking forward-mode tangents for β and γ, no tape); "smoothed"
(``--smoothed``) the per-event substep path with autograd. Every figure is the best of
``--repeat`` runs, wall clock and (in brackets) process CPU time, with the 1-minute load
average at that moment: on a shared machine the CPU time of a 1-thread run is the steadier
number. Memory is the peak RSS growth over the run divided by N × days.

``--baseline REV`` loads ``simulation/fused_sir.py`` of git revision REV into a temporary
module and times its forward and its tangent run in the same process (before/after).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import os
import subprocess
import sys
import tempfile
import time

import torch
from peak_rss import PeakRSS  # benchmarks/peak_rss.py (the script's folder is on sys.path)

from simulation.engine import simulate
from simulation.kernels import warm_up
from simulation.models import SIR
from simulation.population import random_contact_graph

BETA, GAMMA, I0, DEGREE = 0.5, 0.1, 0.01, 10


def load() -> str:
    return f"load {os.getloadavg()[0]:.1f}"


def best_of(repeat: int, fn):
    """fn() -> (wall, cpu, mem, value); the run with the least wall time of ``repeat``."""
    runs = [fn() for _ in range(repeat)]
    return min(runs, key=lambda r: r[0])


def timed(fn):
    gc.collect()
    t, c = time.perf_counter(), time.process_time()
    with PeakRSS(interval=0.002) as mem:
        value = fn()
    return time.perf_counter() - t, time.process_time() - c, mem.extra, value


def run_ours(graph, days, backward=False, checkpoint_days=None, estimator="auto"):
    def go():
        model = SIR(BETA, GAMMA, I0)
        if backward:
            traj = simulate(model, graph, days, seed=1, checkpoint_days=checkpoint_days, estimator=estimator)
            traj.total_infections.backward()
        else:
            with torch.no_grad():
                traj = simulate(model, graph, days, seed=1)
        return float(traj.total_infections.detach())

    return timed(go)


def load_baseline(rev: str):
    """simulation/fused_sir.py at git revision ``rev`` as a module (for before/after timings)."""
    src = subprocess.run(["git", "show", f"{rev}:simulation/fused_sir.py"], check=True, capture_output=True,
                         text=True).stdout
    path = os.path.join(tempfile.mkdtemp(prefix="fused_base_"), "fused_sir_baseline.py")
    with open(path, "w") as f:
        f.write(src)
    spec = importlib.util.spec_from_file_location("fused_sir_baseline", path)
    mod = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules["fused_sir_baseline"] = mod
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def run_fused(mod, graph, days, tangents):
    """One call of ``mod.run_sir_nonbacktracking`` (what the engine's default runs)."""
    layer = graph.merged()
    model = SIR(BETA, GAMMA, I0)
    st = model.initial_state(layer.n, torch.Generator().manual_seed(1), torch.device("cpu"))

    def go():
        series, *_ = mod.run_sir_nonbacktracking(layer, st["S"], st["I"], BETA, GAMMA, days, 1, tangents=tangents)
        return float(series[1:, 3].sum() + series[0, 3])

    return timed(go)


def kernel_profile(graph, days) -> None:
    """Wall (and CPU) seconds per compiled kernel of ``simulation.fused_sir`` (one forward, one
    tangent run): where the gradient's extra time goes. Wraps the module's kernels for the two runs only."""
    import simulation.fused_sir as fs

    names = ["_day_counts", "_events_cnt", "_events", "_events_pack", "_pack", "_edges", "_agents", "_push"]
    orig = {k: getattr(fs, k) for k in names}
    acc: dict[str, list[float]] = {}

    def wrap(name, fn):
        def go(*a):
            t0, c0 = time.perf_counter(), time.process_time()
            out = fn(*a)
            w = acc.setdefault(name, [0.0, 0.0])
            w[0] += time.perf_counter() - t0
            w[1] += time.process_time() - c0
            return out
        return go

    try:
        for k, fn in orig.items():
            setattr(fs, k, wrap(k, fn))
        for tangents in (False, True):
            acc.clear()
            wall, cpu = run_fused(fs, graph, days, tangents)[:2]
            parts = "  ".join(f"{k} {v[0]:.2f} ({v[1]:.2f})" for k, v in sorted(acc.items(), key=lambda kv: -kv[1][0]))
            print(f"  kernels, {'tangent run' if tangents else 'forward':11s} {wall:6.2f} s (cpu {cpu:.2f}): {parts}"
                  f"  [{load()}]", flush=True)
    finally:
        for k, fn in orig.items():
            setattr(fs, k, fn)


def run_starsim(n, days):
    import starsim as ss

    sim = ss.Sim(
        n_agents=n, start=0, stop=days, dt=1, rand_seed=1, verbose=0,
        diseases=ss.SIR(beta=BETA / DEGREE, init_prev=I0, dur_inf=ss.expon(1 / GAMMA), p_death=0),
        networks=ss.RandomNet(n_contacts=DEGREE, dynamic=False),
    )
    t, c = time.perf_counter(), time.process_time()
    sim.run()
    return time.perf_counter() - t, time.process_time() - c, 0, float(sim.results.sir.cum_infections[-1])


def run_covasim(n, days):
    import covasim as cv

    sim = cv.Sim(
        pop_size=n, pop_type="random", n_days=days, pop_infected=int(I0 * n), verbose=0,
        contacts={"a": DEGREE}, beta=BETA / DEGREE, rand_seed=1,
    )
    t, c = time.perf_counter(), time.process_time()
    sim.run()
    return time.perf_counter() - t, time.process_time() - c, 0, float(sim.results["cum_infections"][-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="100000,1000000")
    ap.add_argument("--days", type=int, default=60)
    ap.add_argument("--threads", default="1,2", help="torch/numba thread counts to run, e.g. 1,2")
    ap.add_argument("--repeat", type=int, default=3, help="best of this many runs per figure")
    ap.add_argument("--peers", default="starsim,covasim", help="peer engines to time ('' for none)")
    ap.add_argument("--skip-peers", action="store_true")
    ap.add_argument("--smoothed", action="store_true", help="also time the per-event smoothed fwd+bwd")
    ap.add_argument("--baseline", default=None, help="git revision of simulation/fused_sir.py to compare")
    ap.add_argument("--kernels", action="store_true",
                    help="also print the wall seconds per fused kernel of one forward and one tangent run")
    args = ap.parse_args()
    if args.skip_peers:
        args.peers = ""
    warm_up()
    base = load_baseline(args.baseline) if args.baseline else None
    for threads in (int(t) for t in str(args.threads).split(",")):
        torch.set_num_threads(threads)
        run_all(args, args.days, threads, base)


def _line(label, r, steps, ref=None, extra=""):
    wall, cpu, mem, _ = r
    ratio = f"  {wall / ref:5.2f}× fwd" if ref else ""
    print(f"  {label:30s} {wall:7.2f} s (cpu {cpu:6.2f} s) {steps / wall / 1e6:7.1f} M agent-steps/s"
          f"{ratio}  {mem / steps:5.1f} B/agent-step  {extra}[{load()}]", flush=True)


def run_all(args, days: int, threads: int, base=None) -> None:
    print(f"\nSIR β={BETA} γ={GAMMA} I0={I0:.0%} degree {DEGREE}, {days} days, threads {threads}, "
          f"best of {args.repeat}")
    for n in (int(s) for s in args.sizes.split(",")):
        run_size(args, n, days, base)


def run_size(args, n: int, days: int, base=None) -> None:
    rep = args.repeat
    graph = random_contact_graph(n, DEGREE, seed=0)
    steps = n * days
    print(f"\nN = {n:,}")
    fwd = best_of(rep, lambda: run_ours(graph, days))
    _line("ours forward (fused)", fwd, steps, extra=f"infections {fwd[3]:,.0f}  ")
    bwd = best_of(rep, lambda: run_ours(graph, days, backward=True))
    _line("ours fwd+grad (default)", bwd, steps, fwd[0], extra=f"cpu {bwd[1] / fwd[1]:.2f}× fwd  ")
    if args.smoothed:
        st = best_of(rep, lambda: run_ours(graph, days, backward=True, estimator="smoothed"))
        _line("ours fwd+bwd (smoothed)", st, steps, fwd[0])
    if base is not None:
        bf = best_of(rep, lambda: run_fused(base, graph, days, False))
        _line(f"baseline {args.baseline} forward", bf, steps)
        bt = best_of(rep, lambda: run_fused(base, graph, days, True))
        _line(f"baseline {args.baseline} tangents", bt, steps, bf[0], extra=f"cpu {bt[1] / bf[1]:.2f}× fwd  ")
        import simulation.fused_sir as cur

        nf = best_of(rep, lambda: run_fused(cur, graph, days, False))
        _line("current forward (run only)", nf, steps)
        nt = best_of(rep, lambda: run_fused(cur, graph, days, True))
        _line("current tangents (run only)", nt, steps, nf[0], extra=f"cpu {nt[1] / nf[1]:.2f}× fwd  ")
        print(f"  speed-up vs {args.baseline}: forward {bf[0] / nf[0]:.2f}× (cpu {bf[1] / nf[1]:.2f}×), "
              f"tangents {bt[0] / nt[0]:.2f}× (cpu {bt[1] / nt[1]:.2f}×)")
    if args.kernels:
        kernel_profile(graph, days)
    peers = [p for p in args.peers.split(",") if p]
    if "starsim" in peers:
        ss = best_of(rep, lambda: run_starsim(n, days))
        _line("starsim", ss, steps, extra=f"infections {ss[3]:,.0f}  ours is {ss[0] / fwd[0]:.1f}× faster "
              f"(cpu {ss[1] / fwd[1]:.1f}×)  ")
    if "covasim" in peers:
        cv = best_of(1, lambda: run_covasim(n, days))
        _line("covasim", cv, steps, extra=f"infections {cv[3]:,.0f}  ours is {cv[0] / fwd[0]:.1f}× faster  ")


if __name__ == "__main__":
    main()

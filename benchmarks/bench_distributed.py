"""Partitioned simulation (simulation.distributed): halo bytes vs cut edges, 1 → P ranks.

Part 1 (one process): for each graph and partition method and P, the cut edges, the halo
bytes per exchange (Σ over ranks, and the largest rank) against the bound 8 × cut edges, and
AgentTorch's full-state all_gather (each rank receives the other ranks' N(P−1)/P float32
values of one state tensor per sync).
Part 2 (real processes over gloo on 127.0.0.1): a forward SIR run at N agents on 1 and P
ranks (one torch thread each), same code path; plain single-process engine runs with 1 and
2 threads for reference. Reports seconds per day, speed-up, efficiency, time inside the halo
exchange, and memory per rank (tensor bytes of graph + state, and resident set size).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_distributed.py --n 1000000 --days 10
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time
from pathlib import Path

import numpy as np
import torch


def rss_mb() -> float:
    """Resident set size of this process (MB), from /proc."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def build(graph: str, n: int, seed: int = 0):
    from simulation.population import random_contact_graph, synthesize

    if graph == "random":
        return random_contact_graph(n, 10.0, seed=seed), {}
    if graph == "oxford":
        pop = synthesize("oxford", seed=seed)
    else:  # "nyc": the NYC preset (five boroughs) scaled to n agents
        from simulation.population import PRESETS

        preset = PRESETS["nyc"]
        base = preset.n if preset.n is not None else preset.load().population
        pop = synthesize("nyc", seed=seed, scale=n / base)
    return pop, pop.attributes


def halo_table(graph: str, n: int, parts: list[int], methods: list[str],
               sink: list[dict] | None = None, save=None) -> list[dict]:
    from simulation.distributed import build_shard, cut_stats, partition_graph

    pop, attrs = build(graph, n)
    layer = pop.graph.merged() if hasattr(pop, "graph") else pop.merged()
    rows = sink if sink is not None else []
    for method in methods:
        for p in parts:
            if method == "random" and p not in (parts[0], parts[-1]):
                continue
            t0 = time.perf_counter()
            part = partition_graph(layer, p, method, attributes=attrs)
            t_part = time.perf_counter() - t0
            st = cut_stats(layer, part)
            per_rank = [build_shard(layer, part, r).halo_bytes() for r in range(p)]
            total = sum(per_rank)
            rows.append({
                "graph": graph, "agents": layer.n, "edges": st["edges"], "method": method,
                "ranks": p, "cut_edges": st["cut_edges"], "cut_fraction": st["cut_fraction"],
                "halo_bytes_total": total, "halo_bytes_max_rank": max(per_rank),
                "bytes_per_cut_edge": total / max(st["cut_edges"], 1),
                "allgather_bytes_per_rank": 4 * (layer.n - layer.n // p),
                "allgather_bytes_total": 4 * (layer.n - layer.n // p) * p,
                "partition_seconds": t_part,
            })
            r = rows[-1]
            print(f"{graph:6} {method:8} P={p:<3} cut {r['cut_fraction']:6.1%} "
                  f"({r['cut_edges']:,} of {r['edges']:,})  halo {total / 1e6:7.2f} MB total, "
                  f"{r['halo_bytes_max_rank'] / 1e6:6.2f} MB max rank = {r['bytes_per_cut_edge']:.2f} B/cut edge"
                  f"  | all_gather {r['allgather_bytes_per_rank'] / 1e6:6.2f} MB/rank  "
                  f"(partition {t_part:.1f} s)", flush=True)
            if save is not None:
                save()
    return rows


def _timed_rank(rank: int, world: int, graph: str, n: int, days: int, method: str,
                repeats: int) -> dict:
    """One rank of the timing run (spawn_local target)."""
    import torch.distributed as dist

    from simulation.distributed.runner import prepare, simulate
    from simulation.models import SIR

    base = rss_mb()
    pop, _ = build(graph, n)
    t0 = time.perf_counter()
    shard, local, _ = prepare(pop, method=method)
    t_prep = time.perf_counter() - t0
    n_total = shard.n_total
    model = SIR(beta=0.5, gamma=0.1)
    gen = torch.Generator().manual_seed(1)
    full = model.initial_state(n_total, gen, torch.device("cpu"))
    init = {k: v[shard.owned] for k, v in full.items()}
    del pop, full
    gc.collect()
    setup_rss = rss_mb()
    with torch.no_grad():  # warm-up (numba, gloo buffers) on one day
        simulate(model, None, 1, 1, shard=(shard, local), initial_state=dict(init),
                 estimator="straight_through")
    secs, exch, cpus = [], [], []
    for _ in range(repeats):
        dist.barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        with torch.no_grad():
            traj = simulate(model, None, days, 1, shard=(shard, local), initial_state=dict(init),
                            estimator="straight_through")
        secs.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)  # CPU time: waiting for peers/scheduler excluded
        exch.append(traj.meta["exchange_seconds"])
    state_bytes = sum(v.numel() * v.element_size() for v in traj.final_state.values())
    return {
        "rank": rank, "world": world, "seconds_runs": secs, "cpu_seconds_runs": cpus,
        "prepare_seconds": t_prep,
        "exchange_seconds_runs": exch, "n_local": shard.n_local,
        "n_halo": shard.n_halo, "halo_bytes": shard.halo_bytes(),
        "graph_bytes": shard.nbytes(), "state_bytes": state_bytes,
        "rss_mb": rss_mb(), "rss_after_setup_mb": setup_rss, "rss_imports_mb": base,
        "total_infections": float(traj.total_infections),
    }


def _plain(rank: int, world: int, graph: str, n: int, days: int, threads: int,
           repeats: int) -> dict:
    """Single-process engine run (no partitioning) with ``threads`` torch threads."""
    from simulation.engine import simulate
    from simulation.models import SIR

    torch.set_num_threads(threads)
    base = rss_mb()
    pop, _ = build(graph, n)
    g = pop.graph if hasattr(pop, "graph") else pop
    layer = g.merged()
    model = SIR(beta=0.5, gamma=0.1)
    with torch.no_grad():
        simulate(model, pop, 1, 1, estimator="straight_through")
        secs, cpus = [], []
        for _ in range(repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            traj = simulate(model, pop, days, 1, estimator="straight_through")
            secs.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)
        sec = min(secs)
    gbytes = sum(t.numel() * t.element_size()
                 for t in (layer.indptr, layer.indices, layer.weights) if t is not None)
    sbytes = sum(v.numel() * v.element_size() for v in traj.final_state.values())
    return {"threads": threads, "seconds": sec, "cpu_seconds": min(cpus), "graph_bytes": gbytes,
            "state_bytes": sbytes,
            "rss_mb": rss_mb(), "rss_imports_mb": base,
            "total_infections": float(traj.total_infections)}


def _best(ranks: list[dict], key: str = "seconds_runs") -> float:
    """Fastest repeat, where a repeat takes as long as its slowest rank."""
    return min(max(r[key][i] for r in ranks) for i in range(len(ranks[0][key])))


def timing(graph: str, n: int, days: int, procs: int, method: str, repeats: int = 3) -> dict:
    from simulation.distributed.launch import spawn_local

    out: dict = {"graph": graph, "agents": n, "days": days, "method": method,
                 "load_before": os.getloadavg()}
    for threads in (1, 2):
        r = spawn_local(_plain, 1, graph, n, days, threads, repeats)[0]
        out[f"plain_{threads}t"] = r
        print(f"plain engine, {threads} thread(s): {r['seconds'] / days * 1e3:.0f} ms/day", flush=True)
    for world in (1, procs):
        ranks = spawn_local(_timed_rank, world, graph, n, days, method, repeats)
        out[f"ranks_{world}"] = ranks
        sec = _best(ranks)
        out[f"seconds_{world}"] = sec
        print(f"{world} rank(s): {sec / days * 1e3:.0f} ms/day, exchange (incl. waiting) "
              f"{_best(ranks, 'exchange_seconds_runs') / days * 1e3:.1f} ms/day, "
              f"rss {[round(r['rss_mb']) for r in ranks]} MB", flush=True)
    one, many = out["seconds_1"], out[f"seconds_{procs}"]
    # what two free cores would give: CPU time of the busiest rank (waiting excluded) against
    # one rank's, plus the measured bytes over loopback (≈ 1 GB/s, a generous allowance)
    cpu1 = _best(out["ranks_1"], "cpu_seconds_runs")
    cpup = _best(out[f"ranks_{procs}"], "cpu_seconds_runs")
    wire = max(r["halo_bytes"] for r in out[f"ranks_{procs}"]) * days / 1e9
    out["cpu_speedup"] = cpu1 / (cpup + wire)
    print(f"CPU time per day: 1 rank {cpu1 / days * 1e3:.0f} ms, busiest of {procs} "
          f"{cpup / days * 1e3:.0f} ms → idle-machine estimate {out['cpu_speedup']:.2f}× "
          f"(efficiency {out['cpu_speedup'] / procs:.0%})", flush=True)
    out["speedup"] = one / many
    out["efficiency"] = out["speedup"] / procs
    out["speedup_vs_plain_1t"] = out["plain_1t"]["seconds"] / many
    out["speedup_vs_plain_2t"] = out["plain_2t"]["seconds"] / many
    single = out["ranks_1"][0]
    mem1 = single["graph_bytes"] + single["state_bytes"]
    out["memory_share_per_rank"] = [
        (r["graph_bytes"] + r["state_bytes"]) / mem1 for r in out[f"ranks_{procs}"]
    ]
    out["load_after"] = os.getloadavg()
    print(f"speed-up 1 → {procs} ranks: {out['speedup']:.2f}× (efficiency {out['efficiency']:.0%}); "
          f"vs plain engine 1 thread {out['speedup_vs_plain_1t']:.2f}×, 2 threads "
          f"{out['speedup_vs_plain_2t']:.2f}×; memory per rank (graph+state) "
          f"{[f'{m:.2f}' for m in out['memory_share_per_rank']]} of one rank's; "
          f"load {out['load_before']} → {out['load_after']}", flush=True)
    return out


# Projection assumptions (stated in docs/distributed.md; not measured here: no GPU in this run)
GPU_NS_PER_AGENT_DAY = 0.58 / (90 * 8_400_000) * 1e9  # lead's H200 run: 8.4M × 90 days in 0.58 s
LINKS = {"nvlink": (100e9, 25e-6), "infiniband": (25e9, 60e-6)}  # (bytes/s per GPU, latency)


def project(rows: list[dict], sizes=(8_400_000, 100_000_000), ranks=(1, 2, 4, 8, 16, 64)) -> list[dict]:
    """Seconds per simulated day on P GPUs: compute N/P × c + one exchange of the largest
    rank's halo (scaled from the measured 1M-agent NYC METIS partition) over NVLink (P ≤ 8)
    or InfiniBand (P > 8); AgentTorch's all_gather of one float32 state tensor beside it."""
    measured = {r["ranks"]: r for r in rows if r["graph"] == "nyc" and r["method"] == "metis"}
    out = []
    for n in sizes:
        for p in ranks:
            if p > 1 and p not in measured:
                continue
            bw, lat = LINKS["nvlink" if p <= 8 else "infiniband"]
            halo = 0 if p == 1 else measured[p]["halo_bytes_max_rank"] * n / measured[p]["agents"]
            gather = 4 * (n - n // p)
            compute = n / p * GPU_NS_PER_AGENT_DAY * 1e-9
            comm = 0 if p == 1 else lat + halo / bw
            out.append({"agents": n, "ranks": p, "compute_s": compute, "halo_bytes_per_rank": halo,
                        "exchange_s": comm, "day_s": compute + comm,
                        "allgather_bytes_per_rank": gather,
                        "allgather_s": 0 if p == 1 else lat + gather / bw})
    return out


def _hybrid_rank(rank: int, world: int, n: int, days: int, every: int,
                 stepper: bool = False, tangents: bool = False,
                 graph: str = "tiny", warm_days: int = 0) -> dict | None:
    """One rank of a fleet-mode hybrid run (coordinator.hybrid; procs_group on P > 1, or
    on 1 rank with ``stepper``: the partitioned code path on one process); ``tangents``:
    forward-mode ∂state/∂β carried (the full-path calibration's run, ring of 40 bits)."""
    from coordinator.hybrid import HybridSimulation
    from simulation.models import SIR
    from simulation.population import random_contact_graph, synthesize
    torch.set_num_threads(1)
    pop = random_contact_graph(n, 10.0, seed=1) if graph == "random" else \
        synthesize("tiny", seed=0, scale=n / 1000)
    t0 = time.perf_counter()
    sim = HybridSimulation(SIR(beta=0.9, gamma=0.1, initial_infected=0.05), pop,
                           torch.arange(0, pop.n, every), 3, tangents=tangents,
                           frac_bits=40 if tangents else None,
                           procs_group=True if world > 1 or stepper else None)
    if tangents:  # torch's forward AD imports ~1.4 s of modules on first use: setup, once
        import torch.autograd.forward_ad as fwad
        with torch.no_grad(), fwad.dual_level():
            fwad.unpack_dual(fwad.make_dual(torch.zeros(1), torch.ones(1)).exp())
    rows = [sim.step() for _ in range(warm_days)]  # first-use costs (numba, lazy imports)
    setup = time.perf_counter() - t0
    t0, c0 = time.perf_counter(), time.process_time()
    rows += [sim.step() for _ in range(days)]
    steps, cpu = time.perf_counter() - t0, time.process_time() - c0
    st = sim._stepper
    phases = {} if st is None else {**st.seconds, "received_bytes_per_day":
                                    st.bytes_received / (days + warm_days)}
    if st is not None and world > 1:  # the central layer's halo: 4 B per value column
        from simulation.distributed.partition import cut_stats
        phases["halo_bytes_per_day"] = 4 * (2 if tangents else 1) * st.shard.n_halo * \
            st.op.exchanges / (days + warm_days)
        phases["cut_edges"] = float(cut_stats(sim.split.central, st.partition)["cut_edges"])
    return {"setup_s": setup, "steps_s": steps, "cpu_s": cpu,
            "series": [r["new_infections"] for r in rows],
            "tangent_series": [r.get("d_new_dbeta", 0.0) for r in rows],
            "phases": phases, "balance": {} if st is None else st.balance,
            "n_local": 0 if st is None else st.shard.n_local}


def _burn(rank: int, world: int) -> tuple[float, float]:
    """Pure-Python CPU work (no I/O, no collectives): (wall, CPU) seconds."""
    t0, c0 = time.perf_counter(), time.process_time()
    x = 0
    for i in range(20_000_000):
        x += i
    return time.perf_counter() - t0, time.process_time() - c0


def free_cores(procs: int) -> float:
    """How many cores P independent processes get right now: Σ CPU / max wall of P burners
    (P on an idle machine with P cores; ~1 when the others' load leaves one core)."""
    from simulation.distributed.launch import spawn_local
    out = spawn_local(_burn, procs, timeout=600)
    return sum(c for _, c in out) / max(w for w, _ in out)


def hybrid_timing(n: int, days: int, every: int, procs: int, tangents: bool = False,
                  graph: str = "tiny") -> dict:
    """1- vs P-rank hybrid run (same run, alternated twice, best of 2): the plain 1-rank
    HybridSimulation, the partitioned code path on 1 rank, and on P ranks; ratios. With
    ``tangents`` the runs carry ∂state/∂β (and the plain value-only 1-rank run is timed
    too, for the tangents' own cost)."""
    from simulation.distributed.launch import spawn_local
    cores = free_cores(procs)
    print(f"{procs} independent CPU-bound processes get {cores:.2f} cores now "
          f"(load {os.getloadavg()[0]:.1f}): wall speed-ups are capped by that", flush=True)
    runs = {"plain 1": (1, False), "stepper 1": (1, True), f"stepper {procs}": (procs, True)}
    if tangents:
        runs = {"values only, plain 1": (1, False), **runs}
    best: dict[str, float] = {}
    cpu: dict[str, float] = {}  # the busiest rank's CPU seconds: the day's critical path
    series: dict[str, list] = {}
    tseries: dict[str, list] = {}
    st_names = ("sync", "cross", "halo", "reduce", "day")  # the stepper's phase seconds
    for _ in range(2):
        for label, (w, stepper) in runs.items():
            tan = tangents and not label.startswith("values only")
            ranks = spawn_local(_hybrid_rank, w, n, days, every, stepper, tan, graph,
                                1 if tangents else 0, timeout=600)
            r = ranks[0]
            best[label] = min(best.get(label, float("inf")), r["steps_s"])
            cpu[label] = min(cpu.get(label, float("inf")), max(q["cpu_s"] for q in ranks))
            series[label] = r["series"]
            if tan:
                tseries[label] = r["tangent_series"]
            per_rank = "/".join(f"{q['cpu_s']:.2f}" for q in ranks)
            print(f"hybrid {n} agents, {n // every} devices, {days} days, {label} rank(s): "
                  f"steps {r['steps_s']:.2f} s, setup {r['setup_s']:.2f} s, CPU per rank "
                  f"{per_rank} s "
                  f"(load {os.getloadavg()[0]:.1f})", flush=True)
            if r["balance"]:
                print("  setup: " + ", ".join(f"{k} {v:.3f}" for k, v in r["balance"].items()))
            for k, q in enumerate(ranks):  # where a partitioned day's time goes, per rank
                if q["phases"]:
                    print(f"  rank {k} ({q['n_local']} agents): " + ", ".join(
                        f"{name} {v:.2f} s" if name in st_names
                        else f"{name} {v / 1e3:.1f} kB" if name.endswith("per_day")
                        else f"{name} {v:.0f}" for name, v in q["phases"].items()))
    assert all(v == series["plain 1"] for v in series.values()), "series differ from 1 rank"
    for label, ts in tseries.items():  # ∂new/∂β per day: 1e-12 relative (float64 totals)
        ref = tseries["plain 1"]
        worst = max((abs(a - b) / max(abs(b), 1e-300) for a, b in zip(ts, ref, strict=True)),
                    default=0.0)
        print(f"  d_new/dβ series of {label} vs plain 1: max rel diff {worst:.2g}")
        assert worst <= 1e-12, (label, worst)
    top = f"stepper {procs}"
    ratio, ratio_same = best["plain 1"] / best[top], best["stepper 1"] / best[top]
    cpu_ratio = cpu["plain 1"] / cpu[top]
    if tangents:
        base = "values only, plain 1"
        print(f"tangents' own cost on 1 rank: {best['plain 1'] / best[base]:.2f}x wall, "
              f"{cpu['plain 1'] / cpu[base]:.2f}x CPU of the value-only run")
    print(f"hybrid speed-up plain 1 rank -> {procs} ranks (best of 2): {ratio:.2f}x; "
          f"partitioned path 1 -> {procs} ranks: {ratio_same:.2f}x; CPU seconds of plain 1 "
          f"rank / of the busiest of {procs} (the speed-up a machine with {procs} free cores "
          f"would show, less the collectives' latency): {cpu_ratio:.2f}x")
    cores_after = free_cores(procs)
    print(f"... and after the runs {cores_after:.2f} cores (load {os.getloadavg()[0]:.1f})")
    return {"n": n, "days": days, "devices": n // every, "best_s": best, "speedup": ratio,
            "tangents": tangents, "graph": graph,
            "free_cores": [cores, cores_after],
            "speedup_same_path": ratio_same, "busiest_rank_cpu_s": cpu,
            "cpu_speedup": cpu_ratio}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--days", type=int, default=10)
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--graph", choices=("nyc", "random"), default="nyc")
    ap.add_argument("--method", default="metis")
    ap.add_argument("--parts", default="2,4,8,16,64")
    ap.add_argument("--random-parts", default="2,4")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-halo", action="store_true")
    ap.add_argument("--skip-timing", action="store_true")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--hybrid", action="store_true",
                    help="only the coordinator's fleet-mode hybrid run, 1 vs --procs ranks")
    ap.add_argument("--hybrid-devices", type=int, default=20)
    ap.add_argument("--hybrid-tangents", action="store_true",
                    help="the hybrid runs carry forward-mode tangents ∂state/∂β")
    ap.add_argument("--hybrid-graph", choices=("tiny", "random"), default="tiny",
                    help="tiny scaled to --n, or a random graph of mean degree 10 (a real cut)")
    ap.add_argument("--project", type=Path, default=None,
                    help="print the GPU projection table from a saved --json (halo part)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.project is not None:
        rows = json.loads(args.project.read_text())["halo"]
        print("| agents | GPUs | compute s/day | halo MB/rank | exchange ms | s/day | all_gather MB/rank | all_gather ms |")
        print("|---|---|---|---|---|---|---|---|")
        for r in project(rows):
            print(f"| {r['agents'] / 1e6:g}M | {r['ranks']} | {r['compute_s']:.4f} | "
                  f"{r['halo_bytes_per_rank'] / 1e6:.1f} | {r['exchange_s'] * 1e3:.2f} | "
                  f"{r['day_s']:.4f} | {r['allgather_bytes_per_rank'] / 1e6:.0f} | "
                  f"{r['allgather_s'] * 1e3:.2f} |")
        return
    result: dict = {"uptime_load": os.getloadavg()}
    if args.hybrid:
        result["hybrid"] = hybrid_timing(args.n, args.days, args.n // args.hybrid_devices,
                                         args.procs, args.hybrid_tangents, args.hybrid_graph)
        if args.json:
            args.json.write_text(json.dumps(result, indent=2, default=float))
        return
    if not args.skip_halo:
        parts = [int(p) for p in args.parts.split(",")]
        rows: list[dict] = []
        result["halo"] = rows

        def save() -> None:  # after every row: a long run stopped early keeps what it has
            if args.json:
                args.json.write_text(json.dumps(result, indent=2, default=float))

        halo_table("oxford", 150_000, parts, ["metis", "locality", "block", "random"], rows, save)
        halo_table("nyc", args.n, parts, ["metis", "locality", "random"], rows, save)
        # METIS on a random graph is slow (91 s for P = 4 at 1M on a loaded box): fewer P
        rparts = [int(p) for p in args.random_parts.split(",")]
        halo_table("random", args.n, rparts, ["metis", "random"], rows, save)
        worst = max(r["bytes_per_cut_edge"] for r in rows)
        print(f"largest halo bytes per cut edge: {worst:.2f} (bound 8)")
    if not args.skip_timing:
        result["timing"] = timing(args.graph, args.n, args.days, args.procs, args.method,
                                  args.repeats)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=float))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()

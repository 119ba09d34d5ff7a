"""``torchrun --nproc-per-node P -m simulation.distributed [run] ...`` — one city, P processes.

Every rank builds the same synthetic population (deterministic for the seed), rank 0
partitions it, each rank simulates its agents; rank 0 writes ``series.csv`` (the global
daily series, identical to a single-process ``lpm simulate``) and ``run.json`` (timings,
partition and halo statistics). ``python -m simulation.distributed check --procs P`` runs the
single-process vs P-process equivalence check on this machine (gloo on 127.0.0.1).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m simulation.distributed", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd")
    run = sub.add_parser("run", help="partitioned simulation (start with torchrun)")
    run.add_argument("--preset", default="oxford")
    run.add_argument("--scale", type=float, default=1.0)
    run.add_argument("--days", type=int, default=60)
    run.add_argument("--model", choices=("sir", "seirm"), default="sir")
    run.add_argument("--beta", type=float, default=0.5)
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--estimator", default=None, help="gradient estimator (engine default)")
    run.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (NCCL, one GPU per rank)")
    run.add_argument("--partition", default="metis", help="metis, locality, block or random")
    run.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    run.add_argument("--out", type=Path, default=Path("out/simulate"))
    run.add_argument("--format", choices=("csv", "parquet"), default="csv")
    chk = sub.add_parser("check", help="equivalence check: P local processes vs one")
    chk.add_argument("--procs", type=int, default=2)
    chk.add_argument("--model", choices=("sir", "seirm"), default="sir")
    chk.add_argument("--n", type=int, default=5_000)
    chk.add_argument("--days", type=int, default=20)
    chk.add_argument("--estimator", default="smoothed",
                     help="a per-event estimator (the fused default runs single-process only)")
    return p


def _run(args: argparse.Namespace) -> int:
    import torch
    import torch.distributed as dist

    from simulation.distributed.launch import init_from_env
    from simulation.distributed.partition import cut_stats
    from simulation.distributed.runner import prepare, simulate
    from simulation.models import SEIRM, SIR
    from simulation.population import synthesize

    torch.set_num_threads(max(1, args.threads))
    device = args.device if not args.device.startswith("cuda") else "cuda"
    rank, size = init_from_env(args.device)
    t0 = time.perf_counter()
    pop = synthesize(args.preset, seed=args.seed, scale=args.scale)
    t_pop = time.perf_counter() - t0
    t0 = time.perf_counter()
    shard, local, part = prepare(pop, method=args.partition)
    t_part = time.perf_counter() - t0
    stats = cut_stats(pop.graph.merged(), part) if rank == 0 else {}
    model = SIR(beta=args.beta) if args.model == "sir" else SEIRM(beta=args.beta)
    kw = {} if args.estimator is None else {"estimator": args.estimator}
    dist.barrier()
    t0 = time.perf_counter()
    with torch.no_grad():
        traj = simulate(model, pop, args.days, args.seed, shard=(shard, local), device=device, **kw)
    elapsed = torch.tensor([time.perf_counter() - t0])
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    halo = torch.tensor([shard.halo_bytes()], dtype=torch.int64)
    dist.all_reduce(halo)
    if rank == 0:
        args.out.mkdir(parents=True, exist_ok=True)
        frame = traj.to_frame()
        path = args.out / f"series.{args.format}"
        frame.to_csv(path, index=False) if args.format == "csv" else frame.to_parquet(path)
        sec = float(elapsed)
        info = {
            "agents": pop.n, "ranks": size, "days": args.days, "model": args.model,
            "partition": args.partition, "seconds": sec, "seconds_per_day": sec / args.days,
            "population_seconds": t_pop, "partition_seconds": t_part,
            "halo_bytes_per_exchange": int(halo), "exchanges": traj.meta["exchanges"], **stats,
        }
        (args.out / "run.json").write_text(json.dumps(info, indent=2))
        from simulation.plots import plot_compartments

        png = plot_compartments(traj, args.out / "compartments.png",
                                title=f"{args.model.upper()} · {args.preset} · {pop.n:,} agents · {size} ranks")
        print(f"{pop.n:,} agents on {size} ranks ({args.partition}, cut {stats['cut_fraction']:.1%}): "
              f"{args.days} days in {sec:.1f} s ({pop.n * args.days / sec / 1e6:.1f} M agent-steps/s); "
              f"total infections {int(traj.total_infections):,}; halo {int(halo):,} B/exchange")
        print(f"wrote {path}, {png} and {args.out / 'run.json'}")
    dist.destroy_process_group()
    return 0


def _check(args: argparse.Namespace) -> int:
    from simulation.distributed.launch import spawn_local
    from simulation.distributed.selfcheck import Case, compare, reference, run_case

    case = Case(model=args.model, n=args.n, days=args.days, estimator=args.estimator)
    ref = reference(case)
    worst = {"series_max_abs_diff": 0.0, "grad_max_rel_diff": 0.0}
    for r, got in enumerate(spawn_local(run_case, args.procs, case)):
        diff = compare(ref, got)
        worst = {k: max(worst[k], v) for k, v in diff.items()}
        print(f"rank {r}: {diff}")
    ok = worst["series_max_abs_diff"] == 0.0 and worst["grad_max_rel_diff"] < 1e-4
    print("equal to the single-process run" if ok else "MISMATCH")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in ("run", "check", "-h", "--help"):
        argv = ["run", *argv]  # `torchrun ... -m simulation.distributed --preset ...`
    args = _parser().parse_args(argv)
    return _run(args) if args.cmd == "run" else _check(args)


if __name__ == "__main__":
    raise SystemExit(main())

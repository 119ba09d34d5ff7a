"""Forward and forward+backward time of the SIR engine for a given size, device and estimator.

Standalone (torch + numpy + this project only); prints one JSON object. On CUDA the substep
path with the per-event estimator runs (the fused non-backtracking run is CPU-only).

    python benchmarks/bench_gpu.py --agents 8400000 --days 90 --device cuda [--estimator smoothed]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from simulation.engine import simulate
from simulation.models import SIR
from simulation.population import random_contact_graph


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--agents", type=int, default=1_000_000)
    ap.add_argument("--days", type=int, default=60)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--estimator", default="auto")
    ap.add_argument("--degree", type=float, default=10.0)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    t = time.perf_counter()
    graph = random_contact_graph(args.agents, args.degree, seed=0)
    build = time.perf_counter() - t
    simulate(SIR(0.5, 0.1, 0.01), random_contact_graph(1000, 4, seed=0), 2, device=args.device,
             estimator=args.estimator)  # warm-up (kernels, CUDA context)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    _sync(args.device)
    t = time.perf_counter()
    with torch.no_grad():
        tr = simulate(SIR(0.5, 0.1, 0.01), graph, args.days, seed=1, device=args.device, estimator=args.estimator)
    _sync(args.device)
    fwd = time.perf_counter() - t
    model = SIR(0.5, 0.1, 0.01)
    t = time.perf_counter()
    tr2 = simulate(model, graph, args.days, seed=1, device=args.device, estimator=args.estimator)
    tr2.total_infections.backward()
    _sync(args.device)
    both = time.perf_counter() - t
    out = {
        "agents": args.agents, "days": args.days, "device": args.device,
        "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "estimator": tr2.meta["estimator"], "graph_build_s": round(build, 2),
        "forward_s": round(fwd, 3), "forward_backward_s": round(both, 3), "ratio": round(both / fwd, 2),
        "agent_steps_per_s": round(args.agents * args.days / fwd),
        "total_infections": float(tr.total_infections),
        "dtotal_dbeta": float(model.beta.grad), "dtotal_dgamma": float(model.gamma.grad),
        "peak_gpu_bytes": torch.cuda.max_memory_allocated() if args.device.startswith("cuda") else None,
        "torch_threads": torch.get_num_threads(),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()

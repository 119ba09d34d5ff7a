"""Gradient calibration vs a gradient-free baseline (Nelder–Mead) on the same simulator.

Synthetic truth: SIR on a random graph (γ 0.1) with a time-varying transmission rate β_t,
piecewise constant over 6 ten-day segments (a lockdown halves it on day 20), observed as daily new
infections over 60 days with common random numbers. Both methods start from β = 0.35 in
every segment and minimise the same loss (MSE of log counts). We count simulator runs and
wall time until the loss first falls below the loss the gradient method ends with (and the
β_t error), then print the ratios. ``--segments 1`` gives the 1-parameter case, where
Nelder–Mead is competitive: gradients pay off as parameters multiply.

    .venv/bin/python benchmarks/bench_calibration.py [--agents 100000] [--segments 6]

``--forecast`` instead times one ``lpm forecast`` (fit + posterior predictive) at ``--agents``,
split into the fit (on min(agents, fit_agents) agents) and the predictive draws:

    .venv/bin/python benchmarks/bench_calibration.py --forecast --agents 100000 --threads 2
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from scipy.optimize import minimize

from simulation.calibration.losses import log_mse
from simulation.calibration.point import calibrate
from simulation.engine import simulate
from simulation.models import SIR
from simulation.population import random_contact_graph


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--agents", type=int, default=100_000)
    ap.add_argument("--segments", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-runs", type=int, default=600)
    ap.add_argument("--forecast", action="store_true", help="time one forecast instead")
    ap.add_argument("--origin", default="2020-11-02")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.forecast:
        bench_forecast(args.agents, args.origin)
        return
    days, k = 60, args.segments
    seg_len = days // k
    truth = torch.tensor([0.5 if (i * seg_len) < 20 else 0.25 for i in range(k)])
    g = random_contact_graph(args.agents, 10, seed=7)
    model = SIR(0.5, 0.1)

    def run(beta_segments: torch.Tensor) -> torch.Tensor:
        beta_t = beta_segments.repeat_interleave(seg_len)
        return simulate(model, g, days, seed=7, extras={"beta_t": beta_t})["new_infections"][1:]

    with torch.no_grad():
        target = run(truth)

    def beta_err(b) -> float:
        return float((torch.as_tensor(b, dtype=torch.float32) / truth - 1).abs().max())

    # gradient: Adam through the simulator (straight-through estimator)
    theta = torch.nn.Parameter(torch.full((k,), 0.35))
    trace = []
    t0 = time.perf_counter()
    res = calibrate(lambda: log_mse(run(theta), target), {"beta_t": theta}, steps=40, lr=0.03,
                    lr_decay=0.93,
                    progress=lambda s, v: trace.append((s + 1, time.perf_counter() - t0, v, beta_err(theta.detach()))))
    g_loss = res.losses[-1]
    goal = max(g_loss, min(t[2] for t in trace))
    g_runs, g_time, _, g_err = next(t for t in trace if t[2] <= goal)

    # gradient-free: Nelder–Mead on the same loss
    nm_trace = []
    t1 = time.perf_counter()

    def f(x):
        with torch.no_grad():
            value = float(log_mse(run(torch.tensor(x, dtype=torch.float32)), target))
        nm_trace.append((len(nm_trace) + 1, time.perf_counter() - t1, value, beta_err(x)))
        return value

    minimize(f, np.full(k, 0.35), method="Nelder-Mead", options={"maxfev": args.max_runs})
    hit = next((t for t in nm_trace if t[2] <= goal), None)
    print(f"SIR {args.agents:,} agents × {days} days, β_t in {k} segments (truth {truth.tolist()})")
    print(f"  gradient (Adam): {g_runs:4d} runs {g_time:7.1f} s  loss {goal:.4f}  max β error {g_err:.1%}")
    if hit is None:
        best = min(nm_trace, key=lambda t: t[2])
        print(f"  Nelder–Mead    : loss {goal:.4f} not reached in {len(nm_trace)} runs "
              f"({nm_trace[-1][1]:.1f} s); best loss {best[2]:.4f}, β error {best[3]:.1%}")
        print(f"  ratio: ≥ {len(nm_trace) / g_runs:.1f}× fewer runs, ≥ {nm_trace[-1][1] / g_time:.1f}× less time with gradients")
    else:
        print(f"  Nelder–Mead    : {hit[0]:4d} runs {hit[1]:7.1f} s  β error then {hit[3]:.1%}")
        print(f"  ratio: {hit[0] / g_runs:.1f}× fewer runs, {hit[1] / g_time:.1f}× less time with gradients")


def bench_forecast(agents: int, origin: str) -> None:
    """Wall time of one 28-day forecast, fit and predictive separately."""
    import os

    from simulation.calibration.forecast import ForecastConfig, run_forecast
    from simulation.calibration.window import WindowConfig

    load = os.getloadavg()[0]
    fc = run_forecast(origin, 28, config=ForecastConfig(window=WindowConfig(agents=agents)))
    fit = fc.fit
    print(f"forecast from {origin}, {agents:,} agents (fit on {min(agents, fit.config.fit_agents or agents):,}): "
          f"total {fc.seconds:.1f} s = fit {fit.seconds:.1f} s ({fit.runs} runs) + predictive "
          f"{fc.seconds - fit.seconds:.1f} s ({fc.runs - fit.runs} runs at {agents:,}); "
          f"in-window R² {fit.quality['r2_7day']:.3f}; load average at start {load:.1f}")


if __name__ == "__main__":
    main()

"""Institutional MPC vs plaintext: 5 institutions × 120 days, log-MSE loss under CrypTen.

Real processes (5 institutions, the coordinator, the dealer) over gloo on 127.0.0.1. Prints,
measured in one run: process start-up; the CrypTen part (log1p and Σ b² of the secret counts,
once per session); a cold round (CrypTen part + first verified round = one full loss and
gradient evaluation from secret counts); warm rounds (verified query, linear MPC, reduce); the
plaintext loss+gradient; ratios; bytes; and the error of L and ∂L/∂θ against plaintext.

    .venv/bin/python benchmarks/bench_mpc.py [--rounds 10]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from coordinator.institutional import MPCSession
from protocols.mpc.query import LogLinearModel, QueryPolicy

K, T = 5, 120


def plaintext(theta: torch.Tensor, y: torch.Tensor) -> tuple[float, torch.Tensor]:
    y_hat, jac = LogLinearModel(K, T).evaluate(theta)
    a, b = torch.log1p(y_hat), torch.log1p(y)
    w = jac / (1 + y_hat).unsqueeze(-1)
    return ((a - b) ** 2).mean().item(), 2 * torch.einsum("ct,ctp->p", a - b, w) / a.numel()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    # NYC-like borough series: 0 … 6,000 cases a day, a few empty days
    y = (torch.rand(K, T, generator=g, dtype=torch.float64) ** 2 * 6000).round()
    tmp = Path(tempfile.mkdtemp()) / "cases.csv"
    frame = pd.DataFrame({"date_of_interest": pd.date_range("2020-03-01", periods=T).strftime("%m/%d/%Y")})
    for k in range(K):
        frame[f"C{k}"] = y[k].numpy()
    frame.to_csv(tmp, index=False)
    thetas = [torch.tensor([6.0 + 0.1 * k for k in range(K)] + [0.2 * (r % 5 - 2)], dtype=torch.float64)
              for r in range(args.rounds + 1)]

    t0 = time.perf_counter()
    reps = 200
    for _ in range(reps):
        plaintext(thetas[0], y)
    plain = (time.perf_counter() - t0) / reps

    start = time.perf_counter()
    end = str((pd.Timestamp("2020-03-01") + pd.Timedelta(days=T - 1)).date())
    with MPCSession(tmp, [f"C{k}" for k in range(K)], start="2020-03-01", end=end,
                    model_args={"cells": K, "days": T}, policy=QueryPolicy(max_rounds=args.rounds + 1),
                    timeout=600) as session:
        startup = time.perf_counter() - start - session.setup_seconds
        t1 = time.perf_counter()
        first = session.round(thetas[0])
        first_round = time.perf_counter() - t1
        t2 = time.perf_counter()
        results = [session.round(th) for th in thetas[1:]]
        warm = (time.perf_counter() - t2) / args.rounds
        traffic = (session.stats.bytes_sent + session.stats.bytes_received) / (args.rounds + 1)
        setup, requests = session.setup_seconds, session.provider.requests
        hits = session.provider.speculative_hits
    errs_l, errs_g, rel_l = [], [], []
    for th, res in zip(thetas, [first, *results], strict=True):
        loss, grad = plaintext(th, y)
        errs_l.append(abs(res.loss - loss))
        rel_l.append(abs(res.loss - loss) / abs(loss))
        errs_g.append(((res.grad - grad).abs().max() / grad.abs().max()).item())
    cold = setup + first_round
    print(f"{K} institutions × {T} days, θ of {K + 1} parameters, {args.rounds} warm rounds; "
          f"load {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"  plaintext loss+grad          {plain * 1e3:9.3f} ms")
    print(f"  CrypTen log1p + Σb² (once)   {setup * 1e3:9.1f} ms  ({requests} tuples, {hits} served speculatively)")
    print(f"  cold round (CrypTen + round) {cold * 1e3:9.1f} ms  ({cold / plain:,.0f}× plaintext)")
    print(f"  warm round (verified query)  {warm * 1e3:9.1f} ms  ({warm / plain:,.0f}× plaintext)")
    print(f"  party start-up               {startup:9.1f} s once")
    print(f"  coordinator traffic          {traffic / 1e3:9.1f} kB per round (set-up included)")
    print(f"  |L error|   max {max(errs_l):.2e}  (relative max {max(rel_l):.2e})")
    print(f"  ∂L/∂θ error max {max(errs_g):.2e} relative to max |∂L/∂θ|")


if __name__ == "__main__":
    main()

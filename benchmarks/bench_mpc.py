"""MPC loss + gradient vs plaintext: 5 institutions × 120 days, one run.

Real processes (one per institution + the coordinator) over gloo on 127.0.0.1. Prints
seconds per round and bytes (coordinator's traffic; each institution sends its K+1 shares
of 120 + 1 values and one reduced aggregate), and the ratio to the plaintext computation.

    .venv/bin/python benchmarks/bench_mpc.py [--rounds 10] [--params 6]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from coordinator.institutional import MPCSession

K, T = 5, 120


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--params", type=int, default=6)
    args = ap.parse_args()
    torch.manual_seed(0)
    y = (torch.rand(K, T, dtype=torch.float64) * 2000).round()
    tmp = Path(tempfile.mkdtemp()) / "cases.csv"
    frame = pd.DataFrame({"date_of_interest": pd.date_range("2020-03-01", periods=T).strftime("%m/%d/%Y")})
    for k in range(K):
        frame[f"C{k}"] = y[k].numpy()
    frame.to_csv(tmp, index=False)
    y_hat = torch.rand(K, T, dtype=torch.float64) * 2000
    jac = torch.randn(K, T, args.params, dtype=torch.float64) * 100

    t0 = time.perf_counter()
    for _ in range(args.rounds * 100):
        ys, yhs, js = y / 100, y_hat / 100, jac / 100
        _loss = ((yhs - ys) ** 2).mean()
        _grad = 2 * torch.einsum("kt,ktp->p", yhs - ys, js) / (K * T)
    plain = (time.perf_counter() - t0) / (args.rounds * 100)

    start = time.perf_counter()
    with MPCSession(tmp, [f"C{k}" for k in range(K)], start="2020-03-01",
                    end=str((pd.Timestamp("2020-03-01") + pd.Timedelta(days=T - 1)).date())) as session:
        setup = time.perf_counter() - start
        t1 = time.perf_counter()
        for _ in range(args.rounds):
            result = session.round(y_hat, jac)
        mpc = (time.perf_counter() - t1) / args.rounds
        traffic = (session.stats.bytes_sent + session.stats.bytes_received) / args.rounds
    err = abs(result.loss - _loss.item())
    print(f"{K} institutions × {T} days, θ of {args.params} parameters, {args.rounds} rounds")
    print(f"  plaintext loss+grad   {plain * 1e3:9.3f} ms")
    print(f"  MPC loss+grad         {mpc * 1e3:9.3f} ms per round  ({mpc / plain:,.0f}× plaintext); "
          f"party start-up {setup:.1f} s once")
    print(f"  coordinator traffic   {traffic / 1e3:9.1f} kB per round; shares per institution "
          f"{(K + 1) * (T + 1) * 8 / 1e3:.1f} kB")
    print(f"  |loss error|          {err:.2e} (fixed point, 16 fractional bits)")


if __name__ == "__main__":
    main()

"""Coordinator HTTP read latency under load: 100 concurrent asyncio+httpx clients (keep-alive
connections opened before timing) on
GET /runs/{id}/series (60 stored days) against a uvicorn process on 127.0.0.1; GET /health is
the same-run baseline. Target: p99 ≤ 50 ms. Prints p50/p99 and the ratio to the baseline."""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
_SERVER = """
import sys, uvicorn
from coordinator.service import create_app
from coordinator.store import CoordinatorStore
uvicorn.run(create_app(CoordinatorStore(sys.argv[1]), "b" * 32, execute=False),
            host="127.0.0.1", port=int(sys.argv[2]), log_level="warning", access_log=False)
"""


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _load(url: str, path: str, clients: int, per_client: int) -> tuple[np.ndarray, int]:
    lat: list[float] = []
    errors = [0]
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as c:
        ready = asyncio.Barrier(clients)

        async def worker() -> None:
            await c.get("/health")  # open this client's keep-alive connection (not measured)
            await ready.wait()
            for _ in range(per_client):
                t = time.perf_counter()
                try:
                    r = await c.get(path)
                    r.raise_for_status()
                except httpx.HTTPError:
                    errors[0] += 1
                    continue
                lat.append(time.perf_counter() - t)

        await asyncio.gather(*(worker() for _ in range(clients)))
    return np.array(lat) * 1e3, errors[0]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--requests", type=int, default=20, help="per client")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from coordinator.store import CoordinatorStore

    tmp = tempfile.mkdtemp()
    db = os.path.join(tmp, "c.db")
    store = CoordinatorStore(db)
    rid = store.create_run({"population": "oxford"}, 60)
    for d in range(1, 61):
        store.commit_round(rid, d, {"S": 1e5 - d, "I": d, "R": 0.0, "new_infections": 1.0,
                                    "exposure": {str(a): 0.01 for a in range(20)}})
    port = _port()
    proc = subprocess.Popen([sys.executable, "-c", _SERVER, db, str(port)], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(200):
            try:
                httpx.get(f"{url}/health", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        asyncio.run(_load(url, "/health", 10, 5))  # warm-up
        res = {}
        for path in ("/health", f"/runs/{rid}/series"):
            t0 = time.perf_counter()
            lat, errors = asyncio.run(_load(url, path, args.clients, args.requests))
            wall = time.perf_counter() - t0
            res[path] = (np.percentile(lat, 50), np.percentile(lat, 99), len(lat) / wall)
            print(f"{path:28s} n={len(lat)} errors={errors} p50={res[path][0]:7.1f} ms  p99={res[path][1]:7.1f} ms"
                  f"  {res[path][2]:7.0f} req/s")
        s, h = res[f"/runs/{rid}/series"], res["/health"]
        print(f"series/health ratio: p50 {s[0] / h[0]:.2f}x, p99 {s[1] / h[1]:.2f}x; "
              f"target p99 <= 50 ms: {'met' if s[1] <= 50 else 'NOT met'} "
              f"({args.clients} concurrent clients, one uvicorn worker, loaded 2-core host)")
    finally:
        proc.terminate()
        proc.wait(10)


if __name__ == "__main__":
    main()

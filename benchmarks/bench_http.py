"""Coordinator HTTP read latency under load: 100 concurrent keep-alive connections from `wrk`
(a C load generator, one thread, so the client is not the bottleneck) against one uvicorn
process on 127.0.0.1, for every read endpoint: /health (baseline), /runs, /runs/{id},
/runs/{id}/series (60 stored days), /exposure, /runs/{id}/plot.png, /bundle.
Target: p99 ≤ 50 ms. Prints p50/p99, req/s and the load average.

``--baseline-root DIR`` also serves the same store from another source tree (e.g. the code
before a change, from `git archive`) and measures it in the same run, for ratios.
Without `wrk` (Debian: `apt-get install wrk`) it falls back to a raw asyncio keep-alive
HTTP/1.1 client run in a separate process. ``--rate R`` adds an open-loop run per endpoint
(wrk2-style: fixed schedule, latency from the scheduled send time; wrk2 is not packaged).

The baseline for a change: ``git archive <commit before> | tar -x -C /tmp/base`` then
``--baseline-root /tmp/base``.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Each tree is served the way its `lpm coordinator` serves it (``serve`` where the tree has
# it), without the access log unless --access-log.
_SERVER = """
import sys, uvicorn
try:
    from coordinator.http import service
except ImportError:  # a tree from before coordinator/http/
    from coordinator import service
from coordinator.store import CoordinatorStore
store, port, log = CoordinatorStore(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"
if log:
    sys.stdout = sys.stderr = open("/dev/null", "w")  # the log lines are formatted, not kept
if hasattr(service, "serve"):
    service.serve(store, "b" * 32, port=port, log_level="info" if log else "warning",
                  access_log=log, execute=False)
else:
    uvicorn.run(service.create_app(store, "b" * 32, execute=False), host="127.0.0.1",
                port=port, log_level="info" if log else "warning", access_log=log)
"""
_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wrk(url: str, clients: int, seconds: float) -> tuple[float, float, float, int]:
    """(p50 ms, p99 ms, req/s, non-2xx+errors) from `wrk --latency`."""
    out = subprocess.run(["wrk", "-t1", f"-c{clients}", f"-d{max(1, round(seconds))}s", "--latency",
                          "--timeout", "10s", url], capture_output=True, text=True, check=True
                         ).stdout
    pct = {m[0]: float(m[1]) * _UNITS[m[2]]
           for m in re.findall(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s)\s*$", out, flags=re.M)}
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out)[1])
    if rps == 0:  # nothing completed within wrk's 10 s timeout
        return float("inf"), float("inf"), 0.0, clients
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errs = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    n_bad = (int(bad[1]) if bad else 0) + (sum(map(int, errs.groups())) if errs else 0)
    return pct["50"], pct["99"], rps, n_bad


_RAW_CLIENT = r"""
import asyncio, sys, time
host, port, path, clients, seconds = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), float(sys.argv[5])
req = f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
lat, bad = [], [0]
async def worker(stop):
    r, w = await asyncio.open_connection(host, port)
    while time.perf_counter() < stop:
        t = time.perf_counter()
        w.write(req)
        head = await r.readuntil(b"\r\n\r\n")
        n = int([l for l in head.split(b"\r\n") if l.lower().startswith(b"content-length")][0].split(b":")[1])
        await r.readexactly(n)
        if not head.startswith(b"HTTP/1.1 2"):
            bad[0] += 1
        lat.append(time.perf_counter() - t)
    w.close()
async def main():
    stop = time.perf_counter() + seconds
    await asyncio.gather(*(worker(stop) for _ in range(clients)))
asyncio.run(main())
lat.sort()
print(lat[len(lat) // 2] * 1e3, lat[int(len(lat) * 0.99)] * 1e3, len(lat) / seconds, bad[0])
"""


def _raw(url: str, clients: int, seconds: float) -> tuple[float, float, float, int]:
    m = re.match(r"http://([\d.]+):(\d+)(/.*)", url)
    out = subprocess.run([sys.executable, "-c", _RAW_CLIENT, m[1], m[2], m[3], str(clients),
                          str(seconds)], capture_output=True, text=True, check=True).stdout
    p50, p99, rps, bad = out.split()
    return float(p50), float(p99), float(rps), int(bad)


# Open loop (wrk2-style, no coordinated omission): every connection has its own fixed
# schedule (rate/clients per second, phases spread); a request's latency counts from the time
# it was *scheduled*, so a stalled server is charged for the requests it delayed. One
# asyncio (uvloop when installed) process; its own scheduling jitter is counted as server
# latency (the figures can only be too high). Prints p50 p99 achieved-req/s bad late-starts.
_OPEN_CLIENT = r"""
import asyncio, sys, time
try:
    import uvloop
except ImportError:
    uvloop = None
host, port, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
clients, seconds, rate = int(sys.argv[4]), float(sys.argv[5]), float(sys.argv[6])
req = f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
lat, bad = [], [0]
period = clients / rate
async def worker(k, start, stop):
    r, w = await asyncio.open_connection(host, port)
    due = start + k * period / clients
    while due < stop:
        now = time.perf_counter()
        if due > now:
            await asyncio.sleep(due - now)
        w.write(req)
        head = await r.readuntil(b"\r\n\r\n")
        n = int([l for l in head.split(b"\r\n") if l.lower().startswith(b"content-length")][0].split(b":")[1])
        await r.readexactly(n)
        if not head.startswith(b"HTTP/1.1 2"):
            bad[0] += 1
        lat.append(time.perf_counter() - due)
        due += period
    w.close()
span = []
async def main():
    start = time.perf_counter() + 0.5
    await asyncio.gather(*(worker(k, start, start + seconds) for k in range(clients)))
    span.append(time.perf_counter() - start)
(uvloop.run if uvloop else asyncio.run)(main())
lat.sort()
print(lat[len(lat) // 2] * 1e3, lat[int(len(lat) * 0.99)] * 1e3, len(lat) / span[0], bad[0])
"""


def _open(url: str, clients: int, seconds: float, rate: float
          ) -> tuple[float, float, float, int]:
    m = re.match(r"http://([\d.]+):(\d+)(/.*)", url)
    out = subprocess.run([sys.executable, "-c", _OPEN_CLIENT, m[1], m[2], m[3], str(clients),
                          str(seconds), str(rate)], capture_output=True, text=True, check=True
                         ).stdout
    p50, p99, rps, bad = out.split()
    return float(p50), float(p99), float(rps), int(bad)


_WRITER = """
import sys, time
from coordinator.store import CoordinatorStore
store, rid, period = CoordinatorStore(sys.argv[1]), sys.argv[2], 1.0 / float(sys.argv[3])
while True:  # a commit invalidates every replayed read: each one makes the next reads miss
    store.set_status(rid, "running")
    time.sleep(period)
"""


def _ready(url: str, timeout: float = 120.0) -> None:
    """One complete 200 (the first /plot.png renders for seconds) before any timing."""
    import urllib.request

    with urllib.request.urlopen(url, timeout=timeout) as r:
        r.read()


def _serve(root: Path, db: str, access_log: bool) -> tuple[subprocess.Popen, str]:
    port = _port()
    proc = subprocess.Popen([sys.executable, "-c", _SERVER, db, str(port),
                             "1" if access_log else "0"], cwd=root,
                            env={**os.environ, "PYTHONPATH": str(root)})
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return proc, url
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("server did not start")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--seconds", type=float, default=8.0, help="per endpoint")
    ap.add_argument("--baseline-root", type=Path, default=None)
    ap.add_argument("--client", choices=("wrk", "raw"), default="wrk" if shutil.which("wrk")
                    else "raw")
    ap.add_argument("--rate", type=float, default=0.0,
                    help="also an open-loop run at this fixed total req/s (0: none)")
    ap.add_argument("--access-log", action="store_true",
                    help="serve with uvicorn's access log on (lpm coordinator's default)")
    ap.add_argument("--writes", type=float, default=0.0,
                    help="commits per second from another process during the runs (a run in "
                         "progress commits a few times per simulated day)")
    ap.add_argument("--paths", default="", help="comma-separated subset, e.g. /exposure")
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
    store.set_calibration(rid, {"beta": 0.4})
    store.put_bundle(os.urandom(30_000), "1")
    store.close()
    paths = ["/health", "/runs", f"/runs/{rid}", f"/runs/{rid}/series", "/exposure",
             f"/runs/{rid}/plot.png", "/bundle"]
    if args.paths:
        wanted = args.paths.split(",")
        paths = [p for p in paths if p.replace(rid, "{id}") in wanted]
    load = _raw if args.client == "raw" else _wrk
    servers = [("this tree", ROOT)] + ([("baseline", args.baseline_root)]
                                       if args.baseline_root else [])
    print(f"client: {args.client}, {args.clients} keep-alive connections, {args.seconds:.0f} s "
          f"per endpoint, one uvicorn worker, access log {'on' if args.access_log else 'off'};"
          f" load average before: {os.getloadavg()}")
    if args.rate:
        print(f"open loop: {args.rate:.0f} req/s in all, latency from the scheduled send time")
    if args.writes:
        print(f"{args.writes:g} commits/s from another process throughout")
    results: dict[tuple[str, str], tuple[float, float, float, int]] = {}
    for name, root in servers:
        proc, url = _serve(root, db, args.access_log)
        writer = None
        if args.writes:
            writer = subprocess.Popen([sys.executable, "-c", _WRITER, db, rid, str(args.writes)],
                                      cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        try:
            for path in paths:
                _ready(url + path)
                load(url + path, 10, 1.0)  # warm-up (caches, connections)
                res = load(url + path, args.clients, args.seconds)
                results[name, path] = res
                p50, p99, rps, bad = res
                label = path.replace(rid, "{id}")
                print(f"[{name}] {label:22s} p50 {p50:8.1f} ms  p99 {p99:8.1f} ms  "
                      f"{rps:8.0f} req/s  bad {bad}  "
                      f"{'ok' if p99 <= 50 and bad == 0 else 'NOT met'}  "
                      f"load {os.getloadavg()[0]:.2f}", flush=True)
                if args.rate:
                    res = _open(url + path, args.clients, args.seconds, args.rate)
                    results[name, "open " + path] = res
                    p50, p99, rps, bad = res
                    print(f"[{name}] {label:22s} open loop {args.rate:.0f}/s: p50 {p50:6.1f} ms"
                          f"  p99 {p99:8.1f} ms  {rps:8.0f} req/s  bad {bad}  "
                          f"{'ok' if p99 <= 50 and bad == 0 else 'NOT met'}  "
                          f"load {os.getloadavg()[0]:.2f}", flush=True)
        finally:
            if writer is not None:
                writer.kill()
                writer.wait(10)
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
    if args.baseline_root:
        print("this tree vs baseline (same run): req/s ratio, p99 ratio (lower is better)")
        for path in paths:
            new, old = results["this tree", path], results["baseline", path]
            ratio = f"{new[2] / old[2]:6.1f}x" if old[2] else "  (baseline completed none)"
            p99r = f"{new[1] / old[1]:5.2f}x" if old[1] and math.isfinite(old[1]) else "  -  "
            print(f"{path.replace(rid, '{id}'):22s} req/s {ratio}, p99 {p99r} "
                  f"({new[1]:.0f} ms vs {old[1]:.0f} ms)")
            if args.rate:
                new, old = results["this tree", "open " + path], results["baseline", "open " + path]
                print(f"{'  open loop':22s} p99 {new[1]:.0f} ms vs {old[1]:.0f} ms "
                      f"(achieved {new[2]:.0f} vs {old[2]:.0f} req/s)")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()

"""Benchmark: one SecAgg+ round (all clients and the server in one process, every message
serialised) against a plain-sum round (each client encodes and serialises its vector, the
server parses and sums), in the same run. Reports seconds per round, the client/server split
and bytes on the wire.

With ``--flower`` it also times Flower's legacy ``SecAggPlusWorkflow`` (9 shares, threshold
5) and Flower's plain FedAvg round on the Ray simulation engine, each in a subprocess; those
times include Flower's simulated transport, so compare Flower-vs-Flower and ours-vs-ours.
DESIGN.md §4 records 10–12 s per round at 200 clients for Flower's SecAgg+.

    .venv/bin/python benchmarks/bench_secagg.py [--sizes 50 200 1000] [--lengths 16 10000]
        [--flower]
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_secagg.py --sizes 50 --lengths 16 \
        --repeats 1 --days 5 [--daily-degree 16] [--absent 0.05]   # issue 12's daily target

Timings are CPU seconds of this one-threaded process (``time.process_time``): the box is
shared, and wall time under other load says little. Every timed block starts after a full
``gc.collect()``, so the cyclic collector's pass over the *other* parties' objects (all
1000 simulated devices live in this process) is not charged to the party being timed.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import struct
import subprocess
import sys
import time

import numpy as np
import torch

from protocols.secagg import InputSpec, SecAggError
from protocols.secagg.epoch_client import EpochClient
from protocols.secagg.epoch_messages import (
    SERVER,
    DayInput,
    EHeader,
    EMsg,
    fast_input,
    header_prefix,
)
from protocols.secagg.epoch_server import EpochServer, EpochServerStage
from protocols.secagg.local import RoundSetup, make_round
from protocols.secagg.messages import add_mac, strip_mac

TARGET_S = {200: 1.0, 1000: 5.0}
TARGET_RATIO_10K = 3.0
FLOWER_200_S = "10-12 s (DESIGN.md §4, not re-run)"


def clock() -> float:
    """CPU seconds of this process, after a full collection (see the module docstring)."""
    gc.collect()
    return time.process_time()


def _feed(server: EpochServer, msgs: dict[int, bytes]) -> tuple[dict[int, bytes], float, int]:
    t = clock()
    for i, m in msgs.items():
        server.receive(i, m)
    out = server.advance()
    return out, time.process_time() - t, sum(map(len, msgs.values()))


def epoch_setup(setup: RoundSetup) -> tuple[EpochServer, list[EpochClient], float, float, int, int]:
    """Key agreement of one epoch: (server, clients, client s, server s, bytes up, down)."""
    t = clock()
    server, clients = setup.epoch_server(), setup.epoch_clients()
    ts = time.process_time() - t
    t = clock()
    msgs = {i: c.advertise_keys() for i, c in enumerate(clients)}
    tc = time.process_time() - t
    out, dt, up = _feed(server, msgs)
    ts += dt
    t = clock()
    for i, m in out.items():
        clients[i].accept_roster(m)
    tc += time.process_time() - t
    return server, clients, tc, ts, up, sum(map(len, out.values()))


def epoch_day(server: EpochServer, clients: list[EpochClient], day: int,
              xs: list[torch.Tensor], absent: frozenset[int] = frozenset()
              ) -> tuple[float, float, int, int]:
    """One day (input, consistency round with pairwise tags, unmask) with the clients in
    ``absent`` offline (dropped before input): (client s, server s, bytes up, down)."""
    tc = ts = 0.0
    up = down = 0
    server.open_day(day)
    t = clock()
    msgs = {i: clients[i].masked_input(day, xs[i]) for i in sorted(server.live - absent)}
    tc += time.process_time() - t
    for stage in ("consistency", "unmask", None):
        out, dt, u = _feed(server, msgs)
        ts += dt
        up += u
        down += sum(map(len, out.values()))
        if stage is None:
            break
        t = clock()
        msgs = {i: (clients[i].sign_survivors(m) if stage == "consistency"
                    else clients[i].unmask(m)) for i, m in out.items()}
        tc += time.process_time() - t
    surv = sorted(server.survivors[day])
    assert torch.equal(server.decoded(day), torch.stack([xs[i] for i in surv]).sum(0)), \
        "wrong sum"
    return tc, ts, up, down


def secagg_round(setup: RoundSetup, xs: list[torch.Tensor]) -> tuple[float, float, int, int]:
    """(client seconds, server seconds, bytes up, bytes down) of one full round: key
    agreement plus one day with the consistency round."""
    server, clients, tc, ts, up, down = epoch_setup(setup)
    c2, s2, u2, d2 = epoch_day(server, clients, 0, xs)
    return tc + c2, ts + s2, up + u2, down + d2


def plain_round(spec: InputSpec, xs: list[torch.Tensor]) -> tuple[float, int]:
    """Encode + serialise each input (the same wire schema, no envelopes), parse + sum at
    the server (no privacy): (CPU seconds, bytes)."""
    tc, ts, size = plain_split(spec, xs)
    return tc + ts, size


def plain_split(spec: InputSpec, xs: list[torch.Tensor]) -> tuple[float, float, int]:
    """:func:`plain_round` as (devices' CPU s, coordinator's CPU s, bytes)."""
    t = clock()
    blobs = [
        DayInput(EHeader(EMsg.INPUT, "run", 0, 0, i, SERVER), (), spec.encode(x)).encode()
        for i, x in enumerate(xs)
    ]
    tc = time.process_time() - t
    t = clock()
    total = torch.zeros(spec.length, dtype=torch.int64)
    for b in blobs:
        total.add_(DayInput.decode(b, len(xs), 0, spec.length).vector)
    ts = time.process_time() - t
    assert torch.equal(total, torch.stack(xs).sum(0))
    return tc, ts, sum(map(len, blobs))


def plain_variants(spec: InputSpec, xs: list[torch.Tensor]) -> tuple[float, float]:
    """The plain sum's coordinator done two other ways, to judge the baseline (CPU s):
    (each report authenticated as every SecAgg+ message is, HMAC-SHA256 under a per-device
    key, then the strict decoder and a torch add as :func:`plain_split`; the same HMAC, then
    the exact-layout parser and one NumPy sum, as the SecAgg+ coordinator does)."""
    keys = [os.urandom(32) for _ in xs]  # benchmark keys only
    blobs = [add_mac(k, DayInput(EHeader(EMsg.INPUT, "run", 0, 0, i, SERVER), (),
                                 spec.encode(x)).encode())
             for i, (k, x) in enumerate(zip(keys, xs, strict=True))]
    limit = 600 + 8 * spec.length
    t = clock()
    total = torch.zeros(spec.length, dtype=torch.int64)
    for i, b in enumerate(blobs):
        total.add_(DayInput.decode(strip_mac(keys[i], b, limit), len(xs), 0,
                                   spec.length).vector)
    strict = time.process_time() - t
    prefix = header_prefix(EMsg.INPUT, "run", 0, 0)
    t = clock()
    rows = []
    for i, b in enumerate(blobs):
        got = fast_input(strip_mac(keys[i], b, limit), prefix + struct.pack(">II", i, SERVER),
                         0, spec.length)
        assert got is not None
        rows.append(got[1])
    fast_total = np.frombuffer(b"".join(rows), dtype="<i8").reshape(len(xs), -1).sum(0)
    fast = time.process_time() - t
    expect = torch.stack(xs).sum(0)
    assert torch.equal(total, expect) and torch.equal(torch.from_numpy(fast_total), expect)
    return strict, fast


def flower_worker(n: int, length: int, mode: str, rounds: int = 2) -> None:
    """Run Flower's legacy workflow (``mode`` = "secagg" or "plain"); print seconds/round."""
    os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
    from flwr.client import ClientApp, NumPyClient
    from flwr.client.mod import secaggplus_mod
    from flwr.common import Context, ndarrays_to_parameters
    from flwr.server import LegacyContext, ServerApp, ServerConfig
    from flwr.server.strategy import FedAvg
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
    from flwr.simulation import run_simulation

    class _Client(NumPyClient):  # type: ignore[misc]
        def fit(self, parameters, config):  # type: ignore[no-untyped-def]
            return [np.full(length, 0.5, dtype=np.float32)], 1, {}

    def client_fn(context: Context):  # type: ignore[no-untyped-def]
        return _Client().to_client()

    client_app = ClientApp(client_fn=client_fn, mods=[secaggplus_mod] if mode == "secagg" else [])
    server_app = ServerApp()
    took: list[float] = []

    @server_app.main()
    def _main(grid, context):  # type: ignore[no-untyped-def]
        strategy = FedAvg(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=n,
                          min_available_clients=n,
                          initial_parameters=ndarrays_to_parameters([np.zeros(length, np.float32)]))
        ctx = LegacyContext(context=context, config=ServerConfig(num_rounds=rounds),
                            strategy=strategy)
        fit = SecAggPlusWorkflow(num_shares=9, reconstruction_threshold=5) \
            if mode == "secagg" else None
        wf = DefaultWorkflow(fit_workflow=fit) if fit else DefaultWorkflow()
        t = time.perf_counter()
        wf(grid, ctx)
        took.append(time.perf_counter() - t)

    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=n,
                   backend_config={"client_resources": {"num_cpus": 0.5, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": 2, "include_dashboard": False,
                                                 "logging_level": "error",
                                                 "log_to_driver": False}})
    print(f"FLOWER {took[0] / rounds:.2f}", flush=True)


def flower_time(n: int, length: int, mode: str, timeout: float = 300) -> str:
    """Seconds per round of Flower's legacy path, run in a subprocess (or why not)."""
    try:
        out = subprocess.run(
            [sys.executable, __file__, "--flower-worker", str(n), str(length), mode],
            capture_output=True, text=True, timeout=timeout, check=False,
        ).stdout
    except subprocess.TimeoutExpired:
        return f"> {timeout:.0f}"
    lines = [ln for ln in out.splitlines() if ln.startswith("FLOWER ")]
    return lines[-1].split()[1] if lines else "failed"


def daily(n: int, length: int, days: int, absent: float = 0.0, degree: int = 0) -> None:
    """Daily report aggregation once keys are agreed (issue 12's target: <= 3x a plain
    unmasked sum): per-day CPU seconds, all clients in one process, vs the plain sum; with
    ``absent`` > 0 that fraction of the devices is offline each day (a fresh draw)."""
    spec = InputSpec("int", length, 2**20)
    setup = make_round(n, spec, degree=degree)
    server, clients, tc0, ts0, _, _ = epoch_setup(setup)
    rows = []
    for d in range(days):
        g = torch.Generator().manual_seed(d)  # benchmark data only
        xs = [torch.randint(-(2**20), 2**20, (length,), generator=g) for _ in range(n)]
        rng = np.random.default_rng(1000 + d)  # benchmark draw only
        away = frozenset(int(i) for i in np.flatnonzero(rng.random(n) < absent))
        try:
            tc, ts, up, down = epoch_day(server, clients, d, xs, away)
        except SecAggError as exc:  # e.g. > k − t of one survivor's neighbours offline
            print(f"day {d} aborted ({type(exc).__name__}: {exc})", flush=True)
            if server.stage is not EpochServerStage.READY:  # aborts leave it READY
                server.abandon_day()
            continue
        plains = [plain_split(spec, xs) for _ in range(5)]  # the plain sum is short: noisy
        variants = [plain_variants(spec, xs) for _ in range(3)]
        pc = statistics.median(q[0] for q in plains)
        ps = statistics.median(q[1] for q in plains)
        p = statistics.median(q[0] + q[1] for q in plains)
        devices = len(server.survivors[d])
        rows.append((tc, ts, up, down, p, plains[0][2], pc, ps, devices,
                     statistics.median(v[0] for v in variants),
                     statistics.median(v[1] for v in variants)))
    if not rows:
        print("daily sums: every day aborted", flush=True)
        return
    first = rows[0]
    if len(rows) > 1:  # day 0 also fills the per-holder-set interpolation caches
        rows = rows[1:]
    tc = statistics.median(r[0] for r in rows)
    ts = statistics.median(r[1] for r in rows)
    p = statistics.median(r[4] for r in rows)
    pc = statistics.median(r[6] for r in rows)
    ps = statistics.median(r[7] for r in rows)
    dev = statistics.median(r[0] / r[8] for r in rows)  # one device's CPU per day
    pmac = statistics.median(r[9] for r in rows)
    pfast = statistics.median(r[10] for r in rows)
    cfg = setup.config
    print(f"daily sums at N={n}, len={length}, k={cfg.degree}, t={cfg.threshold}, "
          f"{absent:.0%} offline per day, CPU seconds (median of days 1..{days - 1}; day 0 "
          f"{first[0] + first[1]:.3f} s, coordinator {first[1]:.3f} s):", flush=True)
    print(f"  key agreement once {tc0 + ts0:.3f} s; per day {tc + ts:.3f} s = all devices "
          f"{tc:.3f} s + coordinator {ts:.3f} s; plain sum {p:.4f} s (devices encode "
          f"{pc:.4f} s + coordinator parse/sum {ps:.4f} s)", flush=True)
    print(f"  coordinator-only / plain sum:          {ts / p:6.3f}x  (target <= 3x: "
          f"{'met' if ts / p <= 3 else 'MISSED'})", flush=True)
    print(f"  coordinator-only / plain coordinator:  {ts / ps:5.2f}x", flush=True)
    print(f"  baseline check (plain coordinator only, not the target's measure): as above "
          f"{ps * 1e3:.1f} ms (strict decoder, torch add, no MAC); with an HMAC per report "
          f"{pmac * 1e3:.1f} ms; HMAC + exact-layout parse + one NumPy sum "
          f"{pfast * 1e3:.1f} ms (coordinator / that: {ts / pfast:.1f}x)", flush=True)
    print(f"  one device per day: {dev * 1e3:.2f} ms CPU vs {pc / n * 1e3:.3f} ms to encode "
          f"a plain report ({dev / (pc / n):.0f}x)", flush=True)
    crit, pcrit = ts + dev, ps + pc / n
    print(f"  critical path (coordinator + one device; devices run in parallel, transport "
          f"not included): {crit:.3f} s vs plain {pcrit:.4f} s = {crit / pcrit:.2f}x",
          flush=True)
    print(f"  all parties in one process (total CPU): {(tc + ts) / p:.1f}x; a day that "
          f"re-keyed (new epoch) would cost {tc0 + ts0 + tc + ts:.3f} s = "
          f"{(tc0 + ts0 + tc + ts) / (tc + ts):.1f}x a day", flush=True)
    print(f"  messages per device per day: 3 up / 2 down vs 1 up for a plain sum (in the "
          f"daily loop the masked report rides in the day reply: +2 exchanges); bytes "
          f"up/day {rows[0][2] / 1e6:.2f} MB vs {rows[0][5] / 1e6:.2f} MB plain", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[50, 200, 1000])
    ap.add_argument("--lengths", type=int, nargs="+", default=[16, 10_000])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--days", type=int, default=0,
                    help="also time D daily sums over one epoch at --daily-n x --daily-len")
    ap.add_argument("--daily-n", type=int, default=1000)
    ap.add_argument("--daily-len", type=int, default=16)
    ap.add_argument("--absent", type=float, default=0.0,
                    help="fraction of devices offline each day in the --days run")
    ap.add_argument("--daily-degree", type=int, default=0,
                    help="neighbours per device in the --days run (0: the protocol default, "
                         "10 at 1000; the daily reports use 16 at 1000)")
    ap.add_argument("--flower", action="store_true", help="also time Flower's legacy path")
    ap.add_argument("--flower-worker", nargs=3, metavar=("N", "LEN", "MODE"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.flower_worker:
        n, length, mode = args.flower_worker
        flower_worker(int(n), int(length), mode)
        return
    torch.set_num_threads(1)
    print("secagg = key agreement + one day with the consistency round (multi-round protocol)")
    print(f"{'N':>5} {'len':>6} {'k':>3} {'t':>3} | {'secagg s':>9} {'(min-max)':>13} "
          f"{'client':>7} {'server':>7} | {'plain s':>8} | {'ratio':>7} | "
          f"{'MB up':>7} {'MB down':>7} {'plain MB':>8} | target")
    for n in args.sizes:
        for length in args.lengths:
            spec = InputSpec("int", length, 2**20)
            g = torch.Generator().manual_seed(n + length)  # benchmark data only
            xs = [torch.randint(-(2**20), 2**20, (length,), generator=g) for _ in range(n)]
            reps = args.repeats if n * length <= 2_000_000 else 1
            totals, cs, ss = [], [], []
            for _ in range(reps):
                setup = make_round(n, spec)
                tc, ts, up, down = secagg_round(setup, xs)
                totals.append(tc + ts)
                cs.append(tc)
                ss.append(ts)
            plains = [plain_round(spec, xs) for _ in range(max(reps, 3))]
            p_s = statistics.median(p for p, _ in plains)
            med = statistics.median(totals)
            target = ""
            if n in TARGET_S:
                target = f"<= {TARGET_S[n]:.0f} s: {'met' if med <= TARGET_S[n] else 'MISSED'}"
            if length >= 10_000:
                ok = med / p_s <= TARGET_RATIO_10K
                target += f"; ratio <= {TARGET_RATIO_10K:.0f}x: {'met' if ok else 'MISSED'}"
            cfg = setup.config
            print(
                f"{n:>5} {length:>6} {cfg.degree:>3} {cfg.threshold:>3} | {med:>9.3f} "
                f"({min(totals):5.2f}-{max(totals):5.2f}) {statistics.median(cs):>7.3f} "
                f"{statistics.median(ss):>7.3f} | {p_s:>8.4f} | "
                f"{med / p_s:>6.1f}x | "
                f"{up / 1e6:>7.2f} {down / 1e6:>7.2f} {plains[0][1] / 1e6:>8.2f} | {target}",
                flush=True,
            )
    if args.days:
        daily(args.daily_n, args.daily_len, args.days, args.absent, args.daily_degree)
    if args.flower:
        print("Flower legacy path on the Ray simulation engine, s/round (2 rounds, first "
              "includes warm-up), 16 entries:")
        for n in [n for n in args.sizes if n <= 200]:
            sec, plain = flower_time(n, 16, "secagg"), flower_time(n, 16, "plain")
            print(f"  N={n}: SecAggPlusWorkflow {sec} s, plain FedAvg {plain} s", flush=True)
    else:
        print(f"Flower SecAggPlusWorkflow at N=200: {FLOWER_200_S}")
    print(f"numpy {np.__version__}, torch {torch.__version__}, one thread, one process, CPU "
          "seconds")


if __name__ == "__main__":
    main()

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
from dataclasses import dataclass

import numpy as np
import torch

from protocols.keys import _DOMAIN, expand_key
from protocols.secagg import InputSpec, SecAggError
from protocols.secagg.epoch_client import EpochClient
from protocols.secagg.epoch_keys import EpochContexts, EStep
from protocols.secagg.epoch_messages import (
    SERVER,
    DayInput,
    EHeader,
    EMsg,
    fast_input,
    header_prefix,
)
from protocols.secagg.epoch_server import EpochServer, EpochServerStage
from protocols.secagg.keystream import ring_keystreams
from protocols.secagg.local import RoundSetup, make_round
from protocols.secagg.messages import MacKey, add_mac, hmac_sha256, strip_mac

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
              xs: list[torch.Tensor], absent: frozenset[int] = frozenset(),
              sizes: dict[str, list[list[int]]] | None = None
              ) -> tuple[float, float, int, int]:
    """One day (input, consistency round with pairwise tags, unmask) with the clients in
    ``absent`` offline (dropped before input): (client s, server s, bytes up, down). With
    ``sizes``, the message sizes of each stage are appended to ``sizes["in"]`` (inputs,
    tags, unmask responses) and ``sizes["out"]`` (survivor sets, unmask requests)."""
    tc = ts = 0.0
    up = down = 0
    server.open_day(day)
    t = clock()
    msgs = {i: clients[i].masked_input(day, xs[i]) for i in sorted(server.live - absent)}
    tc += time.process_time() - t
    for stage in ("consistency", "unmask", None):
        if sizes is not None:
            sizes["in"].append(list(map(len, msgs.values())))
        out, dt, u = _feed(server, msgs)
        ts += dt
        up += u
        down += sum(map(len, out.values()))
        if sizes is not None and out:
            sizes["out"].append(list(map(len, out.values())))
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
    key, then the strict decoder and a torch add as :func:`plain_split`; the same HMAC from
    precomputed pad states, the exact-layout parser and one NumPy sum: the SecAgg+
    coordinator's techniques)."""
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
    mks = [MacKey(k) for k in keys]  # per-device pad states, kept as the coordinator does
    t = clock()
    rows = []
    for i, b in enumerate(blobs):
        got = fast_input(strip_mac(mks[i], b, limit), prefix + struct.pack(">II", i, SERVER),
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


def coordinator_floor(devices: int, sizes_in: list[int], sizes_out: list[int],
                      reps: int = 3) -> float:
    """CPU s of the bare message pattern SecAgg+ needs at the coordinator per day: per
    device, each message in (``sizes_in``, MAC included) MAC-verified and kept, each message
    out (``sizes_out``) MAC'd from a ready body; no parsing, no protocol logic, with the
    fastest MAC path the coordinator uses (:class:`MacKey`). Median of ``reps``."""
    keys = [MacKey(os.urandom(32)) for _ in range(devices)]  # benchmark keys only
    ins = [[add_mac(k, os.urandom(size - 32)) for k in keys] for size in sizes_in]
    outs = [[os.urandom(size - 32) for _ in keys] for size in sizes_out]
    took = []
    for _ in range(reps):
        t = clock()
        for stage, blobs in enumerate(ins):
            kept = {}
            for i, b in enumerate(blobs):
                if not keys[i].verify(b):
                    raise AssertionError("floor: MAC does not verify")
                kept[i] = b
            if stage < len(outs):
                sent = {i: body + keys[i].tag(body) for i, body in enumerate(outs[stage])}
        took.append(time.process_time() - t)
        assert len(kept) == devices and len(sent) == devices
    return statistics.median(took)


def device_floor(setup: RoundSetup, reps: int = 300) -> float:
    """CPU s per device-day of the masks alone: k day-key derivations (HKDF-Expand of the
    epoch's pairwise roots, from precomputed HMAC pad states: the fastest primitive here)
    + the self-mask key (one-shot HMAC: a fresh seed each day) + k + 1 ChaCha20 keystreams
    (one batched call) + the signed sum onto the report."""
    cfg, ctx, day, me = setup.config, EpochContexts(setup.config), 1, 0
    peers = list(range(1, cfg.degree + 1))
    label = b"secagg2/pairwise-mask"
    roots = [os.urandom(32) for _ in peers]  # benchmark keys only
    msgs = [b"".join((_DOMAIN, len(label).to_bytes(2, "big"), label,
                      ctx.info(EStep.MASK, me, j, day), b"\x01")) for j in peers]
    mks = [MacKey(r) for r in roots]
    assert [m.tag(x) for m, x in zip(mks, msgs, strict=True)] == [
        ctx.day_pair_key(r, day, me, j) for r, j in zip(roots, peers, strict=True)]
    seed = os.urandom(32)  # benchmark key only
    slabel = b"secagg2/self-mask"
    smsg = b"".join((_DOMAIN, len(slabel).to_bytes(2, "big"), slabel,
                     ctx.info(EStep.MASK, me, me, day), b"\x01"))
    assert hmac_sha256(seed, smsg, "sha256") == expand_key(seed, ctx.info(EStep.MASK, me, me,
                                                                          day), label="secagg2/self-mask")
    sign = np.ones((cfg.degree, 1), dtype=np.int64)  # me < every peer
    x = np.zeros(cfg.spec.length, dtype=np.int64)
    t = clock()
    for _ in range(reps):
        keys = [m.tag(msg) for m, msg in zip(mks, msgs, strict=True)]
        keys.append(hmac_sha256(seed, smsg, "sha256"))
        pads = ring_keystreams(keys, cfg.spec.length)
        y = x + pads[-1] + (pads[:-1] * sign).sum(0)
    assert y.shape == x.shape
    return (time.process_time() - t) / reps


@dataclass
class DayStats:
    """Medians over the measured days (CPU s): ``tc``/``ts`` all devices / coordinator;
    ``p`` the whole plain sum = ``pc`` devices' encode + ``ps`` plain coordinator; ``pmac``
    / ``pfast`` the plain coordinator's variants (:func:`plain_variants`); ``dev`` one
    device; ``floor`` the coordinator's message pattern alone (:func:`coordinator_floor`)."""

    tc: float
    ts: float
    p: float
    pc: float
    ps: float
    pmac: float
    pfast: float
    dev: float
    devices: int
    up: int
    plain_bytes: int
    first_total: float
    first_ts: float
    aborted: int
    sizes_in: list[int]
    sizes_out: list[int]
    floor: float


def measure_days(server: EpochServer, clients: list[EpochClient], spec: InputSpec,
                 days: range, absent: float) -> DayStats | None:
    """Days ``days`` of an agreed epoch with ``absent`` of the devices offline each day (a
    fresh draw), each against the same day's plain sums: medians over the days after the
    first (day 0 also fills the per-holder-set interpolation caches), or None if every day
    aborted."""
    n, length = server.config.n, spec.length
    rows: list[dict[str, float]] = []
    sizes: dict[str, list[list[int]]] = {"in": [], "out": []}
    aborted = 0
    for d in days:
        g = torch.Generator().manual_seed(d)  # benchmark data only
        xs = [torch.randint(-(2**20), 2**20, (length,), generator=g) for _ in range(n)]
        rng = np.random.default_rng(1000 + d)  # benchmark draw only
        away = frozenset(int(i) for i in np.flatnonzero(rng.random(n) < absent))
        try:
            tc, ts, up, _ = epoch_day(server, clients, d, xs, away, sizes)
        except SecAggError as exc:  # e.g. > k − t of one survivor's neighbours offline
            print(f"  day {d} aborted ({type(exc).__name__}: {exc})", flush=True)
            aborted += 1
            if server.stage is not EpochServerStage.READY:  # aborts leave it READY
                server.abandon_day()
            continue
        plains = [plain_split(spec, xs) for _ in range(5)]  # the plain sum is short: noisy
        variants = [plain_variants(spec, xs) for _ in range(3)]
        rows.append({
            "tc": tc, "ts": ts, "up": up, "plain_bytes": plains[0][2],
            "p": statistics.median(q[0] + q[1] for q in plains),
            "pc": statistics.median(q[0] for q in plains),
            "ps": statistics.median(q[1] for q in plains),
            "devices": len(server.survivors[d]),
            "pmac": statistics.median(v[0] for v in variants),
            "pfast": statistics.median(v[1] for v in variants)})
    if not rows:
        return None
    first = rows[0]
    kept = rows[1:] if len(rows) > 1 else rows

    def med(key: str) -> float:
        return statistics.median(r[key] for r in kept)

    devices = int(med("devices"))
    sizes_in = [int(statistics.median(v)) for v in sizes["in"][:3]]
    sizes_out = [int(statistics.median(v)) for v in sizes["out"][:2]]
    return DayStats(
        tc=med("tc"), ts=med("ts"), p=med("p"), pc=med("pc"), ps=med("ps"),
        pmac=med("pmac"), pfast=med("pfast"),
        dev=statistics.median(r["tc"] / r["devices"] for r in kept), devices=devices,
        up=int(med("up")), plain_bytes=int(first["plain_bytes"]),
        first_total=first["tc"] + first["ts"], first_ts=first["ts"], aborted=aborted,
        sizes_in=sizes_in, sizes_out=sizes_out,
        floor=coordinator_floor(devices, sizes_in, sizes_out))


def daily(n: int, length: int, days: int, absent: float = 0.0, degree: int = 0) -> None:
    """Daily report aggregation once keys are agreed (issue 12's target: <= 3x a plain
    unmasked sum): per-day CPU seconds, all clients in one process, vs the plain sum; with
    ``absent`` > 0 that fraction of the devices is offline each day (a fresh draw)."""
    spec = InputSpec("int", length, 2**20)
    setup = make_round(n, spec, degree=degree)
    server, clients, tc0, ts0, _, _ = epoch_setup(setup)
    m = measure_days(server, clients, spec, range(days), absent)
    if m is None:
        print("daily sums: every day aborted", flush=True)
        return
    tc, ts, p, pc, ps = m.tc, m.ts, m.p, m.pc, m.ps
    dev, pmac, pfast, floor = m.dev, m.pmac, m.pfast, m.floor
    cfg = setup.config
    print(f"daily sums at N={n}, len={length}, k={cfg.degree}, t={cfg.threshold}, "
          f"{absent:.0%} offline per day, CPU seconds (median of days 1..{days - 1}; day 0 "
          f"{m.first_total:.3f} s, coordinator {m.first_ts:.3f} s):", flush=True)
    print(f"  key agreement once {tc0 + ts0:.3f} s; per day {tc + ts:.3f} s = all devices "
          f"{tc:.3f} s + coordinator {ts:.3f} s; plain sum {p:.4f} s (devices encode "
          f"{pc:.4f} s + coordinator parse/sum {ps:.4f} s)", flush=True)
    print(f"  coordinator-only / plain sum:          {ts / p:6.3f}x  (target <= 3x: "
          f"{'met' if ts / p <= 3 else 'MISSED'})", flush=True)
    print(f"  coordinator-only / plain coordinator:  {ts / ps:5.2f}x", flush=True)
    print(f"  baseline check (plain coordinator only, not the target's measure): as above "
          f"{ps * 1e3:.1f} ms (strict decoder, torch add, no MAC); with an HMAC per report "
          f"{pmac * 1e3:.1f} ms; HMAC (precomputed pads) + exact-layout parse + one NumPy "
          f"sum {pfast * 1e3:.1f} ms (coordinator / that: {ts / pfast:.1f}x)", flush=True)
    print(f"  floor (the message pattern alone: per device {len(m.sizes_in)} MAC-verified "
          f"messages in of {'/'.join(map(str, m.sizes_in))} B, {len(m.sizes_out)} "
          f"MAC'd out of {'/'.join(map(str, m.sizes_out))} B, no protocol logic): "
          f"{floor * 1e3:.1f} ms = {floor / ps:.2f}x the plain coordinator, "
          f"{floor / pfast:.1f}x its HMAC + fast version; the coordinator is "
          f"{ts / floor:.2f}x the floor ({(ts - floor) * 1e3:.1f} ms above it)", flush=True)
    dfloor = device_floor(setup)
    print(f"  one device per day: {dev * 1e3:.2f} ms CPU vs {pc / n * 1e3:.3f} ms to encode "
          f"a plain report ({dev / (pc / n):.0f}x); floor (k = {cfg.degree} day keys + the "
          f"self-mask key + k + 1 keystreams, fastest primitives) {dfloor * 1e3:.3f} ms = "
          f"{dfloor / (pc / n):.1f}x the plain encode", flush=True)
    crit, pcrit = ts + dev, ps + pc / n
    print(f"  critical path (coordinator + one device; devices run in parallel, transport "
          f"not included): {crit:.3f} s vs plain {pcrit:.4f} s = {crit / pcrit:.2f}x",
          flush=True)
    print(f"  all parties in one process (total CPU): {(tc + ts) / p:.1f}x; a day that "
          f"re-keyed (new epoch) would cost {tc0 + ts0 + tc + ts:.3f} s = "
          f"{(tc0 + ts0 + tc + ts) / (tc + ts):.1f}x a day", flush=True)
    print(f"  messages per device per day: 3 up / 2 down vs 1 up for a plain sum (in the "
          f"daily loop the masked report rides in the day reply: +2 exchanges); bytes "
          f"up/day {m.up / 1e6:.2f} MB vs {m.plain_bytes / 1e6:.2f} MB plain",
          flush=True)


def grid(sizes: list[int], length: int, days: int, offline: list[float],
         degrees: list[int]) -> None:
    """The daily measure over N x k x offline share, one line per point (one key epoch
    per (N, k), its days split over the offline shares). k = 0: the daily reports'
    degree for that N (``report_degree``)."""
    from coordinator.flower.secagg import report_degree  # the daily reports' sizing

    spec = InputSpec("int", length, 2**20)
    print(f"grid: daily sums, len={length}, {days} days per point (median of its days after "
          "the first), CPU ms; headline = coordinator / plain sum (target <= 3x); /p.coord = "
          "coordinator / plain coordinator; /hmac+fast = coordinator / plain coordinator with "
          "MACs, exact-layout parse, one NumPy sum; crit = (coordinator + one device) / "
          "(plain coordinator + one encode); floor = the message pattern alone (see the "
          "daily mode), c/floor = coordinator / floor; dev, dfloor = one device's ms and its "
          "mask floor")
    print(f"{'N':>5} {'k':>3} {'t':>2} {'off':>4} | {'coord':>6} {'plain':>6} | "
          f"{'headline':>8} {'/p.coord':>8} {'/hmac+fast':>10} {'crit':>6} | "
          f"{'floor':>6} {'/p.coord':>8} {'c/floor':>7} | {'dev ms':>6} {'dfloor':>6} | "
          "aborted")
    for n in sizes:
        for k in dict.fromkeys(d or report_degree(n) for d in degrees):
            try:
                setup = make_round(n, spec, degree=k)
            except SecAggError as exc:
                print(f"{n:>5} {k:>3}  refused: {exc}", flush=True)
                continue
            server, clients, *_ = epoch_setup(setup)
            dfloor = device_floor(setup)
            for j, off in enumerate(offline):
                m = measure_days(server, clients, spec, range(j * days, (j + 1) * days), off)
                cfg = setup.config
                if m is None:
                    print(f"{n:>5} {k:>3} {cfg.threshold:>2} {off:>4.0%} | every day "
                          "aborted", flush=True)
                    continue
                ts, ps, pc = m.ts, m.ps, m.pc
                crit = (ts + m.dev) / (ps + pc / n)
                print(f"{n:>5} {k:>3} {cfg.threshold:>2} {off:>4.0%} | {ts * 1e3:>6.1f} "
                      f"{m.p * 1e3:>6.1f} | {ts / m.p:>7.2f}x {ts / ps:>7.2f}x "
                      f"{ts / m.pfast:>9.1f}x {crit:>5.2f}x | {m.floor * 1e3:>6.1f} "
                      f"{m.floor / ps:>7.2f}x {ts / m.floor:>6.2f}x | "
                      f"{m.dev * 1e3:>6.3f} {dfloor * 1e3:>6.3f} | "
                      f"{int(m.aborted)}/{days}", flush=True)


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
    ap.add_argument("--grid", action="store_true",
                    help="only the daily measure over --grid-n x --grid-k x --grid-offline "
                         "(--days days per point, --daily-len entries), one line per point")
    ap.add_argument("--grid-n", type=int, nargs="+", default=[500, 1000, 2000])
    ap.add_argument("--grid-k", type=int, nargs="+", default=[10, 0],
                    help="degrees (0: the daily reports' degree for that N)")
    ap.add_argument("--grid-offline", type=float, nargs="+", default=[0.0, 0.05, 0.10])
    ap.add_argument("--flower", action="store_true", help="also time Flower's legacy path")
    ap.add_argument("--flower-worker", nargs=3, metavar=("N", "LEN", "MODE"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.flower_worker:
        n, length, mode = args.flower_worker
        flower_worker(int(n), int(length), mode)
        return
    torch.set_num_threads(1)
    if args.grid:
        grid(args.grid_n, args.daily_len, max(args.days, 3), args.grid_offline, args.grid_k)
        print(f"numpy {np.__version__}, torch {torch.__version__}, one thread, one process, "
              "CPU seconds")
        return
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

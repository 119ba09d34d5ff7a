"""A day of the daily SecAgg+ reports in which devices drop after masking next to offline
ones (the fleet's "client N sent no tags" case): the survivor set re-issued without them
(one more consistency round) vs the attempt aborted and the day masked again (the behaviour
before; forced here by marking the attempt as already re-issued). In-process, one thread:
the coordinator and every device's real adapters (ReportRound, SecAggDevice), a fresh device
object per message; CPU seconds of the whole day, summed over all parties.

    python benchmarks/bench_secagg_reissue.py --devices 1000 --offline 0.01 --late 4 --repeat 3

``--device-stages``: instead, the devices' CPU per device and day by stage over ``--days``
clean days after the key setup (the adapters' state load/save and the client's protocol
work split out): what a fleet's device host spends per simulated device on SecAgg+.

``--config-cache-ab``: instead, the clean day with the devices' parsed-config cache
(``edge_agent.secagg_flower._config``) and without it (RoundConfig parsed per message, as
before), alternating.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch
from flwr.app import ConfigRecord

from coordinator.flower.secagg import ReportEpoch, ReportRound
from edge_agent.secagg_flower import SecAggDevice
from protocols.daily import REPORT_FIELDS
from protocols.keys import IdentityKey
from protocols.secagg import SecAggError

L = len(REPORT_FIELDS)


class _Fleet:
    def __init__(self, n: int) -> None:
        self.names = [f"a{i}" for i in range(n)]
        self.ids = {m: IdentityKey.generate() for m in self.names}
        self.st = {m: ConfigRecord() for m in self.names}
        self.epoch: ReportEpoch | None = None

    def dev(self, m: str) -> SecAggDevice:
        return SecAggDevice(self.st[m], self.ids[m].private_bytes())

    def day(self, day: int, off: set[str], late: set[str], reissue: bool = True
            ) -> ReportRound:
        rr = ReportRound("bench", day, self.names, [self.ids[m].public_bytes()
                                                    for m in self.names],
                         min_survivors=3, epoch=self.epoch)
        self.epoch = rr.epoch
        rep = [0.5] * L
        for m in self.names:
            if m in off:
                continue
            if rr.new_epoch:
                idx = rr.registry_for(m)
                blob = self.dev(m).advertise(
                    rr.config.to_bytes(), [self.ids[rr.roster[j]].public_bytes() for j in idx],
                    m, run_id="bench", day=day, report=rep, registry_index=idx)
            else:
                blob = self.dev(m).masked_input(day, rep, run_id="bench",
                                                epoch=rr.config.round)
            rr.receive(m, blob)
        gone = set(off)
        while True:
            if not reissue:
                rr._reissued = True  # the behaviour before: no re-issue, abort and re-mask
            out = rr.advance()
            if rr.stage is None:
                return rr
            if rr.stage == "consistency":
                gone |= late
            for m, b in out.items():
                if m in gone:
                    continue
                try:
                    rr.receive(m, self.dev(m).stage(rr.stage, day, b))
                except (SecAggError, RuntimeError):
                    gone.add(m)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--offline", type=float, default=0.01, help="share offline for the day")
    ap.add_argument("--late", type=int, default=4, help="devices dropping after masking, "
                                                        "each next to an offline one")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--config-cache-ab", action="store_true")
    ap.add_argument("--device-stages", action="store_true")
    ap.add_argument("--days", type=int, default=3, help="clean days for --device-stages")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.device_stages:
        _device_stages(args)
        return
    if args.config_cache_ab:
        _cache_ab(args)
        return
    rng = random.Random(args.seed)  # which simulated devices drop (modelling only)
    times: dict[str, list[float]] = {"clean": [], "reissue": [], "abort": []}
    for rep in range(args.repeat):  # the modes alternate: the shared host's load drifts
        for mode in times:  # clean: the same offline devices, none late
            f = _Fleet(args.devices)
            f.day(0, set(), set())  # key setup + day 0
            assert f.epoch is not None
            srv = f.epoch.server
            off = set(rng.sample(f.names, round(args.offline * args.devices)))
            late: set[str] = set()
            for o in sorted(off):
                if len(late) >= args.late:
                    break
                nb = [f.epoch.roster[j] for j in sorted(srv.neighbours(f.epoch.index[o]))]
                late |= {next(m for m in nb if m not in off)}
            t0 = time.process_time()
            rr = f.day(1, off, set() if mode == "clean" else late, reissue=mode != "abort")
            times[mode].append(time.process_time() - t0)
            print(f"{rep} {mode:8s}: {times[mode][-1]:.2f} CPU-s  attempts {rr.attempt + 1}  "
                  f"re-issued {len(rr.left_out)}  survivors {len(rr.survivors())}", flush=True)
    med = {m: statistics.median(v) for m, v in times.items()}
    print(f"median CPU-s: clean {med['clean']:.2f}, re-issue {med['reissue']:.2f}, "
          f"abort+re-mask {med['abort']:.2f}; abort+re-mask / re-issue "
          f"{med['abort'] / med['reissue']:.2f}x; extra over clean: re-issue "
          f"{med['reissue'] - med['clean']:.2f} s, abort+re-mask {med['abort'] - med['clean']:.2f} s")


def _device_stages(args: argparse.Namespace) -> None:
    from collections.abc import Callable
    from typing import Any

    import edge_agent.secagg_flower as sf
    from protocols.secagg.epoch_client import EpochClient

    acc: dict[str, float] = {}
    timed = [(sf.SecAggDevice, "masked_input", "device: masked input (day message)"),
             (sf.SecAggDevice, "stage", "device: consistency + unmask stages"),
             (sf.SecAggDevice, "_load", "  adapter: load state"),
             (sf.SecAggDevice, "_save", "  adapter: save state"),
             (EpochClient, "masked_input", "  client: masked_input"),
             (EpochClient, "sign_survivors", "  client: sign_survivors"),
             (EpochClient, "unmask", "  client: unmask")]

    def wrap(fn: Callable[..., Any], label: str) -> Callable[..., Any]:
        def timed_fn(*a: Any, **k: Any) -> Any:
            t = time.process_time()
            try:
                return fn(*a, **k)
            finally:
                acc[label] = acc.get(label, 0.0) + time.process_time() - t
        return timed_fn

    f = _Fleet(args.devices)
    f.day(0, set(), set())  # key setup + day 0, not timed
    saved = [(cls, name, getattr(cls, name)) for cls, name, _ in timed]
    for cls, name, label in timed:
        setattr(cls, name, wrap(getattr(cls, name), label))
    try:
        t0 = time.process_time()
        for d in range(1, args.days + 1):
            f.day(d, set(), set())
        total = time.process_time() - t0
    finally:
        for cls, name, fn in saved:
            setattr(cls, name, fn)
    per = args.devices * args.days
    print(f"{args.devices} devices, {args.days} clean days: all parties {total / args.days:.3f} "
          "CPU-s per day; per device per day, CPU ms:")
    for _, _, label in timed:
        print(f"  {label:40s} {acc.get(label, 0.0) / per * 1e3:7.3f}")
    dev = acc.get(timed[0][2], 0.0) + acc.get(timed[1][2], 0.0)
    print(f"  {'device total':40s} {dev / per * 1e3:7.3f}")


def _cache_ab(args: argparse.Namespace) -> None:
    import edge_agent.secagg_flower as sf
    from protocols.secagg import RoundConfig

    cached = sf._config

    def _uncached(blob: bytes) -> tuple[RoundConfig, dict[str, int]]:
        cfg = RoundConfig.from_bytes(blob)
        return cfg, {c: i for i, c in enumerate(cfg.client_ids)}

    times: dict[str, list[float]] = {"cached": [], "per message": []}
    for rep in range(args.repeat):
        for mode in times:
            sf._config = cached if mode == "cached" else _uncached  # type: ignore[assignment]
            f = _Fleet(args.devices)
            f.day(0, set(), set())
            t0 = time.process_time()
            f.day(1, set(), set())
            times[mode].append(time.process_time() - t0)
            print(f"{rep} {mode:11s}: {times[mode][-1]:.2f} CPU-s", flush=True)
    sf._config = cached
    med = {m: statistics.median(v) for m, v in times.items()}
    print(f"median CPU-s of a day (masked input, consistency, unmask; all parties): cached "
          f"{med['cached']:.2f}, per message {med['per message']:.2f}: "
          f"{med['per message'] / med['cached']:.2f}x")


if __name__ == "__main__":
    main()

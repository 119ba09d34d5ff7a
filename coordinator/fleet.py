"""Simulated fleet: the coordinator's :class:`~coordinator.flower.server_app.FederatedRun` and N
edge-agent ClientApps hosted in a separate device-host process
(``python -m edge_agent.fleet_host``, started by name: the coordinator package never imports
``edge_agent``, and the coordinator process never holds a device's state).

Messages cross the process boundary as the :mod:`protocols.daily` dicts; each device is the
real ClientApp with its own Flower ``Context``. ``drop_fraction`` takes that share of the
devices offline at random days and stages (some come back later), to exercise dropouts.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, cast

from coordinator.flower.server_app import FederatedRun, FederatedSettings, MinCohortError
from coordinator.runner import RunConfig
from coordinator.store import CoordinatorStore
from protocols.daily import EXCHANGES

__all__ = ["DEVICE_HOST_MODULE", "FleetError", "ProcessTransport", "dropout_schedule",
           "run_fleet", "timed", "write_summary"]

DEVICE_HOST_MODULE = "edge_agent.fleet_host"
_STAGES = EXCHANGES  # day, then the SecAgg+ stages


class FleetError(RuntimeError):
    """The device host failed or answered out of protocol."""


def _frame_io():  # the host module's framing, by name (no edge_agent import here)
    import pickle
    import struct

    def read(f) -> Any:
        head = f.read(8)
        if len(head) < 8:
            raise FleetError("the device host closed its output")
        (size,) = struct.unpack("<Q", head)
        return pickle.loads(f.read(size))

    def write(f, obj: Any) -> None:
        blob = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        f.write(struct.pack("<Q", len(blob)) + blob)
        f.flush()

    return read, write


class ProcessTransport:
    """:class:`~coordinator.flower.server_app.Transport` to a device-host subprocess."""

    def __init__(self, nodes: int, *, offline: Mapping[int, list] | None = None,
                 node_config: Mapping[str, Any] | None = None,
                 node_configs: Mapping[int, Mapping[str, Any]] | None = None) -> None:
        self._read, self._write = _frame_io()
        env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "OMP_NUM_THREADS": "1"}
        root = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        self.proc = subprocess.Popen([sys.executable, "-m", DEVICE_HOST_MODULE],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        self._nodes = list(range(1, nodes + 1))
        self.device_seconds = 0.0  # wall time spent waiting for the device host
        self._call("init", {"nodes": self._nodes, "offline": dict(offline or {}),
                            "node_config": dict(node_config or {}),
                            "node_configs": {k: dict(v) for k, v in (node_configs or {}).items()}})

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _call(self, op: str, arg: Any) -> Any:
        if self.proc.poll() is not None:
            raise FleetError(f"the device host exited with code {self.proc.returncode}")
        t0 = time.perf_counter()
        self._write(self.proc.stdin, (op, arg))
        status, value = self._read(self.proc.stdout)
        self.device_seconds += time.perf_counter() - t0
        if status != "ok":
            raise FleetError(f"device host: {value}")
        return value

    def node_ids(self) -> list[int]:
        return list(self._nodes)

    def exchange(self, message_type: str, contents: Mapping[int, dict[str, Any]], group: str,
                 timeout: float) -> tuple[dict[int, dict[str, Any]], dict[int, str]]:
        return self._call("exchange", (message_type, dict(contents), group))

    def device_states(self) -> dict[int, dict[str, float]]:
        """The simulated devices' true states (test harness only: the run never calls it)."""
        return self._call("states", None)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self._call("close", None)
            except (FleetError, OSError):
                pass
            try:  # nothing to flush: the simulated devices' states die with the host
                self.proc.wait(30 if os.environ.get("LPM_FLEET_PROFILE") else 0.5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def dropout_schedule(devices: int, days: int, fraction: float, seed: int = 0
                     ) -> dict[int, list]:
    """``{node: [day, stage, back_day]}`` for ``round(fraction · devices)`` random nodes
    (1-based ids): offline from ``stage`` of ``day`` until ``back_day`` (half come back)."""
    if not 0.0 <= fraction < 1.0:
        raise FleetError("drop fraction must be in [0, 1)")
    rng = random.Random(seed)  # modelling randomness only (which simulated device drops)
    k = round(fraction * devices)
    out: dict[int, list] = {}
    for j, node in enumerate(sorted(rng.sample(range(1, devices + 1), k))):
        day = rng.randrange(1, max(days, 2))
        stage = _STAGES[j % len(_STAGES)]
        back = rng.randrange(day + 1, days + 2) if j % 2 else days + 10
        out[node] = [day, stage, back]
    return out


def run_fleet(cfg: RunConfig, *, settings: FederatedSettings | None = None,
              store: CoordinatorStore | None = None, run_id: str | None = None,
              on_day: Callable[[int, dict[str, object]], None] | None = None,
              drop_fraction: float = 0.0, drop_seed: int = 0,
              offline: Mapping[int, list] | None = None,
              transport: ProcessTransport | None = None) -> list[dict[str, object]]:
    """Run ``cfg`` with ``cfg.devices`` simulated devices; returns the per-day rows.
    A given ``transport`` (tests) is used as it is and left open."""
    min_devices = (settings or FederatedSettings()).min_devices
    if cfg.devices < min_devices:
        raise MinCohortError(f"{cfg.devices} devices: the minimum cohort is {min_devices}")
    own = transport is None
    if transport is None:
        sched = dict(offline) if offline is not None else \
            dropout_schedule(cfg.devices, cfg.days, drop_fraction, drop_seed)
        transport = ProcessTransport(cfg.devices, offline=sched)
    try:
        return FederatedRun(transport, cfg, settings=settings, store=store, run_id=run_id,
                            on_day=on_day).run()
    finally:
        if own:
            transport.close()


def write_summary(out_dir: Path, rows: list[dict[str, object]], day_seconds: list[float],
                  extra: Mapping[str, Any] | None = None) -> Path:
    """``out_dir/summary.json``: days_completed, survivors, theta, loss, seconds_per_day."""
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = {
        "days_completed": len(rows),
        "survivors": [int(cast(int, r.get("survivors", 0))) for r in rows],
        "theta": {"beta": [float(cast(float, r["theta_beta"])) for r in rows if "theta_beta" in r]},
        "loss": [float(cast(float, r["loss"])) for r in rows if "loss" in r],
        "seconds_per_day": day_seconds,
        "new_infections": [float(cast(float, r["new_infections"])) for r in rows],
        **dict(extra or {}),
    }
    path = out_dir / "summary.json"
    path.write_text(json.dumps(summary, indent=1))
    return path


def timed(on_day: Callable[[int, dict[str, object]], None] | None = None
          ) -> tuple[Callable[[int, dict[str, object]], None], list[float]]:
    """An ``on_day`` that records the seconds each day took (and calls ``on_day``)."""
    times: list[float] = []
    last = [time.perf_counter()]

    def cb(day: int, row: dict[str, object]) -> None:
        now = time.perf_counter()
        times.append(round(now - last[0], 3))
        last[0] = now
        if on_day is not None:
            on_day(day, row)

    return cb, times


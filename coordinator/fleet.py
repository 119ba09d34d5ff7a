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
from typing import TYPE_CHECKING, Any, cast

from protocols.daily import EXCHANGES

if TYPE_CHECKING:  # the heavy imports happen in run_fleet: importing this module stays light,
    # so `lpm fleet` can start the device host before it imports the coordinator
    from coordinator.flower.server_app import FederatedSettings
    from coordinator.runner import RunConfig
    from coordinator.store import CoordinatorStore

__all__ = ["DEVICE_HOST_MODULE", "FleetError", "ProcessTransport", "dropout_schedule",
           "run_fleet", "start_device_host", "stop_device_host", "timed", "write_summary"]

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


def start_device_host() -> subprocess.Popen:
    """Start a device-host process (``python -m edge_agent.fleet_host``). It imports its
    stack (torch, Flower, the ClientApp) as soon as it starts, so a caller that starts it
    before its own imports and population build has it ready by enrolment; hand it to
    :class:`ProcessTransport` (``process=``), which owns it from then on."""
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "OMP_NUM_THREADS": "1"}
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return subprocess.Popen([sys.executable, "-m", DEVICE_HOST_MODULE],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)


def stop_device_host(proc: subprocess.Popen) -> None:
    """Stop a device host that is not (or no longer) a run's transport: it holds no device
    yet, so it is killed at once rather than left to finish its imports."""
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)
    for f in (proc.stdin, proc.stdout):
        if f is not None:
            f.close()


class ProcessTransport:
    """:class:`~coordinator.flower.server_app.Transport` to a device-host subprocess
    (``process``: one from :func:`start_device_host`, else started here). The ``init``
    frame is sent at once and its answer read before the first exchange, so the host builds
    its devices while the coordinator builds its population."""

    def __init__(self, nodes: int, *, offline: Mapping[int, list] | None = None,
                 node_config: Mapping[str, Any] | None = None,
                 node_configs: Mapping[int, Mapping[str, Any]] | None = None,
                 process: subprocess.Popen | None = None) -> None:
        self._read, self._write = _frame_io()
        self.proc = process if process is not None else start_device_host()
        self._nodes = list(range(1, nodes + 1))
        self.device_seconds = 0.0  # wall time spent waiting for the device host
        self._init_pending = False
        self._send("init", {"nodes": self._nodes, "offline": dict(offline or {}),
                            "node_config": dict(node_config or {}),
                            "node_configs": {k: dict(v) for k, v in (node_configs or {}).items()}})
        self._init_pending = True

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _send(self, op: str, arg: Any) -> None:
        if self.proc.poll() is not None:
            raise FleetError(f"the device host exited with code {self.proc.returncode}")
        try:
            self._write(self.proc.stdin, (op, arg))
        except (BrokenPipeError, OSError) as exc:
            raise FleetError(f"the device host closed its input: {exc}") from None

    def _answer(self) -> Any:
        status, value = self._read(self.proc.stdout)
        if status != "ok":
            raise FleetError(f"device host: {value}")
        return value

    def _call(self, op: str, arg: Any) -> Any:
        t0 = time.perf_counter()
        if self._init_pending:  # the answer to ``init`` (sent in __init__) comes first
            self._init_pending = False
            self._answer()
        self._send(op, arg)
        value = self._answer()
        self.device_seconds += time.perf_counter() - t0
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
              transport: ProcessTransport | None = None,
              process: subprocess.Popen | None = None) -> list[dict[str, object]]:
    """Run ``cfg`` with ``cfg.devices`` simulated devices; returns the per-day rows.
    A given ``transport`` (tests) is used as it is and left open; a given ``process``
    (:func:`start_device_host`, started early by the caller) becomes the run's transport
    and is stopped with it."""
    from coordinator.flower.server_app import FederatedRun, FederatedSettings, MinCohortError

    if transport is not None and process is not None:
        raise FleetError("give a transport or a device-host process, not both")
    min_devices = (settings or FederatedSettings()).min_devices
    if cfg.devices < min_devices:
        if process is not None:
            stop_device_host(process)
        raise MinCohortError(f"{cfg.devices} devices: the minimum cohort is {min_devices}")
    own = transport is None
    if transport is None:
        sched = dict(offline) if offline is not None else \
            dropout_schedule(cfg.devices, cfg.days, drop_fraction, drop_seed)
        try:
            transport = ProcessTransport(cfg.devices, offline=sched, process=process)
        except BaseException:
            if process is not None:
                stop_device_host(process)
            raise
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


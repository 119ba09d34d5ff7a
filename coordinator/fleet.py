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
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from protocols.daily import EXCHANGES

if TYPE_CHECKING:  # the heavy imports happen in run_fleet: importing this module stays light,
    # so `lpm fleet` can start the device host before it imports the coordinator
    from coordinator.fleet_procs import FleetProcs
    from coordinator.flower.server_app import FederatedSettings
    from coordinator.runner import RunConfig
    from coordinator.store import CoordinatorStore

__all__ = ["DEVICE_HOST_MODULE", "FleetError", "ProcessTransport", "check_procs",
           "default_device_hosts", "dropout_schedule", "run_fleet", "start_device_host",
           "start_device_hosts", "stop_device_host", "timed", "write_summary"]

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


#: a fleet this large gets one device-host process per core (up to MAX_DEVICE_HOSTS): the
#: coordinator waits while the devices work, so the devices can use every core
SHARD_FROM_DEVICES = 200
MAX_DEVICE_HOSTS = 4


def default_device_hosts(devices: int) -> int:
    """Device-host processes for a fleet of ``devices``: one below
    :data:`SHARD_FROM_DEVICES` (a second start-up would cost more than it saves), else one
    per core, at most :data:`MAX_DEVICE_HOSTS`."""
    if devices < SHARD_FROM_DEVICES:
        return 1
    return max(1, min(os.cpu_count() or 1, MAX_DEVICE_HOSTS))


def start_device_host(shard: int = 0) -> subprocess.Popen:
    """Start a device-host process (``python -m edge_agent.fleet_host``). It imports its
    stack (torch, Flower, the ClientApp) as soon as it starts, so a caller that starts it
    before its own imports and population build has it ready by enrolment; hand it to
    :class:`ProcessTransport` (``process=``), which owns it from then on."""
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "OMP_NUM_THREADS": "1",
           "LPM_FLEET_SHARD": str(int(shard))}
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return subprocess.Popen([sys.executable, "-m", DEVICE_HOST_MODULE],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)


def start_device_hosts(count: int) -> list[subprocess.Popen]:
    """``count`` device hosts (:func:`start_device_host`), shards 0 … count − 1."""
    if count < 1:
        raise FleetError("a fleet needs at least one device host")
    return [start_device_host(s) for s in range(count)]


def stop_device_host(proc: subprocess.Popen | Sequence[subprocess.Popen]) -> None:
    """Stop device hosts that are not (or no longer) a run's transport: they hold no
    device yet, so they are killed at once rather than left to finish their imports."""
    for pr in [proc] if isinstance(proc, subprocess.Popen) else list(proc):
        if pr.poll() is None:
            pr.kill()
        pr.wait(10)
        for f in (pr.stdin, pr.stdout):
            if f is not None:
                f.close()


class ProcessTransport:
    """:class:`~coordinator.flower.server_app.Transport` to device-host subprocesses.

    ``process``: host(s) from :func:`start_device_host` / :func:`start_device_hosts`, else
    ``hosts`` of them (default :func:`default_device_hosts`) are started here. The nodes are
    split into contiguous blocks, one per host (each device lives in exactly one host, with
    its own Flower ``Context``); an exchange sends every host its block at once and waits
    for all, so the hosts work in parallel. The ``init`` frames are sent at once and their
    answers read before the first exchange, so the hosts build their devices while the
    coordinator builds its population."""

    def __init__(self, nodes: int, *, offline: Mapping[int, list] | None = None,
                 node_config: Mapping[str, Any] | None = None,
                 node_configs: Mapping[int, Mapping[str, Any]] | None = None,
                 process: subprocess.Popen | Sequence[subprocess.Popen] | None = None,
                 hosts: int | None = None) -> None:
        self._read, self._write = _frame_io()
        if process is None:
            procs = start_device_hosts(hosts if hosts is not None else
                                       default_device_hosts(nodes))
        else:
            procs = [process] if isinstance(process, subprocess.Popen) else list(process)
        if not procs or len(procs) > max(nodes, 1):
            stop_device_host(procs)
            raise FleetError(f"{len(procs)} device hosts for {nodes} devices")
        self.procs = procs
        self.proc = procs[0]
        self._nodes = list(range(1, nodes + 1))
        k = len(procs)
        blocks = [self._nodes[s * nodes // k:(s + 1) * nodes // k] for s in range(k)]
        self._shard_of = {n: s for s, block in enumerate(blocks) for n in block}
        self.device_seconds = 0.0  # wall time spent waiting for the device hosts
        self._init_pending = [False] * k
        configs = {int(n): dict(v) for n, v in (node_configs or {}).items()}
        for s, block in enumerate(blocks):
            mine = set(block)
            self._send(s, "init", {
                "nodes": block,
                "offline": {n: v for n, v in dict(offline or {}).items() if n in mine},
                "node_config": dict(node_config or {}),
                "node_configs": {n: v for n, v in configs.items() if n in mine}})
            self._init_pending[s] = True

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _send(self, shard: int, op: str, arg: Any) -> None:
        proc = self.procs[shard]
        if proc.poll() is not None:
            raise FleetError(f"device host {shard} exited with code {proc.returncode}")
        try:
            self._write(proc.stdin, (op, arg))
        except (BrokenPipeError, OSError) as exc:
            raise FleetError(f"device host {shard} closed its input: {exc}") from None

    def _answer(self, shard: int) -> Any:
        status, value = self._read(self.procs[shard].stdout)
        if status != "ok":
            raise FleetError(f"device host {shard}: {value}")
        return value

    def _call_all(self, op: str, args: Mapping[int, Any]) -> dict[int, Any]:
        """Send ``op`` to the hosts in ``args`` (shard -> argument), then read each answer:
        the hosts work at the same time."""
        t0 = time.perf_counter()
        for s, arg in args.items():
            if self._init_pending[s]:
                self._answer_init(s)
            self._send(s, op, arg)
        out = {s: self._answer(s) for s in args}
        self.device_seconds += time.perf_counter() - t0
        return out

    def _answer_init(self, shard: int) -> None:
        """The answer to ``init`` (sent in ``__init__``): read before anything else."""
        self._init_pending[shard] = False
        self._answer(shard)

    def node_ids(self) -> list[int]:
        return list(self._nodes)

    def exchange(self, message_type: str, contents: Mapping[int, dict[str, Any]], group: str,
                 timeout: float) -> tuple[dict[int, dict[str, Any]], dict[int, str]]:
        parts: dict[int, dict[int, dict[str, Any]]] = {}
        for node, body in contents.items():  # a node of no host: host 0 answers "unknown"
            parts.setdefault(self._shard_of.get(node, 0), {})[node] = body
        answers = self._call_all("exchange", {s: (message_type, part, group)
                                              for s, part in sorted(parts.items())})
        replies: dict[int, dict[str, Any]] = {}
        failures: dict[int, str] = {}
        for got, failed in answers.values():
            replies.update(got)
            failures.update(failed)
        order = list(contents)  # the order one host would have answered in
        return ({n: replies[n] for n in order if n in replies},
                {n: failures[n] for n in order if n in failures})

    def device_states(self) -> dict[int, dict[str, float]]:
        """The simulated devices' true states (test harness only: the run never calls it)."""
        out: dict[int, dict[str, float]] = {}
        for states in self._call_all("states", dict.fromkeys(range(len(self.procs)))
                                     ).values():
            out.update(states)
        return out

    def close(self) -> None:
        for s, proc in enumerate(self.procs):
            if proc.poll() is not None:
                continue
            try:
                if self._init_pending[s]:
                    self._answer_init(s)
                self._send(s, "close", None)
                self._read(proc.stdout)
            except (FleetError, OSError, EOFError):
                pass
        for proc in self.procs:
            try:  # nothing to flush: the simulated devices' states die with the host
                proc.wait(30 if os.environ.get("LPM_FLEET_PROFILE") else 0.5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


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
              process: subprocess.Popen | Sequence[subprocess.Popen] | None = None,
              hosts: int | None = None, procs: int | FleetProcs = 1
              ) -> list[dict[str, object]]:
    """Run ``cfg`` with ``cfg.devices`` simulated devices; returns the per-day rows.
    A given ``transport`` (tests) is used as it is and left open; given ``process``\ es
    (:func:`start_device_hosts`, started early by the caller) become the run's transport
    and are stopped with it; else ``hosts`` device hosts are started (default
    :func:`default_device_hosts`). ``procs`` P > 1 partitions the synthetic population over
    P local processes, this one rank 0 (:mod:`coordinator.fleet_procs`; results equal one
    process's bit for bit); a :class:`~coordinator.fleet_procs.FleetProcs` started early by
    the caller is used and closed with the run."""
    from coordinator.fleet_procs import FleetProcs
    from coordinator.flower.server_app import FederatedRun, FederatedSettings, MinCohortError

    given = procs if isinstance(procs, FleetProcs) else None
    n_procs = procs.procs if isinstance(procs, FleetProcs) else int(procs)
    settings = settings or FederatedSettings()
    try:
        check_procs(n_procs)
        if transport is not None and process is not None:
            raise FleetError("give a transport or a device-host process, not both")
        if cfg.devices < settings.min_devices:
            raise MinCohortError(f"{cfg.devices} devices: the minimum cohort is "
                                 f"{settings.min_devices}")
        spec: dict[str, Any] = {"devices": cfg.devices, "estimator": settings.estimator,
                                "tangents": settings.tangents,
                                "replay": settings.tangents and settings.calibration is not None}
        if given is not None and given.spec != FleetProcs.run_spec(cfg.to_dict(), **spec):
            raise FleetError("the worker processes were configured for another run")
    except BaseException:
        if process is not None:
            stop_device_host(process)
        if given is not None:
            given.close()
        raise
    own = transport is None
    if transport is None:
        sched = dict(offline) if offline is not None else \
            dropout_schedule(cfg.devices, cfg.days, drop_fraction, drop_seed)
        try:
            transport = ProcessTransport(cfg.devices, offline=sched, process=process,
                                         hosts=hosts)
        except BaseException:
            if process is not None:
                stop_device_host(process)
            if given is not None:
                given.close()
            raise
    workers = given
    run = None
    try:
        if workers is None and n_procs > 1:
            workers = FleetProcs.start(n_procs, cfg.to_dict(), **spec)
        if workers is not None:
            if len(transport.node_ids()) < cfg.devices:  # the workers place cfg.devices
                raise FleetError(f"{len(transport.node_ids())} devices connected for a "
                                 f"partitioned run of {cfg.devices}")
            workers.join()
        run = FederatedRun(transport, cfg, settings=settings, store=store, run_id=run_id,
                           on_day=on_day, procs_group=True if workers is not None else None)
        rows = run.run()
        if workers is not None:
            workers.finish()
        return rows
    except Exception as exc:
        if workers is not None:  # a worker that died is named, not left as a gloo error
            day = None if run is None or run.sim is None else run.sim.day
            err = workers.explain(exc, day)
            if err is not None:
                raise err from exc
        raise
    finally:
        if workers is not None:
            workers.close()
        if own:
            transport.close()


def check_procs(procs: int) -> None:
    """Refuse a process count before anything starts (:class:`FleetError`). Every option of
    the fleet runs partitioned (calibration, tangents, both: the full-path replay runs over
    the ranks too)."""
    if procs < 1:
        raise FleetError(f"--procs {procs}: at least 1 process")


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


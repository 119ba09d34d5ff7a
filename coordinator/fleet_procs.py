"""`lpm fleet --procs P`: the fleet's synthetic population partitioned over P local processes.

Rank 0 is the calling process: it runs the fleet as on one process (device hosts, the
neighbourhood protocol, SecAgg+ reports, calibration, the store) with
``HybridSimulation(remote=True, procs_group=True)``; ranks 1..P−1 are worker processes
(``python -m coordinator.fleet_procs``, started by :meth:`FleetProcs.start`) that build the
same population and loop ``sim.step()`` then ``sim.state_bytes()`` (both collectives) for the
run's days (docs/distributed.md, "The hybrid run, partitioned"). The group is gloo on
127.0.0.1, rendezvous through a ``TCPStore`` that rank 0 hosts; results are bit-identical
to one process. A worker that exits early is named (:meth:`FleetProcs.explain`) rather than
left for the next collective's timeout.

Only public run settings travel to the workers (the run config, the device count, the
estimator); they never see a device's state, key or the devices' seed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

from coordinator.fleet import FleetError

__all__ = ["FleetProcs", "FleetProcsError", "WORKER_MODULE"]

WORKER_MODULE = "coordinator.fleet_procs"
_READY = "fleet/ready/{}"
_CPU = "fleet/cpu/{}"


class FleetProcsError(FleetError):
    """A worker process of a partitioned fleet failed (the message names its rank)."""


def _exit_desc(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


class FleetProcs:
    """Ranks 1..P−1 of a partitioned fleet, and rank 0's membership of their group.

    ``start`` launches the workers at once (their imports overlap the caller's);
    ``join`` waits for each to reach the rendezvous (a worker that dies first is named)
    and joins the gloo group as rank 0; ``finish`` waits for the workers' normal exit and
    reads their CPU seconds per day; ``close`` (always) leaves the group and kills any
    worker still running. Each worker's stderr is the caller's."""

    def __init__(self, procs: int, workers: list[subprocess.Popen]) -> None:
        self.procs, self.workers = procs, workers
        self.store: Any = None  # rank 0's TCPStore (the rendezvous), from configure
        self.spec: dict[str, Any] | None = None  # the run the workers build (run_spec)
        self.timeout = 300.0
        self.joined = False
        #: per worker rank (1..P−1): cumulative CPU seconds after setup and after each day
        self.worker_cpu: dict[int, list[float]] = {}

    @classmethod
    def launch(cls, procs: int) -> FleetProcs:
        """Start P−1 worker processes; they import their stack and wait for
        :meth:`configure` (so a caller that launches them before its own imports and
        validation has them ready by the run)."""
        if procs < 2:
            raise FleetProcsError(f"--procs {procs}: a partitioned fleet needs at least 2 "
                                  "processes (1 is the ordinary run)")
        root = str(Path(__file__).resolve().parents[1])
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
               "WORLD_SIZE": str(procs)}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        workers: list[subprocess.Popen] = []
        try:
            for rank in range(1, procs):
                workers.append(subprocess.Popen([sys.executable, "-m", WORKER_MODULE],
                                                stdin=subprocess.PIPE,
                                                env={**env, "RANK": str(rank)}))
        except BaseException:
            cls(procs, workers).close()
            raise
        return cls(procs, workers)

    @staticmethod
    def run_spec(cfg: Mapping[str, Any], *, devices: int, estimator: str = "straight_through",
                 tangents: bool = False, replay: bool = False) -> dict[str, Any]:
        """What the workers need to build rank 0's ``HybridSimulation``: the run config
        (``RunConfig.to_dict()``), the device count, the estimator, tangents, and whether
        the full-path calibration's replay runs over the ranks (tangents + calibration)."""
        return {"cfg": dict(cfg), "devices": int(devices), "estimator": str(estimator),
                "tangents": bool(tangents), "replay": bool(replay)}

    def configure(self, cfg: Mapping[str, Any], *, devices: int,
                  estimator: str = "straight_through", tangents: bool = False,
                  replay: bool = False, timeout: float = 300.0) -> None:
        """Give the workers the run (:meth:`run_spec`) and open the rendezvous;
        ``timeout``: seconds a worker may take to reach it."""
        import torch.distributed as dist

        if self.store is not None:
            raise FleetProcsError("the workers are configured already")
        if dist.is_initialized():
            raise FleetProcsError("a torch.distributed process group is already initialised "
                                  "in this process; a partitioned fleet starts its own")
        self.timeout = float(timeout)
        self.store = dist.TCPStore("127.0.0.1", 0, self.procs, is_master=True,
                                   wait_for_workers=False, timeout=timedelta(seconds=timeout))
        self.spec = self.run_spec(cfg, devices=devices, estimator=estimator, tangents=tangents,
                                  replay=replay)
        spec = json.dumps({**self.spec, "timeout": self.timeout, "port": int(self.store.port)})
        for w in self.workers:
            try:
                assert w.stdin is not None
                w.stdin.write(spec.encode() + b"\n")
                w.stdin.close()
            except (BrokenPipeError, OSError):  # it died: join() names it
                pass

    @classmethod
    def start(cls, procs: int, cfg: Mapping[str, Any], *, devices: int,
              estimator: str = "straight_through", tangents: bool = False,
              replay: bool = False, timeout: float = 300.0) -> FleetProcs:
        """:meth:`launch` then :meth:`configure`."""
        workers = cls.launch(procs)
        try:
            workers.configure(cfg, devices=devices, estimator=estimator, tangents=tangents,
                              replay=replay, timeout=timeout)
        except BaseException:
            workers.close()
            raise
        return workers

    # ------------------------------------------------------------------ state
    def pids(self) -> dict[int, int]:
        """``{rank: pid}`` of the workers."""
        return {r + 1: w.pid for r, w in enumerate(self.workers)}

    def exited(self, wait: float = 0.0) -> dict[int, int]:
        """``{rank: exit code}`` of workers that have exited (waiting up to ``wait`` s for
        one to: a worker killed a moment ago may not be reaped yet)."""
        deadline = time.monotonic() + wait
        while True:
            out = {r + 1: w.returncode for r, w in enumerate(self.workers)
                   if w.poll() is not None}
            if out or time.monotonic() >= deadline:
                return out
            time.sleep(0.05)

    def _dead_error(self, dead: Mapping[int, int], when: str) -> FleetProcsError:
        desc = "; ".join(f"worker rank {r} (pid {self.workers[r - 1].pid}) {_exit_desc(c)}"
                         for r, c in sorted(dead.items()))
        return FleetProcsError(f"partitioned fleet ({self.procs} processes): {desc} {when}")

    def explain(self, exc: BaseException, day: int | None) -> FleetProcsError | None:
        """A clear error for rank 0's failure ``exc`` if a worker has died (its rank and
        exit), else None (rank 0 failed on its own: re-raise ``exc``)."""
        dead = {r: c for r, c in self.exited(wait=3.0).items() if c != 0}
        if not dead:
            return None
        at = f"(the run stopped at day {day}: {type(exc).__name__})" if day is not None \
            else f"({type(exc).__name__})"
        return self._dead_error(dead, at)

    # ------------------------------------------------------------------ lifecycle
    def join(self) -> None:
        """Wait until every worker is at the rendezvous, then join the group as rank 0."""
        import torch.distributed as dist

        if self.store is None:
            raise FleetProcsError("configure the workers before joining them")
        deadline = time.monotonic() + self.timeout
        waiting = set(range(1, self.procs))
        while waiting:
            done = {r for r in waiting if self.store.check([_READY.format(r)])}
            waiting -= done
            dead = {r: c for r, c in self.exited().items() if r in waiting or c != 0}
            if dead:
                raise self._dead_error(dead, "before joining the process group")
            if waiting and time.monotonic() > deadline:
                raise FleetProcsError(f"worker ranks {sorted(waiting)} did not reach the "
                                      f"rendezvous within {self.timeout:.0f} s")
            if waiting:
                time.sleep(0.05)
        dist.init_process_group("gloo", store=self.store, rank=0, world_size=self.procs,
                                timeout=timedelta(seconds=max(self.timeout, 1800.0)))
        self.joined = True

    def finish(self, timeout: float = 120.0) -> None:
        """After rank 0's last day: wait for the workers to finish their last collective and
        exit 0; read their CPU seconds (:attr:`worker_cpu`)."""
        deadline = time.monotonic() + timeout
        for rank, w in enumerate(self.workers, start=1):
            try:
                w.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                raise FleetProcsError(f"worker rank {rank} (pid {w.pid}) did not finish "
                                      f"within {timeout:.0f} s of the last day") from None
            if w.returncode != 0:
                raise self._dead_error({rank: w.returncode}, "at the end of the run")
            key = _CPU.format(rank)
            if self.store is not None and self.store.check([key]):
                self.worker_cpu[rank] = json.loads(self.store.get(key))

    def close(self) -> None:
        """Leave the group; kill the workers still running (after a failure)."""
        import torch.distributed as dist

        if self.joined and dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001 - a peer already gone; nothing left to release
                pass
            self.joined = False
        for w in self.workers:
            if w.poll() is None:
                w.kill()
            w.wait(10)
            if w.stdin is not None and not w.stdin.closed:
                w.stdin.close()


def worker_main() -> int:
    """A worker rank (``python -m coordinator.fleet_procs``, started by
    :meth:`FleetProcs.launch`; the run arrives on stdin as one JSON line): the run's
    synthetic agents of this rank, day by day."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    import torch
    import torch.distributed as dist

    from coordinator.hybrid import HybridSimulation
    from coordinator.runner import RunConfig, physical_agents
    from simulation.models import SIR
    from simulation.population import synthesize

    torch.set_num_threads(1)
    line = sys.stdin.readline()  # the run, from FleetProcs.configure
    if not line.strip():
        print(f"fleet worker rank {rank}: no run given (rank 0 stopped)", file=sys.stderr)
        return 3
    spec = json.loads(line)
    timeout = timedelta(seconds=float(spec["timeout"]))
    store = dist.TCPStore("127.0.0.1", int(spec["port"]), world, is_master=False,
                          timeout=timeout)
    store.set(_READY.format(rank), "1")
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world,
                            timeout=timedelta(seconds=max(timeout.total_seconds(), 1800.0)))
    try:
        # as FederatedRun.run builds it on rank 0 (same population, devices, seed, model)
        cfg = RunConfig.make(**spec["cfg"])
        pop = synthesize(cfg.population, seed=cfg.seed, scale=cfg.scale)
        sim = HybridSimulation(SIR(cfg.beta, cfg.gamma, cfg.initial_infected), pop,
                               physical_agents(pop.n, int(spec["devices"])), cfg.seed,
                               remote=True, tangents=bool(spec["tangents"]),
                               estimator=spec["estimator"], procs_group=True)
        del pop
        replay = None
        if spec["replay"]:  # the full-path calibration's replay, as rank 0 builds it
            from simulation.distributed.replay import PartitionedReplay
            replay = PartitionedReplay(SIR(cfg.beta, cfg.gamma, cfg.initial_infected), sim,
                                       cfg.seed, spec["estimator"], beta_devices=cfg.beta)
        cpu = [time.process_time()]
        for _ in range(cfg.days):  # rank 0 steps days 0..days−1, a checkpoint after each
            sim.step()  # (first serves rank 0's calibration fits of the days before)
            sim.state_bytes()
            cpu.append(time.process_time())
        if replay is not None:  # the fit after the last day, until rank 0 releases
            replay.serve()
        store.set(_CPU.format(rank), json.dumps(cpu))
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(worker_main())

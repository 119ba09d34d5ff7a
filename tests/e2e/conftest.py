"""Shared harness of the real-process deployment tests: a ``flower-superlink``, SuperNodes
each with its own encrypted EdgeStore, ``flwr run`` of this project, and the run's own
SuperNode logs and coordinator store to follow it (no fixed sleeps)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

PASSPHRASE = "device passphrase e2e"  # the devices' EdgeStore passphrase (test only)


class Deployment:
    """Processes of one deployment under ``tmp``: :meth:`superlink`, :meth:`supernodes`,
    :meth:`flwr_run`; every process is stopped by the fixture at the end (a stopped one is
    continued first)."""

    def __init__(self, e2e: SimpleNamespace, tmp: Path, nodes: int, **env: str) -> None:
        self.e2e, self.tmp = e2e, tmp
        self.link, *self.capio = e2e.ports(1 + nodes)
        self.env = e2e.flower_env(tmp, self.link, LPM_EDGE_PASSPHRASE=PASSPHRASE, **env)
        self.db, self.passphrase = tmp / "coord.db", PASSPHRASE
        self.stores = [tmp / f"device{k}.db" for k in range(nodes)]
        self.logs = [tmp / f"node{k}.log" for k in range(nodes)]
        self.procs: list[subprocess.Popen] = []
        self.nodes: list[subprocess.Popen] = []
        self._store: Any = None

    def superlink(self, wait: float = 90.0) -> None:
        """Start the SuperLink and wait until it accepts connections."""
        log = self.tmp / "link.log"
        self.procs.append(self.e2e.spawn(
            [str(self.e2e.bin / "flower-superlink"), "--insecure", "--host", "127.0.0.1",
             "--port", str(self.link), "--disable-runtime-dependency-installation",
             "--database", str(self.tmp / "link.db")], self.env, log))
        deadline = time.time() + wait  # the SuperLink is slow to start on a loaded host
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.link), timeout=1).close()
                return
            except OSError:
                assert time.time() < deadline, log.read_text()[-2000:]
                time.sleep(0.2)

    def supernodes(self, stores: bool = True) -> None:
        """Start the SuperNodes, logs in ``node<k>.log``: node k keeps its EdgeStore at
        ``stores[k]`` (node config ``lpm-store``), or with ``stores=False`` its state in the
        node state (node config ``partition-id=k``)."""
        for k, store in enumerate(self.stores):
            conf = f"lpm-store='{store}'" if stores else f"partition-id={k}"
            self.nodes.append(self.e2e.spawn(
                [str(self.e2e.bin / "flower-supernode"), "--insecure", "--superlink",
                 f"127.0.0.1:{self.link}", "--host", "127.0.0.1", "--port", str(self.capio[k]),
                 "--node-config", conf], self.env, self.logs[k]))
        self.procs += self.nodes

    def flwr_run(self, run_config: str) -> subprocess.Popen:
        """``flwr run . e2e --stream`` with ``db`` set to this deployment's store."""
        log = (self.tmp / "flwr-run.log").open("wb")
        p = subprocess.Popen(
            [str(self.e2e.bin / "flwr"), "run", ".", "e2e", "--stream", "--run-config",
             f"{run_config} db='{self.db}'"], env=self.env, cwd=self.e2e.root, stdout=log,
            stderr=subprocess.STDOUT)
        self.procs.append(p)
        return p

    def run_log(self) -> str:
        return (self.tmp / "flwr-run.log").read_text(errors="replace")[-4000:]

    def node_log(self, k: int) -> str:
        return self.logs[k].read_text(errors="replace") if self.logs[k].exists() else ""

    def replied(self, k: int, group: str) -> bool:
        """Whether SuperNode ``k`` sent its reply to its message of round ``group``: it
        handles one message at a time, so the first ``Sent successfully`` after the round's
        ``Receiving`` is that message's reply."""
        log = self.node_log(k)
        i = log.find(f"ROUND {group}]")
        return i >= 0 and "Sent successfully" in log[i:]

    def received(self, k: int, group: str) -> bool:
        """Whether SuperNode ``k`` got a message of round ``group``."""
        return f"ROUND {group}]" in self.node_log(k)

    def completed_days(self, run_id: str) -> int:
        """Days the coordinator committed (0 before the run exists)."""
        if not self.db.exists():
            return 0
        try:
            return self.store().get_run(run_id).completed_days
        except KeyError:
            return 0

    def store(self) -> Any:
        """The coordinator's store (opened once)."""
        if self._store is None:
            from coordinator.store import CoordinatorStore

            self._store = CoordinatorStore(self.db)
        return self._store

    def signal_node(self, k: int, sig: signal.Signals) -> None:
        """Send ``sig`` to SuperNode ``k``'s process group (its SuperExec and ClientApps)."""
        os.killpg(self.nodes[k].pid, sig)

    def stop(self) -> None:
        for p in self.nodes:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass
        self.e2e.stop(self.procs)


@pytest.fixture()
def deployment(tmp_path, e2e) -> Iterator[object]:
    """``deployment(nodes, **env)`` makes a :class:`Deployment`; all its processes are
    stopped at the end of the test."""
    if not (e2e.bin / "flower-superlink").exists():
        pytest.skip("flower-superlink not installed")
    made: list[Deployment] = []

    def make(nodes: int, **env: str) -> Deployment:
        d = Deployment(e2e, tmp_path, nodes, **env)
        made.append(d)
        return d

    try:
        yield make
    finally:
        for d in made:
            d.stop()

"""Shared helpers of the app tests: a real uvicorn server on a free port of 127.0.0.1, and the
set-up of the federated resume tests (device-host processes with their own stores, a crash
after day k)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import uvicorn

from simulation.distributed.launch import free_port


@pytest.fixture()
def serving():
    """The :func:`serve_app` context manager (a fixture, so test modules need no import)."""
    return serve_app


@contextmanager
def serve_app(app, *, log_level: str = "warning") -> Iterator[tuple[str, int]]:
    """Serve the ASGI ``app`` with uvicorn in a thread for the block; yields (base URL, port)."""
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level=log_level))
    th = threading.Thread(target=srv.run, daemon=True)
    th.start()
    deadline = time.time() + 20
    try:
        while not srv.started:
            assert th.is_alive() and time.time() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}", port
    finally:
        srv.should_exit = True
        th.join(10)


class Crash(Exception):
    """Raised by :func:`crash_at`'s ``on_day`` hook: the runner dies after committing a day."""


def crash_at(k: int) -> Callable[[int, dict], None]:
    """An ``on_day`` hook that raises :class:`Crash` once day ``k`` is committed."""

    def on_day(day: int, row: dict) -> None:
        if day == k:
            raise Crash

    return on_day


@pytest.fixture()
def federated_resume(monkeypatch, tmp_path):
    """Set-up of the federated resume tests: no telemetry, the devices' store passphrase, one
    torch thread; ``transport(tag, devices)`` starts device-host processes whose node n keeps
    its encrypted EdgeStore at ``tmp_path/<tag><n>.db``; ``Crash`` / ``crash_at(k)`` kill the
    runner after day k."""
    import torch

    from coordinator.fleet import ProcessTransport

    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")
    monkeypatch.setenv("LPM_EDGE_PASSPHRASE", "device passphrase 12")
    torch.set_num_threads(1)

    def transport(tag: str, devices: int) -> ProcessTransport:
        return ProcessTransport(devices, node_configs={
            n: {"lpm-store": str(tmp_path / f"{tag}{n}.db")} for n in range(1, devices + 1)})

    return SimpleNamespace(transport=transport, Crash=Crash, crash_at=crash_at)


class SurvivorTotals:
    """``on_day`` of a federated run in the device-host fleet: each day, the SecAgg'd device
    ``I`` beside the sum of that day's survivors' true states (read from the device host).
    Set :attr:`run` to the run before it starts."""

    def __init__(self, transport) -> None:
        self.transport, self.run, self.checks = transport, None, []

    def __call__(self, day: int, row: dict) -> None:
        states = self.transport.device_states()
        alive = self.run.survivors[day]
        assert row["survivors"] == len(alive)
        self.checks.append((row["physical_I"], int(sum(states[n]["I"] for n in alive))))

    def assert_exact(self, days: int) -> None:
        assert len(self.checks) == days and all(a == b for a, b in self.checks), self.checks


@pytest.fixture()
def survivor_totals():
    """The :class:`SurvivorTotals` class (a fixture, so test modules need no import)."""
    return SurvivorTotals


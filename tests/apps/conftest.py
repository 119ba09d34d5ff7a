"""Shared helpers of the app tests: a real uvicorn server on a free port of 127.0.0.1."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

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

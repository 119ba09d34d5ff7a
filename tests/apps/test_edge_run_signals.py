"""`lpm edge run` killed by a signal leaves no flower-supernode (or its flower-superexec)
behind: a real process, a real SuperNode (its SuperLink unreachable, so it keeps retrying)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _flower_procs(port: int) -> list[int]:
    """Pids of the SuperNode serving ``port`` and of its flower-superexec."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        text = [a.decode(errors="replace") for a in args]
        if any(a.endswith("flower-supernode") for a in text) and str(port) in text:
            found.append(int(entry.name))
        elif (any(a.endswith("flower-superexec") for a in text)
              and f"127.0.0.1:{port}" in text):
            found.append(int(entry.name))
    return found


@pytest.mark.parametrize("sig", [signal.SIGTERM,
                                 pytest.param(signal.SIGINT, marks=pytest.mark.slow),
                                 pytest.param(signal.SIGKILL, marks=pytest.mark.slow)])
def test_killed_edge_run_leaves_no_supernode(sig):
    port, dead = _free_port(), _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FLWR_TELEMETRY_ENABLED": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "lpm_cli", "edge", "run", "--insecure",
                             "--superlink", f"127.0.0.1:{dead}", "--port", str(port)],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    seen: set[int] = set()
    try:
        deadline = time.time() + 120  # importing flwr is slow on a loaded host
        while len(seen) < 2:  # the SuperNode and its flower-superexec
            assert proc.poll() is None, "lpm edge run exited by itself"
            assert time.time() < deadline, f"no SuperNode started (found {seen})"
            seen.update(_flower_procs(port))
            time.sleep(0.2)
        proc.send_signal(sig)
        proc.wait(60)
        deadline = time.time() + 30  # flower-superexec polls its parent's pid
        while (alive := _flower_procs(port)) and time.time() < deadline:
            time.sleep(0.2)
        assert not alive, f"left running after {sig.name}: {alive}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        for pid in _flower_procs(port):  # ours only: matched by this test's port
            os.kill(pid, signal.SIGKILL)

"""Shared pytest set-up: quiet telemetry, one torch thread (2-core CI machines), and the
``e2e`` fixture for tests that start real Flower and coordinator processes."""

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _ports(k: int) -> list[int]:
    socks = [socket.socket() for _ in range(k)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _spawn(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen(args, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                            cwd=ROOT, start_new_session=True)


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    for p in procs:
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)


def _flower_env(tmp: Path, link: int, name: str = "e2e", ca: Path | None = None, **extra: str) -> dict[str, str]:
    """A FLWR_HOME under ``tmp`` whose config.toml names the SuperLink on 127.0.0.1:``link``
    (insecure, or TLS with root certificate ``ca``), and the environment for the processes."""
    home = tmp / "flwr-home"
    home.mkdir()
    conn = f'root-certificates = "{ca}"\n' if ca is not None else "insecure = true\n"
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\naddress = "127.0.0.1:{link}"\n{conn}')
    return {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_HOME": str(home), "PYTHONPATH": str(ROOT),
            "PATH": f"{BIN}:{os.environ.get('PATH', '')}", **extra}


@pytest.fixture()
def e2e() -> SimpleNamespace:
    """Free ports, the Flower home and environment, process spawning (own session, log file)
    and group shutdown."""
    return SimpleNamespace(root=ROOT, bin=BIN, ports=_ports, flower_env=_flower_env, spawn=_spawn, stop=_stop)

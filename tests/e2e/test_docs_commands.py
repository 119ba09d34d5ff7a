"""docs/apps.md stays true: the `bash` blocks of its "Deploy on one host" section are
extracted and run as written, in order, in one shell on 127.0.0.1 (SuperLink, three
`lpm edge run` devices, the coordinator, `flwr run --stream`, the outcome check)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess

import pytest

SECTION = "## Deploy on one host (127.0.0.1), step by step"
PORTS = (9292, 9301, 9302, 9303, 8181)


def docs_blocks(text: str) -> list[str]:
    """The ```bash blocks between SECTION and the next level-2 heading."""
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    section = text[start:end if end != -1 else None]
    return re.findall(r"^```bash\n(.*?)^```", section, flags=re.S | re.M)


def test_docs_blocks_found(e2e):
    blocks = docs_blocks((e2e.root / "docs/apps.md").read_text())
    joined = "\n".join(blocks)
    assert len(blocks) >= 6
    for needle in ("--insecure", "--disable-runtime-dependency-installation", "--port \"930$k\"",
                   "flwr run . local --stream", "flwr ls", "kill $(jobs -p)"):
        assert needle in joined, needle


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_docs_apps_commands_run_as_written(tmp_path, e2e):
    for port in PORTS:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                pytest.skip(f"port {port} of the docs is in use on this host")
    blocks = docs_blocks((e2e.root / "docs/apps.md").read_text())
    script = "set -euo pipefail\n" + "\n".join(blocks)
    (tmp_path / "docs.sh").write_text(script)
    env = {**os.environ, "PATH": f"{e2e.bin}:{os.environ.get('PATH', '')}",
           "PYTHONPATH": str(e2e.root), "TMPDIR": str(tmp_path)}
    proc = subprocess.Popen(["bash", str(tmp_path / "docs.sh")], cwd=e2e.root, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=840)
    finally:
        try:  # whatever the blocks left behind (a device's flower-supernode child, …)
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    logs = "".join(f"\n--- {p.name}\n{p.read_text(errors='replace')[-1500:]}"
                   for p in sorted(tmp_path.glob("tmp*/*.log")))
    assert proc.returncode == 0, out[-4000:] + logs
    assert "run docs completed" in out
    assert "day,S,I,R" in out

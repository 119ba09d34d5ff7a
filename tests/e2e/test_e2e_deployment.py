"""Real processes on 127.0.0.1: flower-superlink + 3 flower-supernode + `flwr run`, with the
coordinator HTTP service serving the store the ServerApp writes. Few days (each message
costs seconds: SuperNodes poll every 3 s)."""

from __future__ import annotations

import shutil
import subprocess
import time

import httpx
import pytest


# In the default run on purpose (~65–90 s): the one real deployment-engine check CI makes.
@pytest.mark.timeout(600)
def test_superlink_three_supernodes_flwr_run(tmp_path, e2e):
    ROOT, BIN = e2e.root, e2e.bin
    if shutil.which("flower-superlink", path=str(BIN)) is None:
        pytest.skip("flower-superlink not installed")
    link, http_port, *capio = e2e.ports(5)
    env = e2e.flower_env(tmp_path, link, LPM_COORDINATOR_TOKEN="e2e-token-0123456789abcdef")
    db = tmp_path / "coord.db"
    procs = [e2e.spawn([str(BIN / "flower-superlink"), "--insecure",
                     "--host", "127.0.0.1", "--port", str(link),
                     "--disable-runtime-dependency-installation",  # use this venv, no downloads
                     "--database", str(tmp_path / "link.db")], env, tmp_path / "superlink.log")]
    try:
        time.sleep(3)
        for k in range(3):
            procs.append(e2e.spawn([str(BIN / "flower-supernode"), "--insecure", "--superlink",
                                 f"127.0.0.1:{link}", "--host", "127.0.0.1",
                                 "--port", str(capio[k]), "--node-config", f"partition-id={k}"],
                                env, tmp_path / f"supernode{k}.log"))
        procs.append(e2e.spawn([str(BIN / "lpm"), "coordinator", "--port", str(http_port), "--db",
                             str(db)], env, tmp_path / "coordinator.log"))
        out = subprocess.run(
            [str(BIN / "flwr"), "run", ".", "e2e", "--stream", "--run-config",
             f"num-days=2 devices=3 seed=4 initial-infected=0.05 db='{db}' run-id='e2e' "
             "min-devices=3 shared-seed=true"],
            env=env, cwd=ROOT, capture_output=True, text=True, timeout=480)
        (tmp_path / "flwr-run.log").write_text(out.stdout + out.stderr)
        logs = out.stdout[-3000:] + out.stderr[-3000:]
        assert out.returncode == 0, logs
        url = f"http://127.0.0.1:{http_port}"
        deadline = time.time() + 120
        while True:
            try:
                r = httpx.get(f"{url}/runs/e2e", timeout=5)
                if r.status_code == 200 and r.json()["status"] == "completed":
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, logs
            time.sleep(1)
        series = httpx.get(f"{url}/runs/e2e/series", timeout=5).json()["series"]
        assert [r["day"] for r in series] == [1, 2]
        # equals the centralised run with the same seed and the same 3 physical agents
        import torch

        from simulation.engine import simulate
        from simulation.models import SIR
        from simulation.population import synthesize

        with torch.no_grad():
            ref = simulate(SIR(0.5, 0.1, 0.05), synthesize("tiny", seed=4), 2, 4)
        assert [r["I"] for r in series] == ref["I"][1:].tolist()
        assert [r["new_infections"] for r in series] == ref["new_infections"][1:].tolist()
    finally:
        e2e.stop(procs)

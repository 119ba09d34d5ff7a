"""Real processes on 127.0.0.1: flower-superlink + 3 flower-supernode + `flwr run`, with the
coordinator HTTP service serving the store the ServerApp writes.

One day: every message costs a fresh ClientApp process per SuperNode (~10 s each on the
shared 2-core host: process start, imports, then the SuperNode's 3 s poll), and a day adds
three messages. Day 1 already crosses every deployment seam — enrolment, a neighbourhood
round delivered the next day, a new SecAgg+ key epoch over separate ClientApp processes
(advertise, masked_input, consistency, unmask), the store served over HTTP. Later days of an
epoch over real processes: the slow tests (test_e2e_tls_auth: 2 days equal the centralised
run; test_e2e_dropouts, test_e2e_late_tags); over the same ClientApp in device-host processes:
tests/apps (default run)."""

from __future__ import annotations

import time

import httpx


# In the default run on purpose: the one real deployment-engine check CI makes.
def test_superlink_three_supernodes_flwr_run(deployment, e2e):
    # the SuperExecs ask their SuperNode for a ClientApp task every 0.1 s (Flower: 1 s)
    dep = deployment(3, LPM_COORDINATOR_TOKEN="e2e-token-0123456789abcdef",
                     FLWR_SUPEREXEC_TASK_POLL_INTERVAL="0.1")
    (http_port,) = e2e.ports(1)
    dep.superlink()
    dep.supernodes(stores=False)
    dep.procs.append(e2e.spawn([str(e2e.bin / "lpm"), "coordinator", "--port", str(http_port),
                                "--db", str(dep.db)], dep.env, dep.tmp / "coordinator.log"))
    run = dep.flwr_run("num-days=1 devices=3 seed=4 initial-infected=0.05 run-id='e2e' "
                       "min-devices=3 shared-seed=true")
    assert run.wait(480) == 0, dep.run_log()
    url = f"http://127.0.0.1:{http_port}"
    deadline = time.time() + 120
    while True:
        try:
            r = httpx.get(f"{url}/runs/e2e", timeout=5)
            if r.status_code == 200 and r.json()["status"] == "completed":
                break
        except httpx.HTTPError:
            pass
        assert time.time() < deadline, dep.run_log()
        time.sleep(0.5)
    series = httpx.get(f"{url}/runs/e2e/series", timeout=5).json()["series"]
    assert [r["day"] for r in series] == [1]
    # equals the centralised run with the same seed and the same 3 physical agents
    import torch

    from simulation.engine import simulate
    from simulation.models import SIR
    from simulation.population import synthesize

    with torch.no_grad():
        ref = simulate(SIR(0.5, 0.1, 0.05), synthesize("tiny", seed=4), 1, 4)
    assert [r["I"] for r in series] == ref["I"][1:].tolist()
    assert [r["new_infections"] for r in series] == ref["new_infections"][1:].tolist()

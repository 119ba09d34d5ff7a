"""Real processes: flower-superlink + 6 flower-supernode devices (each with its encrypted
EdgeStore) + `flwr run`; two SuperNodes are killed with SIGKILL at different days and stages.
(6, not 5: SecAgg+ on a complete graph of 5 has threshold 3, so two dead devices would leave
each survivor 2 live neighbours and the day's aggregation would rightly abort.)
The run completes over the survivors, and the coordinator's device totals of the last day
equal the sum of the survivors' own states read from their stores."""

from __future__ import annotations

import signal
import time

import pytest


@pytest.mark.slow  # ~3-5 min: SuperNodes poll every 3 s and a dead node costs a timeout
@pytest.mark.timeout(1800)
def test_kill_two_supernodes_run_completes_over_survivors(deployment):
    from coordinator.store import CoordinatorStore
    from edge_agent.store import EdgeStore

    dep = deployment(6)
    dep.superlink()
    dep.supernodes()
    run = dep.flwr_run("num-days=4 devices=6 min-devices=4 seed=2 initial-infected=0.3 "
                       "run-id='drop' exchange-timeout=240")
    deadline = time.time() + 1500
    killed: list[int] = []
    while run.poll() is None and time.time() < deadline:
        done = dep.completed_days("drop")
        if done >= 1 and not killed:  # during day 2's first exchange
            dep.signal_node(1, signal.SIGKILL)
            killed.append(1)
        if done >= 2 and len(killed) == 1:  # a few seconds into day 3 (a later stage)
            time.sleep(7)
            dep.signal_node(3, signal.SIGKILL)
            killed.append(3)
        time.sleep(0.5)
    log = dep.run_log()
    assert run.wait(60) == 0, log
    store = CoordinatorStore(dep.db)
    assert store.get_run("drop").status == "completed", log
    series = store.series("drop")
    assert [r["day"] for r in series] == [1, 2, 3, 4]
    assert series[0]["survivors"] == 6 and series[-1]["survivors"] == 4, \
        [r["survivors"] for r in series]
    last = series[-1]
    report_day = last["day"] - 1
    alive = [dep.stores[k] for k in range(6) if k not in killed]
    states = []
    for path in alive:
        with EdgeStore(path, dep.passphrase) as st:
            states.append(st.status(f"day/drop/{report_day}"))
    assert all(s is not None for s in states)
    assert last["physical_I"] == round(sum(s["I"] for s in states))
    assert last["physical_new_infections"] <= len(alive)
    for k in killed:  # the dead devices stopped before the last day
        with EdgeStore(dep.stores[k], dep.passphrase) as st:
            assert st.status(f"day/drop/{report_day}") is None

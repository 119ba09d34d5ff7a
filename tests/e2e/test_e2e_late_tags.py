"""Real processes: flower-superlink + 5 flower-supernode devices (each with its encrypted
EdgeStore) + `flwr run`; two devices are frozen (SIGSTOP of the SuperNode's process group)
past a SecAgg+ stage deadline of the daily reports and continued (SIGCONT) afterwards.

- Device A stops right after its day-1 reply (the key advertisement of report day 0): it
  misses ``masked_input``, so it is out of day 0's sum (dropped before input). It is
  continued once the others are past that stage; on day 2 it catches up (a new key epoch,
  since A never masked in the first one) and is counted again.
- Device B stops right after it sent its masked input of report day 1: its consistency
  tags miss the deadline. All its SecAgg+ neighbours are in the day's survivor set (5
  devices: the complete graph), so its input stays in the sum exactly — its self mask is
  rebuilt from the others' shares. It is continued once the others are unmasking; on day
  3 it abandons its unfinished day and masks day 2 in the same epoch.

No day fails, and each committed day's device totals equal the sum of that day's
survivors' own states, read from their stores. When to stop and continue a process is read
from the SuperNodes' logs (a SuperNode handles one message at a time), not from sleeps:
whatever the timing and the random key material, a frozen process cannot answer the stage
that follows (its ClientApp is a fresh process per message)."""

from __future__ import annotations

import signal
import time

import pytest

A, B = 1, 3  # the late devices (SuperNode index)
NODES, RUN = 5, "late"


@pytest.mark.slow  # ~5 min: two 60 s stage deadlines pass with a device frozen
@pytest.mark.timeout(1800)
def test_device_late_past_a_stage_deadline_does_not_fail_the_day(deployment):
    from coordinator.store import CoordinatorStore
    from edge_agent.store import EdgeStore

    dep = deployment(NODES, FLWR_SUPEREXEC_TASK_POLL_INTERVAL="0.1")
    dep.superlink()
    dep.supernodes()
    # exchange-timeout: the stage deadline, long for live devices on a loaded 2-core host
    # (a stage with a frozen device waits all of it; a SuperLink that finds the node's
    # heartbeats stopped may close it earlier: either way the device is out of that stage)
    run = dep.flwr_run(f"num-days=3 devices={NODES} min-devices=4 seed=5 "
                       f"initial-infected=0.5 run-id='{RUN}' exchange-timeout=60")
    # (node, stop when its log shows this round's reply sent, continue when another
    # node's log shows this round: the stage it was late for is closed)
    plan = [(A, "day1", f"{RUN}/0/consistency"), (B, f"{RUN}/1/masked_input", f"{RUN}/1/unmask")]
    stopped: list[int] = []
    resumed: list[int] = []
    deadline = time.time() + 1500
    while run.poll() is None and time.time() < deadline:
        for node, after, until in plan:
            if node not in stopped and dep.replied(node, after):
                dep.signal_node(node, signal.SIGSTOP)
                stopped.append(node)
            elif node in stopped and node not in resumed and any(
                    dep.received(k, until) for k in range(NODES) if k != node):
                dep.signal_node(node, signal.SIGCONT)
                resumed.append(node)
        time.sleep(0.1)
    assert run.wait(60) == 0, dep.run_log()
    assert stopped == [A, B] and resumed == [A, B], (stopped, resumed, dep.run_log())
    # the coordinator's own account: each was out of exactly the stage it was late for
    outs = [ln for ln in (dep.tmp / "flwr-run.log").read_text(errors="replace").splitlines()
            if " out: " in ln]
    assert len(outs) == 2 and "day 1 masked_input: node" in outs[0] \
        and "day 2 consistency: node" in outs[1], outs
    store = CoordinatorStore(dep.db)
    assert store.get_run(RUN).status == "completed", dep.run_log()
    series = store.series(RUN)
    assert [r["day"] for r in series] == [1, 2, 3]
    # row d sums the devices' states at the end of day d − 1
    out = {1: {A}, 2: set(), 3: set()}  # A missed day 0's masked input; B stayed in day 1
    for row in series:
        day = row["day"]
        survivors = [k for k in range(NODES) if k not in out[day]]
        states = []
        for k in survivors:
            with EdgeStore(dep.stores[k], dep.passphrase) as st:
                states.append(st.status(f"day/{RUN}/{day - 1}"))
        assert all(s is not None for s in states), day
        assert row["survivors"] == len(survivors), (day, row["survivors"])
        assert row["physical_I"] == round(sum(s["I"] for s in states)), day
    with EdgeStore(dep.stores[A], dep.passphrase) as st:  # A's own day 0 exists, it just was not counted
        assert st.status(f"day/{RUN}/0") is not None

"""A coordinator process killed with SIGKILL mid-run resumes from the last completed round."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import torch

from coordinator.runner import RunConfig, build_simulation, execute_run
from coordinator.store import CoordinatorStore

_CHILD = """
import sys, time
from coordinator.runner import execute_run
from coordinator.store import CoordinatorStore
store = CoordinatorStore(sys.argv[1])
execute_run(store, sys.argv[2], on_day=lambda d, a: time.sleep(float(sys.argv[3])))
"""


def _start(db, rid, delay):
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    return subprocess.Popen([sys.executable, "-c", _CHILD, str(db), rid, str(delay)], env=env)


def test_sigkill_then_resume(tmp_path):
    db = tmp_path / "c.db"
    cfg = RunConfig(population="tiny", days=12, seed=5, devices=30, initial_infected=0.05)
    store = CoordinatorStore(db)
    rid = store.create_run(cfg.to_dict(), cfg.days)
    proc = _start(db, rid, 0.4)
    deadline = time.time() + 90
    while store.get_run(rid).completed_days < 3:
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    done = store.get_run(rid).completed_days
    assert 3 <= done < cfg.days and store.get_run(rid).status == "running"
    assert store.resume(rid).day == done
    proc = _start(db, rid, 0.0)
    assert proc.wait(120) == 0
    rec = store.get_run(rid)
    assert rec.status == "completed" and rec.completed_days == cfg.days
    series = store.series(rid)
    assert [r["day"] for r in series] == list(range(1, cfg.days + 1))
    # nothing lost, nothing doubled: equals an uninterrupted run
    torch.set_num_threads(1)
    sim = build_simulation(cfg)
    ref = [sim.step() for _ in range(cfg.days)]
    assert [r["I"] for r in series] == [r["I"] for r in ref]
    assert [r["new_infections"] for r in series] == [r["new_infections"] for r in ref]


def test_central_runner_never_takes_a_federated_or_leased_run(tmp_path):
    import pytest

    from coordinator.runner import RunOwnershipError
    from coordinator.store import LeaseHeldError

    store = CoordinatorStore(tmp_path / "c.db")
    cfg = RunConfig(population="tiny", days=2, seed=1, devices=10)
    fed = store.create_run({**cfg.to_dict(), "federated": True}, cfg.days)
    with pytest.raises(RunOwnershipError):
        execute_run(store, fed)
    rid = store.create_run(cfg.to_dict(), cfg.days)
    store.acquire_lease(rid, "serverapp:elsewhere:1:x", "serverapp", 60.0)
    with pytest.raises(LeaseHeldError, match="owned by serverapp"):
        execute_run(store, rid)
    assert store.get_run(rid).status == "pending" and store.series(rid) == []
    store.release_lease(rid, "serverapp:elsewhere:1:x")
    execute_run(store, rid)  # free again: runs, and gives its lease back
    assert store.get_run(rid).status == "completed" and store.lease(rid) is None

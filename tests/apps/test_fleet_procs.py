"""`lpm fleet --procs P` (coordinator/fleet_procs.py): the fleet's synthetic population
partitioned over P local processes (gloo on 127.0.0.1). Real processes throughout: the
device hosts, the worker ranks, `lpm` itself.

* ``--procs 2`` writes the summary (days, survivors, θ, loss, the daily series) and stores
  the rows of one process bit for bit, on a population METIS cuts (Oxford-like, 3,000
  agents) with online calibration (through the Python API, 10 devices × 3 days, and the
  last checkpoint too; `lpm fleet --devices 50 --days 5 --procs 2` against `--procs 1` is
  ``-m slow``);
* a worker killed mid-run: rank 0 fails with an error naming the rank and the signal, at
  once (no wait for a collective's timeout), leaves the group and no process behind;
* a worker that dies before the rendezvous is named too;
* ``--tangents`` runs partitioned (counts and ∂new/∂β equal), with ``--calibrate`` too (the
  full-path replay over the ranks: θ equal);
* dropouts over two device hosts: rows equal (slow);
* ``--procs 0`` and workers configured for another run are refused before anything starts.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from coordinator.calibration import unpack_checkpoint
from coordinator.fleet import FleetError, run_fleet
from coordinator.fleet_procs import FleetProcs, FleetProcsError
from coordinator.flower.server_app import FederatedSettings
from coordinator.runner import RunConfig
from coordinator.store import CoordinatorStore

ROOT = Path(__file__).resolve().parents[2]
LPM = [sys.executable, "-c", "from lpm_cli import app; app()"]
COMMON = ["--population", "oxford", "--scale", "0.02", "--seed", "3", "--beta", "0.9",
          "--initial-infected", "0.05", "--shared-seed", "--calibrate", "beta"]
ARGS = ["fleet", "--devices", "50", "--days", "5", *COMMON]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "FLWR_TELEMETRY_ENABLED": "0",
            "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH"))
                                          if p)}


def _lpm(args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([*LPM, *args], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=timeout)


def _stored(db: Path, run_id: str) -> list[dict]:
    return CoordinatorStore(db).series(run_id)


def _cli_run(tmp_path: Path, procs: int, args: list[str]) -> dict:
    d = tmp_path / f"p{procs}"
    d.mkdir()
    res = _lpm([*args, "--procs", str(procs), "--db", str(d / "c.db"), "--out", str(d / "out")])
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((d / "out" / "summary.json").read_text())
    summary["rows"] = _stored(d / "c.db", summary["run_id"])
    return summary


def _api_run(tmp_path: Path, procs: int, workers: FleetProcs | None = None) -> dict:
    """A calibrated run through the Python API the CLI calls (this process is rank 0)."""
    from coordinator.calibration import CalibrationSettings
    from coordinator.fleet import write_summary

    torch.set_num_threads(1)
    cfg = RunConfig(population="oxford", scale=0.02, days=3, seed=3, devices=10, beta=0.9,
                    initial_infected=0.05)
    store = CoordinatorStore(tmp_path / f"api{procs}.db")
    rid = store.create_run({**cfg.to_dict(), "federated": True}, cfg.days)
    settings = FederatedSettings(shared_seed=True, calibration=CalibrationSettings(
        params=("beta",), beta_init=0.3, every=1, steps=1))
    if workers is not None:  # launched early (as `lpm fleet` does): configure them now
        workers.configure(cfg.to_dict(), devices=cfg.devices)
    rows = run_fleet(cfg, settings=settings, store=store, run_id=rid, procs=workers or procs)
    summary = json.loads(write_summary(tmp_path / f"api{procs}", rows, []).read_text())
    summary["rows"] = store.series(rid)
    point = store.resume(rid)  # the last day's checkpoint (state_bytes: a collective on 2)
    blob, arrays = unpack_checkpoint(point.state)
    with np.load(io.BytesIO(blob)) as z:
        summary["checkpoint"] = (point.day, {k: z[k].tolist() for k in z.files},
                                 {k: v.tolist() for k, v in (arrays or {}).items()})
    return summary


def _assert_same(one: dict, two: dict, days: int) -> None:
    assert one["days_completed"] == two["days_completed"] == days
    for key in ("survivors", "theta", "loss", "new_infections"):
        assert one[key] == two[key], key  # bit for bit: the same floats in the JSON
    assert len(one["theta"]["beta"]) == days and one["theta"]["beta"][-1] != 0.3  # calibrated
    for a, b in zip(one["rows"], two["rows"], strict=True):  # every stored aggregate
        assert a == b


def test_procs_2_writes_the_summary_of_one_process(tmp_path):
    """``run_fleet(procs=2)`` against ``procs=1``: summary and stored rows (this process is
    rank 0 of both, which saves two start-ups of `lpm`; the CLI is the slow test below)."""
    workers = FleetProcs.launch(2)  # importing while the 1-process run runs
    try:
        one = _api_run(tmp_path, 1)
    except BaseException:
        workers.close()
        raise
    two = _api_run(tmp_path, 2, workers)
    _assert_same(one, two, 3)
    assert one["checkpoint"] == two["checkpoint"]  # state (all agents) and calibration
    assert one["checkpoint"][0] == 3
    assert not dist.is_initialized()  # rank 0 left the group


@pytest.mark.slow
def test_procs_2_writes_the_summary_of_procs_1(tmp_path):
    """`lpm fleet --devices 50 --days 5 --procs 2` = `--procs 1`, both through the CLI (two
    full start-ups: 25–29 s at load 3–4)."""
    one, two = _cli_run(tmp_path, 1, ARGS), _cli_run(tmp_path, 2, ARGS)
    _assert_same(one, two, 5)
    assert two["procs"] == 2 and set(two["worker_cpu_seconds_per_day"]) == {"1"}
    assert len(two["worker_cpu_seconds_per_day"]["1"]) == 5


def test_a_killed_worker_is_named_at_once(tmp_path):
    torch.set_num_threads(1)
    cfg = RunConfig(population="oxford", scale=0.02, days=6, seed=3, devices=50,
                    initial_infected=0.05, beta=0.9)
    workers = FleetProcs.start(2, cfg.to_dict(), devices=cfg.devices)
    killed: dict[str, float] = {}

    def on_day(day: int, row: dict) -> None:
        if day == 2:
            os.kill(workers.pids()[1], signal.SIGKILL)
            killed["at"] = time.monotonic()

    with pytest.raises(FleetProcsError, match=r"worker rank 1 \(pid \d+\) was killed by "
                                              r"SIGKILL \(the run stopped at day 2"):
        run_fleet(cfg, settings=FederatedSettings(shared_seed=True), procs=workers,
                  on_day=on_day)
    # named at the next collective (gloo sees the closed connection), not after the
    # stepper's 60 s barrier timeout or the group's 30 min one
    assert time.monotonic() - killed["at"] < 45
    assert not dist.is_initialized()
    assert all(w.poll() is not None for w in workers.workers)


def test_a_worker_dead_before_the_rendezvous_is_named():
    cfg = RunConfig(population="tiny", days=2, devices=20)
    workers = FleetProcs.start(3, cfg.to_dict(), devices=cfg.devices)
    try:
        os.kill(workers.pids()[2], signal.SIGKILL)
        with pytest.raises(FleetProcsError, match=r"worker rank 2 .* killed by SIGKILL before "
                                                  r"joining"):
            workers.join()
        assert not dist.is_initialized()
    finally:
        workers.close()
    assert all(w.poll() is not None for w in workers.workers)


def test_bad_procs_and_mismatched_workers_are_refused_at_start():
    """Every fleet option runs partitioned, so what is refused is a process count below 1
    and workers configured for another run than rank 0's (they would build another
    population or step another model), before the device hosts start."""
    cfg = RunConfig(population="tiny", days=2, devices=20)
    with pytest.raises(FleetError, match="at least 1"):
        run_fleet(cfg, procs=0)
    workers = FleetProcs.start(2, cfg.to_dict(), devices=cfg.devices, tangents=True)
    t0 = time.monotonic()
    with pytest.raises(FleetError, match="configured for another run"):  # rank 0: no tangents
        run_fleet(cfg, procs=workers)
    assert time.monotonic() - t0 < 15  # no device host was started
    assert all(w.poll() is not None for w in workers.workers)


@pytest.mark.slow
def test_procs_2_with_tangents_equals_one_process():
    """Exact decentralised gradients (--tangents, no calibration) partitioned: the tangent
    column travels beside I (simulation/distributed/hybrid_stepper.py); counts equal bit for
    bit, ∂new/∂β up to float64 summation order (measured: equal bit for bit too). Slow:
    26–36 s at load 5–6 (two runs with tangents, one of them starting a worker)."""
    torch.set_num_threads(1)
    cfg = RunConfig(population="oxford", scale=0.02, days=2, seed=3, devices=10, beta=0.9,
                    initial_infected=0.05)
    settings = FederatedSettings(shared_seed=True, tangents=True)
    one, two = (run_fleet(cfg, settings=settings, procs=p) for p in (1, 2))
    assert len(one) == len(two) == 2
    for a, b in zip(one, two, strict=True):
        assert set(a) == set(b)
        for k in a:
            if "dbeta" in k:
                assert b[k] == pytest.approx(a[k], rel=1e-9, abs=1e-9), k
            else:
                assert b[k] == a[k], k
        assert a["d_new_dbeta"] != 0.0


@pytest.mark.slow
def test_procs_2_full_path_calibration_equals_one_process(tmp_path):
    """--tangents --calibrate: the full-path calibration's replay runs over the ranks
    (simulation.distributed.replay.PartitionedReplay; the workers serve rank 0's fits at
    the start of each day and once after the last); θ and the loss equal one process's."""
    from coordinator.calibration import CalibrationSettings

    torch.set_num_threads(1)
    cfg = RunConfig(population="oxford", scale=0.02, days=3, seed=3, devices=10, beta=0.9,
                    initial_infected=0.05)
    settings = FederatedSettings(shared_seed=True, tangents=True, calibration=CalibrationSettings(
        params=("beta",), beta_init=0.3, every=1, steps=3))
    one, two = (run_fleet(cfg, settings=settings, procs=p) for p in (1, 2))
    assert [r["theta_beta"] for r in one][-1] != 0.3
    for a, b in zip(one, two, strict=True):
        for c in ("S", "I", "R", "new_infections", "survivors"):
            assert a[c] == b[c], c
        for k in ("theta_beta", "loss", "d_new_dbeta"):
            assert b[k] == pytest.approx(a[k], rel=1e-9), k
    assert not dist.is_initialized()


@pytest.mark.slow
def test_procs_2_with_dropouts_and_two_device_hosts_equals_one_process():
    """Dropouts and several device hosts touch only rank 0's side: rows equal bit for bit."""
    torch.set_num_threads(1)
    cfg = RunConfig(population="oxford", scale=0.02, days=4, seed=3, devices=30, beta=0.9,
                    initial_infected=0.05)
    settings = FederatedSettings(shared_seed=True, min_devices=10)
    one, two = (run_fleet(cfg, settings=settings, procs=p, drop_fraction=0.2, drop_seed=1,
                          hosts=2) for p in (1, 2))
    assert one == two
    assert min(r["survivors"] for r in one) < 30  # devices did drop out

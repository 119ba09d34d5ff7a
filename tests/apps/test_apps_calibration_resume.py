"""A calibrating federated run that dies resumes with its whole calibration history: θ after
the restart equals θ of the same run without a restart (shared-seed mode, device stores)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from coordinator.calibration import (
    CalibrationError,
    CalibrationSettings,
    OnlineCalibrator,
    pack_checkpoint,
    unpack_checkpoint,
)
from coordinator.flower.server_app import FederatedRun, FederatedRunError, FederatedSettings
from coordinator.runner import RunConfig
from coordinator.store import CoordinatorStore

CFG = RunConfig(population="tiny", days=5, seed=3, devices=10, initial_infected=0.1, beta=0.7)
CAL = CalibrationSettings(beta_init=0.3, every=1, steps=3)
SETTINGS = FederatedSettings(min_devices=10, shared_seed=True, calibration=CAL)


@pytest.mark.slow  # ~16 s; resume after SIGKILL stays in the default run (test_apps_resume)
def test_resumed_calibration_keeps_its_history(tmp_path, federated_resume):
    kit = federated_resume
    ref_t = kit.transport("ref", CFG.devices)
    try:
        ref = FederatedRun(ref_t, CFG, settings=SETTINGS).run()
    finally:
        ref_t.close()

    store = CoordinatorStore(tmp_path / "c.db")
    rid = store.create_run({**CFG.to_dict(), "federated": True}, CFG.days, run_id="cal-resume")
    t = kit.transport("d", CFG.devices)
    crash = kit.crash_at(3)

    try:
        with pytest.raises(kit.Crash):
            FederatedRun(t, CFG, settings=SETTINGS, store=store, run_id=rid, on_day=crash).run()
        resumed = FederatedRun(t, CFG, settings=SETTINGS, store=store, run_id=rid,
                               resume=True)
        rows = resumed.run()
    finally:
        t.close()
    assert len(rows) == 2 and [r["day"] for r in store.series(rid)] == [1, 2, 3, 4, 5]
    assert len(resumed.calibrator.days) == CFG.days  # days 1-3 came back from the checkpoint
    series = store.series(rid)
    for got, want in zip(series, ref, strict=True):
        assert got["new_infections"] == want["new_infections"]
        assert got["theta_beta"] == pytest.approx(want["theta_beta"], rel=1e-9, abs=0)
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-9, abs=0)

    # a checkpoint written without calibration cannot silently restart the calibrator
    plain = FederatedSettings(min_devices=10, shared_seed=True)
    rid2 = store.create_run({**CFG.to_dict(), "federated": True}, CFG.days, run_id="plain")
    t2 = kit.transport("p", CFG.devices)
    try:
        with pytest.raises(kit.Crash):
            FederatedRun(t2, CFG, settings=plain, store=store, run_id=rid2, on_day=crash).run()
        with pytest.raises(FederatedRunError, match="without calibration"):
            FederatedRun(t2, CFG, settings=SETTINGS, store=store, run_id=rid2, resume=True).run()
    finally:
        t2.close()


def test_checkpoint_round_trip_and_bad_records():
    cal = OnlineCalibrator(CAL)
    rng = np.random.default_rng(0)
    for day in range(4):
        hazard = torch.from_numpy(rng.random(50) * (3.0 if day == 2 else 0.5))  # day 2 keeps h_i
        cal.add_day(day, hazard, 1.5 + day, 2.0, 0.3, 4.0 + day)
        cal.update(day)
    sim_blob = b"simulation state bytes"
    sim, arrays = unpack_checkpoint(pack_checkpoint(sim_blob, cal))
    assert sim == sim_blob and arrays is not None
    back = OnlineCalibrator(CAL)
    back.restore_state(arrays)
    assert back.theta == cal.theta and back.loss() == cal.loss()
    assert [d.hazard.numel() for d in back.days] == [0, 0, 50, 0]
    assert unpack_checkpoint(sim_blob) == (sim_blob, None)  # a run without calibration
    with pytest.raises(CalibrationError, match="outside"):
        OnlineCalibrator(CAL).restore_state({**arrays, "cal_theta": np.array([99.0])})
    with pytest.raises(CalibrationError, match="inconsistent"):
        OnlineCalibrator(CAL).restore_state({**arrays, "cal_hazard_len": np.array([1, 2])})
    with pytest.raises(CalibrationError, match="unreadable"):
        unpack_checkpoint(pack_checkpoint(sim_blob, cal)[:40])

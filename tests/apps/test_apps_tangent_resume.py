"""A tangent run (exact decentralised gradients, full-path calibration) that dies after day k
resumes from its last committed day in the real SQLite store and equals the same run without
a restart: θ trajectory, loss, counts and the full-path ∂new/∂β (shared-seed mode, devices
with their own encrypted stores)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from coordinator.calibration import CalibrationError, CalibrationSettings, unpack_checkpoint
from coordinator.flower.server_app import FederatedRun, FederatedRunError, FederatedSettings
from coordinator.runner import RunConfig
from coordinator.store import CoordinatorStore

CFG = RunConfig(population="tiny", days=5, seed=3, devices=10, initial_infected=0.1, beta=0.7)
CAL = CalibrationSettings(beta_init=0.3, every=1, steps=3)
SETTINGS = FederatedSettings(min_devices=10, shared_seed=True, calibration=CAL, tangents=True)


_KEYS = ("S", "I", "R", "new_infections", "physical_I", "physical_new_infections",
         "d_new_dbeta", "d_new_dbeta_physical", "theta_beta", "loss", "grad_synthetic",
         "grad_devices")


@pytest.mark.slow  # two 5-day tangent runs of 10 device processes: 99 s at load 9
def test_tangent_run_resumes_equal_to_the_uninterrupted_run(tmp_path, federated_resume):
    kit = federated_resume
    ref_t = kit.transport("ref", CFG.devices)
    try:
        ref = FederatedRun(ref_t, CFG, settings=SETTINGS).run()
    finally:
        ref_t.close()
    assert all("d_new_dbeta" in r and "theta_beta" in r for r in ref)

    store = CoordinatorStore(tmp_path / "c.db")
    rid = store.create_run({**CFG.to_dict(), "federated": True}, CFG.days, run_id="tan-resume")
    t = kit.transport("d", CFG.devices)
    try:
        with pytest.raises(kit.Crash):
            FederatedRun(t, CFG, settings=SETTINGS, store=store, run_id=rid,
                         on_day=kit.crash_at(2)).run()
        assert store.resume(rid).day == 2
        _, arrays = unpack_checkpoint(store.resume(rid).state)
        assert arrays is not None and "tangent_I" in arrays and len(arrays["cal_path_days"]) == 2
        resumed = FederatedRun(t, CFG, settings=SETTINGS, store=store, run_id=rid, resume=True)
        rows = resumed.run()
    finally:
        t.close()
    assert len(rows) == CFG.days - 2
    series = store.series(rid)
    assert [r["day"] for r in series] == [1, 2, 3, 4, 5]
    for got, want in zip(series, ref, strict=True):
        for k in _KEYS:
            assert got[k] == pytest.approx(want[k], rel=1e-9, abs=1e-12), (got["day"], k)


def test_tangent_resume_refuses_a_checkpoint_without_tangents(tmp_path, federated_resume):
    """A checkpoint written by a run without tangents (or before they were kept) cannot
    silently restart the synthetic tangents at zero."""
    kit = federated_resume
    plain = FederatedSettings(min_devices=10, shared_seed=True, calibration=CAL)
    store = CoordinatorStore(tmp_path / "c.db")
    rid = store.create_run({**CFG.to_dict(), "federated": True}, CFG.days, run_id="plain")
    t = kit.transport("p", CFG.devices)
    try:
        with pytest.raises(kit.Crash):
            FederatedRun(t, CFG, settings=plain, store=store, run_id=rid,
                         on_day=kit.crash_at(1)).run()
        with pytest.raises(FederatedRunError, match="tangents"):
            FederatedRun(t, CFG, settings=SETTINGS, store=store, run_id=rid, resume=True).run()
    finally:
        t.close()


def test_full_path_checkpoint_terms_are_checked() -> None:
    from coordinator.calibration import OnlineCalibrator, pack_checkpoint
    from coordinator.calibration_path import SyntheticReplay
    from coordinator.hybrid import HybridSimulation
    from coordinator.runner import physical_agents
    from simulation.models import SIR
    from simulation.population import synthesize

    pop = synthesize("tiny", seed=1)
    sim = HybridSimulation(SIR(0.5, 0.1, 0.1), pop, physical_agents(pop.n, 10), 1,
                           remote=True, tangents=True)

    def calibrator() -> OnlineCalibrator:
        cal = OnlineCalibrator(CAL)
        cal.replay = SyntheticReplay(SIR(0.5, 0.1, 0.1), sim.split, sim.state, 1,
                                     "straight_through", beta_devices=0.5)
        return cal

    cal = calibrator()
    rows = cal.replay.rows.numel()  # type: ignore[union-attr]
    rng = np.random.default_rng(0)
    for day in range(3):
        cal.replay.record(day, torch.from_numpy(rng.random(pop.n)),  # type: ignore[union-attr]
                          torch.from_numpy(rng.random(pop.n)))
        cal.add_path_day(day, 2.0 + day, 0.5, 3.0 + day)
        cal.update(day)
    _, arrays = unpack_checkpoint(pack_checkpoint(b"sim", cal))
    assert arrays is not None and arrays["cal_replay_sums"].shape == (3, rows)
    back = calibrator()
    back.restore_state(arrays)
    assert back.path_days == cal.path_days and back.theta == cal.theta
    assert back.loss() == cal.loss()
    with pytest.raises(CalibrationError, match="rows"):
        calibrator().restore_state({**arrays, "cal_replay_sums": np.zeros((3, rows + 1))})
    without = {k: v for k, v in arrays.items() if not k.startswith("cal_replay")}
    with pytest.raises(CalibrationError, match="full-path"):
        calibrator().restore_state(without)

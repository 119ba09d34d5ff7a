"""Online calibration with exact decentralised gradients (run config ``tangents``): θ is
fitted with the full-path model (coordinator.calibration_path) in the simulated fleet (real
ClientApps in a device-host process), and its per-day ∂count/∂β is the central run's."""

from __future__ import annotations

import pytest
import torch

from coordinator.calibration import CalibrationSettings
from coordinator.fleet import ProcessTransport
from coordinator.flower.server_app import FederatedRun, FederatedSettings
from coordinator.runner import RunConfig
from simulation.engine import simulate
from simulation.models import SIR
from simulation.population import synthesize

CFG = RunConfig(population="tiny", days=6, seed=2, devices=20, initial_infected=0.05, beta=0.6)


@pytest.fixture(autouse=True)
def _threads(monkeypatch):
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")
    torch.set_num_threads(1)


def _central_new(beta: float) -> torch.Tensor:
    """Daily new infections of the central run (every agent, the public seed)."""
    pop = synthesize(CFG.population, seed=CFG.seed, scale=CFG.scale)
    with torch.no_grad():
        traj = simulate(SIR(beta, CFG.gamma, CFG.initial_infected), pop, CFG.days, CFG.seed,
                        estimator="expected")
    return traj["new_infections"][1:].double()


def test_full_path_calibration_recovers_beta_with_the_exact_gradient():
    cal = CalibrationSettings(beta_init=0.3, every=2, steps=5)
    settings = FederatedSettings(calibration=cal, tangents=True, estimator="expected",
                                 shared_seed=True)  # shared seed: the central run is the check
    t = ProcessTransport(CFG.devices)
    held: list[float] = []

    def check(day: int, row: dict) -> None:  # the coordinator's state, every day
        sim, replay = run.sim, run.calibrator.replay
        phys = sim.split.physical
        held.append(sum(float(v[phys].abs().sum()) for v in (*sim.state.values(),
                                                              *sim.tangent.values(),
                                                              *replay.initial.values())))

    run = FederatedRun(t, CFG, settings=settings, on_day=check)
    try:
        rows = run.run()
    finally:
        t.close()
    # the coordinator process never held a physical agent's state (nor its tangent)
    assert held == [0.0] * CFG.days
    assert not run.sim.physical_initial_state
    betas = [r["theta_beta"] for r in rows]
    assert betas[0] == 0.3 and abs(betas[-1] - CFG.beta) / CFG.beta < 0.02, betas
    assert rows[-1]["loss"] < 1e-3 < rows[0]["loss"]

    # the model's counts and ∂count/∂β at the run's β are the central run's (finite
    # differences of the same seed, every agent simulated centrally)
    cal_ = run.calibrator
    pred, _, j_syn, j_dev = cal_._path_terms([CFG.beta])
    central = _central_new(CFG.beta)[: len(pred)]
    eps = 5e-3
    fd = ((_central_new(CFG.beta + eps) - _central_new(CFG.beta - eps)) / (2 * eps))[: len(pred)]
    assert torch.allclose(pred, central, rtol=1e-5, atol=1e-3)
    full = (j_syn + j_dev)[:, 0]
    assert torch.allclose(full, fd, rtol=1e-3, atol=1e-2), (full, fd)
    # ... which needs the devices' tangents (their count's and their contacts' sums)
    from_devices = (full - j_syn[:, 0]).abs() / fd.abs()
    assert float(from_devices.max()) > 1e-2, from_devices
    # ... and is not Eq. 11's one-step derivative (neighbours held fixed)
    one_step = torch.tensor([r["one_step_dbeta"] + r["physical_dp_dbeta"] for r in rows[:-1]],
                            dtype=torch.float64)
    assert float(((one_step - fd[: len(one_step)]).abs() / fd[: len(one_step)].abs())[3:].min()
                 ) > 0.2
    # the committed rows' d_new_dbeta (devices' SecAgg'd + synthetic) is the same derivative
    d_new = torch.tensor([r["d_new_dbeta"] for r in rows[: len(fd)]], dtype=torch.float64)
    assert torch.allclose(d_new, fd[: len(d_new)], rtol=1e-3, atol=1e-2)


def test_full_path_segments_recover_each_beta_with_cross_segment_terms():
    """β_t by segment: one forward-mode replay per segment gives ∂ŷ_t/∂θ_s for every earlier
    segment s too (a day's count depends on the β of every day before it); each segment's β
    is recovered from an exact series."""
    from coordinator.calibration import OnlineCalibrator
    from coordinator.calibration_path import SyntheticReplay
    from coordinator.hybrid import HybridSimulation
    from coordinator.runner import physical_agents

    pop = synthesize("tiny", seed=1)
    sim = HybridSimulation(SIR(0.5, 0.1, 0.05), pop, physical_agents(pop.n, 10), 1,
                           remote=True, tangents=True, estimator="expected")
    replay = SyntheticReplay(SIR(0.5, 0.1, 0.05), sim.split, sim.state, 1, "expected",
                             beta_devices=0.5)
    zeros = torch.zeros(pop.n, dtype=torch.float64)
    for d in range(9):  # the devices' cross sums: all zero here (no device infected)
        replay.record(d, zeros, zeros)
    truth = [0.8, 0.4, 0.6]
    seg = torch.arange(9) // 3
    y, dy = replay.run(torch.tensor(truth, dtype=torch.float64)[seg],
                       (seg[None, :] == torch.arange(3)[:, None]).double())
    assert float(dy[0, 3:].abs().min()) > 0  # later days depend on the first segment's β
    cal = OnlineCalibrator(CalibrationSettings(beta_init=0.3, every=3, steps=8, segment_days=3))
    cal.replay = replay
    for d in range(9):
        cal.beta_for(d)
        cal.add_path_day(d, 0.0, 0.0, float(y[d]))
        cal.update(d)
    assert cal.theta == pytest.approx(truth, rel=1e-3)
    assert cal.loss() < 1e-8

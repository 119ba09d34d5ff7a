"""The full-path calibration's synthetic replay on the partitioned hybrid run
(simulation.distributed.replay.PartitionedReplay) equals the 1-rank replay
(coordinator.calibration_path.SyntheticReplay) on 2 and 3 ranks: the same recorded cross
sums, the same per-day β and tangent directions → the same daily counts and ∂counts/∂θ_s
(real processes over gloo on 127.0.0.1). Fits run between days (the serving ranks answer
inside their next step()) and after the last day (explicit release/serve)."""

from __future__ import annotations

import pytest
import torch

from coordinator.calibration_path import SyntheticReplay
from coordinator.hybrid import TANGENT_BOUND, HybridSimulation
from simulation.distributed.launch import spawn_local
from simulation.distributed.replay import PartitionedReplay
from simulation.models import SIR
from simulation.population import synthesize

DAYS, SEED, BETA, EVERY = 8, 3, 0.9, 17


def _model() -> SIR:
    return SIR(beta=BETA, gamma=0.1, initial_infected=0.05)


def _hybrid(pop, **kw) -> HybridSimulation:
    return HybridSimulation(_model(), pop, torch.arange(0, pop.n, EVERY), SEED, tangents=True,
                            estimator="straight_through", frac_bits=40, **kw)


def _fit_inputs(t_days: int) -> tuple[torch.Tensor, torch.Tensor]:
    """β by segment of 3 days and one tangent direction per segment (as the calibrator)."""
    seg = torch.arange(t_days) // 3
    k = int(seg.max()) + 1
    theta = torch.tensor([0.7, 1.1, 0.85][:k], dtype=torch.float64)
    return theta[seg], (seg[None, :] == torch.arange(k)[:, None]).to(torch.float64)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).abs() / b.abs().clamp(min=1e-300)).max())


def _ranks(rank: int, world: int):
    torch.set_num_threads(1)
    pop = synthesize("tiny", seed=0)
    sim = _hybrid(pop, remote=True, procs_group=True)
    replay = PartitionedReplay(_model(), sim, SEED, "straight_through", beta_devices=BETA)
    if rank:
        for _ in range(DAYS):
            sim.step()  # serves rank 0's fits of the previous days first
        replay.serve()  # the fit after the last day
        return None
    one, ref = _hybrid(pop, remote=True), _hybrid(pop)  # 1 rank; the devices (fleet mode)
    single = SyntheticReplay(_model(), one.split, one.state, SEED, "straight_through",
                             beta_devices=BETA)
    phys, b, worst, fits = sim.split.physical, TANGENT_BOUND, 0.0, 0
    for day in range(DAYS):
        seen, dseen = sim.cross_infected().clone(), sim.cross_tangent().clone()
        seen[phys], dseen[phys] = ref.state["I"][phys], ref.tangent["I"][phys]
        fleet = ref._fleet_sum()
        cross = fleet.step(seen.double(), round=2 * day).sums
        enc = fleet.step((dseen.double() + b) / (2 * b), round=2 * day + 1).sums
        dcross = 2 * b * torch.nan_to_num(enc, nan=0.0).double() - b * ref._cross_wsum
        sim.step(cross_sums=cross, cross_dsums=dcross)
        one.step(cross_sums=cross, cross_dsums=dcross)
        ref.step()
        replay.record(day, cross, dcross)
        single.record(day, cross, dcross)
        if day in (2, 5, DAYS - 1):  # a fit: two evaluations, as a Gauss-Newton step does
            for shift in (0.0, 0.05):
                beta_days, seeds = _fit_inputs(day + 1)
                got = replay.run(beta_days + shift, seeds)
                want = single.run(beta_days + shift, seeds)
                assert torch.equal(got[0], want[0])  # counts: sums of 0/1, exact
                worst = max(worst, _rel(got[1], want[1]))
                assert float(want[1].abs().max()) > 0
                fits += 1
    replay.release()
    return worst, fits


@pytest.mark.parametrize("world", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_partitioned_replay_equals_the_single_process_replay(world):
    worst, fits = spawn_local(_ranks, world, timeout=240)[0]
    assert fits == 6 and worst <= 1e-12, worst

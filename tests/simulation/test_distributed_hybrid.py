"""The coordinator's hybrid run (fleet mode) on 2 ranks equals the 1-rank run exactly
(real processes over gloo on 127.0.0.1; simulation.distributed.hybrid_stepper)."""

from __future__ import annotations

import pytest
import torch

from coordinator.hybrid import HybridSimulation
from simulation.distributed.launch import spawn_local
from simulation.models import SIR
from simulation.population import synthesize

DAYS, SEED = 10, 3


def _run(rank: int, world: int, preset: str, scale: float | None, every: int):
    torch.set_num_threads(1)
    pop = synthesize(preset, seed=0) if scale is None else synthesize(preset, scale=scale, seed=0)
    sim = HybridSimulation(SIR(beta=0.9, gamma=0.1, initial_infected=0.05), pop,
                           torch.arange(0, pop.n, every), SEED,
                           procs_group=True if world > 1 else None)
    rows = []
    for day in range(DAYS):
        if rank == 0 and day == 4:
            sim.model.beta.data.mul_(0.8)  # a calibration step on the coordinator only
        rows.append(sim.step())
    return rows if rank == 0 else None


def _check(preset: str, scale: float | None, every: int, worlds=(2,)) -> None:
    one = spawn_local(_run, 1, preset, scale, every, timeout=120)[0]
    assert len(one) == DAYS and sum(r["new_infections"] for r in one) > 20
    for w in worlds:  # daily counts, exposure, the simulated devices' reports: bit for bit
        assert spawn_local(_run, w, preset, scale, every, timeout=120)[0] == one, w


def test_hybrid_two_ranks_equal_one_tiny():
    _check("tiny", None, 17)  # 1000 agents, 59 simulated devices


def _dies(rank: int, world: int):
    import os
    torch.set_num_threads(1)
    pop = synthesize("tiny", seed=0)
    sim = HybridSimulation(SIR(beta=0.9, gamma=0.1, initial_infected=0.05), pop,
                           torch.arange(0, pop.n, 17), SEED, procs_group=True)
    for day in range(DAYS):
        if rank == 1 and day == 3:
            os._exit(1)  # a worker killed mid-run
        sim.step()


def test_dead_worker_is_named_not_a_hang():
    import time

    from simulation.distributed.partition import DistributedError
    t0 = time.monotonic()
    with pytest.raises(DistributedError) as err:
        spawn_local(_dies, 2, timeout=90)
    assert time.monotonic() - t0 < 80
    assert "Rank 1 failed to pass monitoredBarrier" in str(err.value)


@pytest.mark.slow  # 37 s at load 5.5
def test_hybrid_two_and_three_ranks_equal_one_20k():
    _check("tiny", 20.0, 1000, worlds=(2, 3))  # 20,000 agents, 20 simulated devices

"""Checkpoints keep the state exactly: a run with the ``expected`` estimator (fractional
states) restored from its checkpoint continues as the uninterrupted run (the checkpoint used
to store every state as uint8, dropping the fractions)."""

from __future__ import annotations

import torch

from coordinator.hybrid import HybridSimulation
from coordinator.runner import physical_agents
from simulation.models import SIR
from simulation.population import synthesize


def _sim(estimator: str) -> HybridSimulation:
    pop = synthesize("tiny", seed=2)
    return HybridSimulation(SIR(0.6, 0.1, 0.1), pop, physical_agents(pop.n, 10), 2,
                            estimator=estimator)


def test_expected_estimator_checkpoint_resumes_exactly() -> None:
    torch.set_num_threads(1)
    ref = _sim("expected")
    for _ in range(3):
        ref.step()
    assert any(bool((v != v.round()).any()) for v in ref.state.values())  # fractional
    back = _sim("expected")
    back.load_state(ref.state_bytes())
    assert back.day == 3
    for k, v in ref.state.items():
        assert torch.equal(back.state[k], v), k
    for _ in range(2):
        a, b = ref.step(), back.step()
        assert a == b


def test_zero_one_states_stay_compact() -> None:
    sim = _sim("straight_through")
    sim.step()
    blob = sim.state_bytes()
    back = _sim("straight_through")
    back.load_state(blob)
    assert all(torch.equal(back.state[k], v) for k, v in sim.state.items())
    assert len(blob) < sum(v.numel() for v in sim.state.values())  # bytes, compressed

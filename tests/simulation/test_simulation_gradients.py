"""Gradient estimators against finite differences with common random numbers.

FD of E[total infections] w.r.t. β is taken over several seeds with the same uniforms
(CRN) on both sides. Measured biases (100k agents, docs/simulation.md): straight-through
≈ −10 %, expected-value (mean-field) ≈ −58 %, relaxed (logistic, τ=0.1) ≫ (tens of ×).
"""

import pytest
import torch

from simulation.engine import simulate
from simulation.models import SIR
from simulation.population import random_contact_graph


def _fd_and_grads(n, seeds, estimators, h=0.02):
    g = random_contact_graph(n, 10, seed=1)

    def total(beta, seed, est="straight_through"):
        with torch.no_grad():
            return simulate(SIR(beta, 0.1, 0.01), g, 60, seed=seed, estimator=est).total_infections.item()

    fd = sum((total(0.5 + h, s) - total(0.5 - h, s)) / (2 * h) for s in seeds) / len(seeds)
    grads = {}
    for est in estimators:
        vals = []
        for s in seeds:
            m = SIR(0.5, 0.1, 0.01)
            simulate(m, g, 60, seed=s, estimator=est).total_infections.backward()
            vals.append(m.beta.grad.item())
        grads[est] = sum(vals) / len(vals)
    return fd, grads


def test_default_estimator_close_to_finite_differences_small():
    fd, grads = _fd_and_grads(20_000, seeds=range(3), estimators=["straight_through", "relaxed"])
    assert fd > 0
    assert abs(grads["straight_through"] / fd - 1) < 0.3
    # the relaxed estimator is far off: documented, and pinned so a change is noticed
    assert grads["relaxed"] / fd > 3


@pytest.mark.slow
def test_estimator_bias_at_100k():
    fd, grads = _fd_and_grads(100_000, seeds=range(4), estimators=list(("straight_through", "expected", "relaxed")))
    assert abs(grads["straight_through"] / fd - 1) < 0.25
    assert grads["expected"] / fd < 0.75  # mean-field surrogate underestimates


def test_expected_estimator_gradient_equals_fd_of_its_own_surrogate():
    """The mean-field forward is smooth and deterministic: autograd (incl. the transpose-SpMV
    backward of the neighbour-sum kernel) must match its central FD to float32 precision."""
    g = random_contact_graph(5_000, 10, seed=2)

    def total(beta: float) -> float:
        with torch.no_grad():
            return simulate(SIR(beta, 0.1, 0.01), g, 20, seed=0, estimator="expected").total_infections.item()

    h = 0.01
    fd = (total(0.3 + h) - total(0.3 - h)) / (2 * h)
    m = SIR(0.3, 0.1, 0.01)
    simulate(m, g, 20, seed=0, estimator="expected").total_infections.backward()
    assert fd > 0
    assert abs(m.beta.grad.item() / fd - 1) < 0.02

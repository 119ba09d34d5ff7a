"""Hybrid population: decentralised (fleet-mode protocol) == centralised run, same seeds."""

from __future__ import annotations

import pytest
import torch

from coordinator.hybrid import HybridError, HybridSimulation, split_graph
from simulation.engine import simulate
from simulation.models import SIR
from simulation.population import synthesize


@pytest.fixture(scope="module")
def pop():
    return synthesize("tiny", seed=0)


def _w(layer):  # unit-weight graphs are stored without weights (ContactGraph.merged)
    return layer.weights if layer.weights is not None else torch.ones(layer.nnz)


def test_split_covers_every_edge(pop):
    phys = torch.arange(0, 1000, 20)
    s = split_graph(pop, phys)
    merged = pop.graph.merged()
    assert s.central.nnz + s.cross.nnz == merged.nnz
    x = torch.rand(1000)
    dense = torch.zeros(1000)
    rows = torch.repeat_interleave(torch.arange(1000), merged.indptr[1:] - merged.indptr[:-1])
    dense.index_add_(0, rows, _w(merged) * x[merged.indices.long()])
    for layer in (s.central, s.cross):
        r = torch.repeat_interleave(torch.arange(1000), layer.indptr[1:] - layer.indptr[:-1])
        dense.index_add_(0, r, -(_w(layer) * x[layer.indices.long()]))
    assert float(dense.abs().max()) < 1e-4
    with pytest.raises(HybridError):
        split_graph(pop, torch.tensor([5000]))


@pytest.mark.parametrize("variant", ["assisted", "peer"])
def test_hybrid_equals_central(pop, variant):
    torch.set_num_threads(1)
    days, seed = 12, 3
    with torch.no_grad():
        central = simulate(SIR(beta=0.9, gamma=0.1, initial_infected=0.05), pop, days, seed)
    sim = HybridSimulation(SIR(beta=0.9, gamma=0.1, initial_infected=0.05), pop,
                           torch.arange(0, 1000, 17), seed, variant=variant)
    rows = [sim.step() for _ in range(days)]
    for c in ("S", "I", "R", "new_infections"):
        got = [r[c] for r in rows]
        assert got == central[c][1:].tolist(), c
    assert sum(r["new_infections"] for r in rows) > 20  # the epidemic actually moved
    assert all(r["physical_dp_dbeta"] >= 0 for r in rows)


def test_checkpoint_round_trip(pop):
    sim = HybridSimulation(SIR(initial_infected=0.05), pop, torch.arange(50), 1)
    sim.step()
    blob = sim.state_bytes()
    a = sim.step()
    sim2 = HybridSimulation(SIR(initial_infected=0.05), pop, torch.arange(50), 1)
    sim2.load_state(blob)
    assert sim2.day == 1 and sim2.step()["I"] == a["I"]


@pytest.mark.parametrize("estimator", ["expected", "straight_through"])
def test_forward_tangents_equal_central_autograd(pop, estimator):
    """Exact decentralised gradients: every agent carries ∂state/∂β forward and the secure
    neighbourhood sum carries neighbours' tangents beside their values (59 physical agents);
    the day's Σ ∂new_i/∂β equals central autograd of the same model, unlike Eq. 11's
    one-step derivative (neighbours held fixed)."""
    torch.set_num_threads(1)
    days, seed, beta = 10, 3, 0.6
    model = SIR(beta=beta, gamma=0.1, initial_infected=0.05)
    new = simulate(model, pop, days, seed, estimator=estimator)["new_infections"][1:]
    central = torch.tensor([float(torch.autograd.grad(new[t], model.beta, retain_graph=True)[0])
                            for t in range(days)], dtype=torch.float64)
    sim = HybridSimulation(SIR(beta=beta, gamma=0.1, initial_infected=0.05), pop,
                           torch.arange(0, 1000, 17), seed, estimator=estimator, tangents=True,
                           frac_bits=40)
    rows = [sim.step() for _ in range(days)]
    fed = torch.tensor([r["d_new_dbeta"] for r in rows], dtype=torch.float64)
    assert [r["new_infections"] for r in rows] == pytest.approx(new.tolist(), rel=1e-6)
    assert float(((fed - central).abs() / central.abs()).max()) < 1e-5
    assert all(r["d_new_dbeta_physical"] != 0 for r in rows[2:])  # devices contribute
    one_step = torch.tensor([r["one_step_dbeta"] for r in rows], dtype=torch.float64)
    assert float(((one_step - central).abs() / central.abs()).max()) > 0.1  # Eq. 11 is not it

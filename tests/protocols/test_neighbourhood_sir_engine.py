"""Equivalence through the simulation engine: ``simulate(SIR, graph, days, seed)`` with the
central CSR neighbour sum and with the secure protocol as its ``neighbour_sum`` hook give
identical daily series and identical final per-agent states (same infection and recovery
events), for both variants. Also the closed-form risk an agent computes from its protocol sum
matches the central one within the fixed-point tolerance for fractional weights."""

from __future__ import annotations

import pytest
import torch

from protocols.neighbourhood import FleetNeighbourhoodSum, NeighbourhoodPolicy
from simulation.engine import simulate
from simulation.models.sir import SIR, infection_probability, infection_probability_dbeta
from simulation.population import random_contact_graph


def fleet_for(graph, variant: str) -> FleetNeighbourhoodSum:
    merged = graph.merged()
    return FleetNeighbourhoodSum(merged.indptr, merged.indices, merged.weights,
                                 variant=variant, policy=NeighbourhoodPolicy(min_size=3))


def assert_same_run(n: int, days: int, variant: str, seed: int) -> float:
    graph = random_contact_graph(n, 10.0, seed=seed)
    model = SIR(beta=0.5, gamma=0.1, initial_infected=0.01)
    with torch.no_grad():
        threads = torch.get_num_threads()
        central = simulate(model, graph, days, seed)
        torch.set_num_threads(threads)  # the numba kernel's OpenMP layer changes it
        secure = simulate(model, graph, days, seed,
                          neighbour_sum=fleet_for(graph, variant).hook())
    for name, series in central.series.items():
        assert torch.equal(series, secure.series[name]), name
    for name, state in central.final_state.items():
        assert torch.equal(state, secure.final_state[name]), name
    return float(central.total_infections)


@pytest.mark.parametrize("variant", ["peer", "assisted"])
def test_engine_run_with_protocol_hook_equals_central_small(variant: str) -> None:
    assert assert_same_run(3000, 20, variant, seed=3) > 300


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["peer", "assisted"])
def test_engine_run_with_protocol_hook_equals_central_oxford_scale(variant: str) -> None:
    assert assert_same_run(150_000, 60, variant, seed=4) > 50_000


@pytest.mark.parametrize("variant", ["peer", "assisted"])
def test_local_risk_and_gradient_from_protocol_sum(variant: str) -> None:
    """Fractional weights: p_i and dp_i/dbeta from the protocol sum are within the
    fixed-point tolerance of those from the exact sum."""
    graph = random_contact_graph(2000, 10.0, seed=5)
    merged = graph.merged()
    g = torch.Generator().manual_seed(6)
    weights = torch.rand(merged.indices.numel(), generator=g) * 1.5
    fleet = FleetNeighbourhoodSum(merged.indptr, merged.indices, weights, variant=variant)
    infected = (torch.rand(2000, generator=g) < 0.3).float()
    n = merged.indptr.numel() - 1
    tgt = torch.repeat_interleave(torch.arange(n), merged.indptr[1:] - merged.indptr[:-1])
    exact = torch.zeros(n, dtype=torch.float64).index_add_(
        0, tgt, weights.double() * infected.double()[merged.indices.long()])
    got = fleet.step(infected).sums
    degree = merged.degree().double()
    assert float((got - exact).abs().max()) <= float(degree.max()) * 2.0**-17
    s = torch.ones(n, dtype=torch.float64)
    p_exact = infection_probability(exact, s, degree, 0.5)
    p_got = infection_probability(got, s, degree, 0.5)
    assert float((p_exact - p_got).abs().max()) < 1e-5
    d_exact = infection_probability_dbeta(exact, s, degree, 0.5)
    d_got = infection_probability_dbeta(got, s, degree, 0.5)
    assert float((d_exact - d_got).abs().max()) < 1e-5

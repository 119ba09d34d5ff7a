"""Equivalence anchor: an SIR epidemic (beta 0.5, gamma 0.1, I0 1 %, mean degree ~10) whose
neighbour sums come from the secure protocol (fleet mode) has the same infection and recovery
events, day by day, as the same epidemic with the central plaintext sum and the same random
numbers; probabilities agree within the fixed-point tolerance (here: exactly, since w = 1).

The SIR step is written out here with the public formula p_i = 1 - exp(-beta S_i dt / n_i *
sum_j I_j); ``test_neighbourhood_sir_engine.py`` does the same through the simulation engine.
"""

from __future__ import annotations

import pytest
import torch

from protocols.neighbourhood import FleetNeighbourhoodSum, NeighbourhoodPolicy

BETA, GAMMA, DT, I0 = 0.5, 0.1, 1.0, 0.01


def random_csr(n: int, mean_degree: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    m = int(n * mean_degree / 2)
    a, b = torch.randint(0, n, (m,), generator=g), torch.randint(0, n, (m,), generator=g)
    keep = a != b
    src, dst = torch.cat([a[keep], b[keep]]), torch.cat([b[keep], a[keep]])
    key = torch.unique(src * n + dst)
    src, dst = key // n, key % n
    indptr = torch.zeros(n + 1, dtype=torch.int64)
    indptr[1:] = torch.cumsum(torch.bincount(src, minlength=n), 0)
    return indptr, dst


def run_sir(indptr, indices, neighbour_sum, days: int, seed: int):
    """SIR with per-day uniforms from (seed, day); returns per-day events and probabilities."""
    n = indptr.numel() - 1
    degree = (indptr[1:] - indptr[:-1]).to(torch.float64)
    g = torch.Generator().manual_seed(seed)
    infected = torch.zeros(n, dtype=torch.bool)
    infected[torch.randperm(n, generator=g)[: max(1, int(I0 * n))]] = True
    recovered = torch.zeros(n, dtype=torch.bool)
    events, probs = [], []
    for day in range(days):
        u = torch.rand((2, n), generator=torch.Generator().manual_seed(seed * 100_003 + day),
                       dtype=torch.float64)
        s = neighbour_sum(infected.to(torch.float64)).to(torch.float64)
        susceptible = ~infected & ~recovered
        rate = torch.where(degree > 0, BETA * DT * s / degree.clamp(min=1), 0.0)
        p = torch.where(susceptible, 1.0 - torch.exp(-rate), 0.0)
        new_inf = susceptible & (u[0] < p)
        new_rec = infected & (u[1] < GAMMA * DT)
        infected = (infected | new_inf) & ~new_rec
        recovered |= new_rec
        events.append((new_inf.clone(), new_rec.clone()))
        probs.append(p)
    return events, probs


def central_sum(indptr, indices):
    n = indptr.numel() - 1
    tgt = torch.repeat_interleave(torch.arange(n), indptr[1:] - indptr[:-1])
    return lambda x: torch.zeros(n, dtype=torch.float64).index_add_(0, tgt, x[indices])


def check_equivalent(n: int, days: int, variant: str, seed: int) -> int:
    indptr, indices = random_csr(n, 10, seed)
    fleet = FleetNeighbourhoodSum(indptr, indices, variant=variant,
                                  policy=NeighbourhoodPolicy(min_size=3))
    ev_c, p_c = run_sir(indptr, indices, central_sum(indptr, indices), days, seed)
    ev_s, p_s = run_sir(indptr, indices, fleet.hook(), days, seed)
    total = 0
    for day, ((ic, rc), (is_, rs), pc, ps) in enumerate(zip(ev_c, ev_s, p_c, p_s,
                                                           strict=True)):
        assert torch.equal(ic, is_), f"infection events differ on day {day}"
        assert torch.equal(rc, rs), f"recovery events differ on day {day}"
        assert float((pc - ps).abs().max()) <= 10 * 2.0**-16
        total += int(ic.sum())
    return total


@pytest.mark.parametrize("variant", ["peer", "assisted"])
def test_sir_through_the_protocol_equals_central_small(variant: str) -> None:
    infections = check_equivalent(3000, 25, variant, seed=1)
    assert infections > 300  # the epidemic actually spreads


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["peer", "assisted"])
def test_sir_through_the_protocol_equals_central_oxford_scale(variant: str) -> None:
    infections = check_equivalent(150_000, 60, variant, seed=2)
    assert infections > 50_000

"""Fleet mode of the secure neighbourhood sum: equals the plaintext sum, applies the size
and dropout policy, rejects bad input and out-of-range sums."""

from __future__ import annotations

import pytest
import torch

from protocols.neighbourhood import (
    FleetNeighbourhoodSum,
    NeighbourhoodError,
    NeighbourhoodPolicy,
    NeighbourSumOutOfRangeError,
    Outcome,
    check_range,
)


def random_csr(n: int, mean_degree: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Undirected random graph (no self loops) as CSR; test data only."""
    g = torch.Generator().manual_seed(seed)
    m = int(n * mean_degree / 2)
    a = torch.randint(0, n, (m,), generator=g)
    b = torch.randint(0, n, (m,), generator=g)
    keep = a != b
    a, b = a[keep], b[keep]
    src, dst = torch.cat([a, b]), torch.cat([b, a])
    key = torch.unique(src * n + dst)
    src, dst = key // n, key % n
    indptr = torch.zeros(n + 1, dtype=torch.int64)
    indptr[1:] = torch.cumsum(torch.bincount(src, minlength=n), 0)
    return indptr, dst


def central(indptr, indices, values, weights=None, live=None) -> torch.Tensor:
    n = indptr.numel() - 1
    tgt = torch.repeat_interleave(torch.arange(n), indptr[1:] - indptr[:-1])
    w = torch.ones(indices.numel(), dtype=torch.float64) if weights is None else weights
    contrib = w * values.double()[indices]
    if live is not None:
        contrib = contrib * (live[indices] & live[tgt]).double()
    return torch.zeros(n, dtype=torch.float64).index_add_(0, tgt, contrib)


@pytest.mark.parametrize("variant", ["peer", "assisted"])
def test_fleet_sum_equals_plaintext_sum(variant: str) -> None:
    indptr, indices = random_csr(3000, 10, seed=1)
    infected = torch.rand(3000, generator=torch.Generator().manual_seed(2)) < 0.2
    fleet = FleetNeighbourhoodSum(indptr, indices, variant=variant,
                                  policy=NeighbourhoodPolicy(min_size=1))
    res = fleet.step(infected)
    assert torch.equal(res.sums, central(indptr, indices, infected))
    assert res.stats.keystream_elements > 0 and res.stats.sealed_bytes > 0
    degree = indptr[1:] - indptr[:-1]
    expected = int((degree * (degree - 1)).sum() + degree.sum()) if variant == "peer" else \
        int(degree.sum() + (degree > 0).sum())
    assert res.stats.ring_elements_relayed == expected
    # the hook form returns the same sums in the caller's float dtype
    assert torch.equal(fleet(infected.float()), res.sums.float())


@pytest.mark.parametrize("variant", ["peer", "assisted"])
def test_fleet_weighted_within_fixed_point_tolerance(variant: str) -> None:
    indptr, indices = random_csr(500, 8, seed=3)
    g = torch.Generator().manual_seed(4)
    weights = torch.rand(indices.numel(), generator=g, dtype=torch.float64) * 2
    values = torch.rand(500, generator=g, dtype=torch.float64)
    fleet = FleetNeighbourhoodSum(indptr, indices, weights, variant=variant)
    got = fleet.step(values).sums
    degree = (indptr[1:] - indptr[:-1]).double()
    err = (got - central(indptr, indices, values, weights)).abs()
    assert bool((err <= degree * 2.0**-17 + 1e-12).all()), float(err.max())


@pytest.mark.parametrize("variant", ["peer", "assisted"])
def test_padding_keeps_sums_and_refusal_uses_public_estimate(variant: str) -> None:
    indptr, indices = random_csr(400, 3, seed=5)
    infected = torch.rand(400, generator=torch.Generator().manual_seed(6)) < 0.5
    degree = indptr[1:] - indptr[:-1]
    small = (degree > 0) & (degree < 4)
    assert bool(small.any()) and bool((degree == 0).any())
    truth = central(indptr, indices, infected)

    padded = FleetNeighbourhoodSum(indptr, indices, variant=variant,
                                   policy=NeighbourhoodPolicy(min_size=4)).step(infected)
    assert torch.equal(padded.sums, truth)
    assert bool((padded.outcome[small] == int(Outcome.PADDED)).all())
    assert bool((padded.outcome[degree == 0] == int(Outcome.EMPTY)).all())

    pol = NeighbourhoodPolicy(min_size=4, below_minimum="refuse", public_prevalence=0.25)
    refused = FleetNeighbourhoodSum(indptr, indices, variant=variant, policy=pol).step(infected)
    assert bool((refused.outcome[small] == int(Outcome.REFUSED)).all())
    assert torch.equal(refused.sums[small], 0.25 * degree[small].double())
    assert torch.equal(refused.sums[~small], truth[~small])
    # padding costs relayed elements, refusal saves them
    assert padded.stats.ring_elements_relayed > refused.stats.ring_elements_relayed


@pytest.mark.parametrize("variant", ["peer", "assisted"])
def test_dropouts_are_excluded_and_small_survivors_follow_policy(variant: str) -> None:
    n = 1000
    indptr, indices = random_csr(n, 6, seed=7)
    g = torch.Generator().manual_seed(8)
    infected = torch.rand(n, generator=g) < 0.4
    dropped = torch.rand(n, generator=g) < 0.3
    pol = NeighbourhoodPolicy(min_size=3, below_minimum="refuse")
    fleet = FleetNeighbourhoodSum(indptr, indices, variant=variant, policy=pol)
    res = fleet.step(infected, dropped=dropped)
    live = ~dropped
    tgt = torch.repeat_interleave(torch.arange(n), indptr[1:] - indptr[:-1])
    live_deg = torch.bincount(tgt[live[indices] & live[tgt]], minlength=n)
    ok = live & (live_deg >= 3)
    assert torch.equal(res.sums[ok], central(indptr, indices, infected, live=live)[ok])
    assert bool(torch.isnan(res.sums[dropped]).all())
    assert bool((res.outcome[dropped] == int(Outcome.DROPPED)).all())
    few = live & (live_deg > 0) & (live_deg < 3)
    assert bool(few.any()) and bool((res.outcome[few] == int(Outcome.REFUSED)).all())
    # the next step without dropouts uses the full graph again
    assert torch.equal(fleet.step(infected).sums[live_deg >= 3],
                       central(indptr, indices, infected)[live_deg >= 3])


def test_range_check_rejects_out_of_range_sums() -> None:
    w = torch.tensor([3.0, 3.0, 3.0], dtype=torch.float64)
    check_range(torch.tensor([0.0, 3.0, 1.5]), w, 3, 16)
    for bad in ([-0.01, 1.0, 1.0], [1.0, 3.01, 1.0], [1.0, float("nan"), 1.0]):
        with pytest.raises(NeighbourSumOutOfRangeError, match="outside"):
            check_range(torch.tensor(bad), w, 3, 16)


def test_fleet_rejects_bad_input() -> None:
    indptr, indices = random_csr(50, 4, seed=9)
    fleet = FleetNeighbourhoodSum(indptr, indices)
    with pytest.raises(NeighbourhoodError, match="expected 50"):
        fleet.step(torch.zeros(49))
    with pytest.raises(NeighbourhoodError, match=r"\[0, 1\]"):
        fleet.step(torch.full((50,), 2.0))
    with pytest.raises(NeighbourhoodError, match="out of range"):
        FleetNeighbourhoodSum(indptr, indices + 50)
    with pytest.raises(NeighbourhoodError, match="indptr"):
        FleetNeighbourhoodSum(indptr[:-1], indices)
    with pytest.raises(NeighbourhoodError, match="weights"):
        FleetNeighbourhoodSum(indptr, indices, -torch.ones(indices.numel()))
    with pytest.raises(NeighbourhoodError, match="32 bytes"):
        FleetNeighbourhoodSum(indptr, indices, secret=b"short")


def test_fleet_masks_depend_on_the_full_secret_and_round() -> None:
    """Same inputs, different secret or round: different relayed ciphertext, same sums."""
    indptr, indices = random_csr(200, 6, seed=10)
    infected = torch.rand(200, generator=torch.Generator().manual_seed(11)) < 0.5
    seen = []
    for secret, rnd in ((b"\x01" * 32, 0), (b"\x01" * 31 + b"\x02", 0), (b"\x01" * 32, 1)):
        fleet = FleetNeighbourhoodSum(indptr, indices, variant="assisted", secret=secret)
        captured = []
        orig = fleet._relay

        def spy(t, *a, _orig=orig, _cap=captured):
            _cap.append(t.clone())
            return _orig(t, *a)

        fleet._relay = spy
        res = fleet.step(infected, round=rnd)
        assert torch.equal(res.sums, central(indptr, indices, infected))
        seen.append(torch.cat([c.flatten() for c in captured]))
    assert not torch.equal(seen[0], seen[1]) and not torch.equal(seen[0], seen[2])


@pytest.mark.parametrize("variant", ["peer", "assisted"])
def test_optional_noise_is_bounded_centred_and_laplace_sized(variant: str) -> None:
    n = 4000
    indptr, indices = random_csr(n, 14, seed=12)
    values = torch.full((n,), 0.5, dtype=torch.float64)
    pol = NeighbourhoodPolicy(noise_scale=0.2)  # bound 2.0
    fleet = FleetNeighbourhoodSum(indptr, indices, variant=variant, policy=pol)
    sums = fleet.step(values).sums
    truth = central(indptr, indices, values)
    degree = (indptr[1:] - indptr[:-1]).double()
    assert bool((sums >= 0).all()) and bool((sums <= degree).all())  # clamped to [0, sum w]
    inside = (truth >= 2.0) & (truth <= degree - 2.0)  # no clamping possible there
    resid = (sums - truth)[inside]
    assert resid.numel() > 2000
    assert bool((resid.abs() <= 2.0 + 1e-9).all())
    assert abs(float(resid.mean())) < 0.03  # discrete Laplace: sd = 0.2 * sqrt(2) = 0.283
    assert 0.25 < float(resid.std()) < 0.32
    assert float((resid == 0).double().mean()) < 0.01  # noise is on the ulp grid, not 0
    again = fleet.step(values).sums  # fresh noise each step
    assert not torch.equal(again, sums)

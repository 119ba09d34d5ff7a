"""Scaling of the per-device neighbourhood relay (issue 12, item 8): the keys a party is
given, dummies included, grow with its degree, never with the number of parties in the run.
The old relay gave every padding dummy every public key of the run each round
(O(dummies x N), 293 s of a 432 s fleet run at 1000 devices)."""

from __future__ import annotations

import pytest

from protocols.neighbourhood import NeighbourhoodPolicy, NeighbourhoodRelay, Outcome
from protocols.neighbourhood.local import make_devices, run_round
from protocols.neighbourhood.relay import plan_parties


def _pairs(n: int) -> dict[str, set[str]]:
    """``n`` disjoint pairs: every neighbourhood has one real contact (padded to 3)."""
    out: dict[str, set[str]] = {}
    for i in range(n):
        a, b = f"a{i}", f"b{i}"
        out[a], out[b] = {b}, {a}
    return out


def _max_keys(n: int, variant: str) -> tuple[int, int]:
    contacts = _pairs(n)
    relay = NeighbourhoodRelay(contacts, variant=variant, run_id=f"scale{n}",
                               policy=NeighbourhoodPolicy(min_size=3))
    devices = make_devices(relay, sorted(contacts))
    values = {a: float(a.startswith("a")) for a in contacts}
    res = run_round(relay, devices, values, 0)
    assert all(r is not None and r.value == values[next(iter(contacts[a]))]
               for a, r in res.items())
    assert all(relay.outcome[a] is Outcome.PADDED for a in contacts)
    att = relay.begin_round(1, set(contacts))
    dummy_keys = max(len(d.keyring._public) for d in relay._dummies.values())
    device_keys = max(len(relay.keys_for(p)) for p in att.plans.values())
    assert all(set(relay.keys_for(p)) == plan_parties(p) for p in att.plans.values())
    return dummy_keys, device_keys


@pytest.mark.parametrize("variant", ["peer", "assisted"])
def test_keys_per_party_do_not_grow_with_the_run(variant: str) -> None:
    small = _max_keys(10, variant)
    large = _max_keys(80, variant)
    assert large == small  # O(degree): the same for 20 and 160 parties
    assert max(large) <= 1 + 2 * 3  # relay, its own roster, its target and that roster


def test_scalar_fast_paths_equal_the_tensor_ones() -> None:
    """The per-message fast paths (no tensor round trip) give bit-identical ring elements."""
    import os
    import random

    import torch

    from protocols.keys import ring_keystream
    from protocols.neighbourhood.device import encode_scalar, keystream_element
    from protocols.ring import FixedPointRing, RingOverflowError

    ring = FixedPointRing()
    rng = random.Random(0)
    xs = [0.0, 1.0, 0.5, 2.0**-17, 3 * 2.0**-17, -(2.0**-17), 1234.5678]
    xs += [rng.uniform(0, 2) * rng.random() for _ in range(2000)]
    xs += [k * 2.0**-17 for k in range(-50, 50)]  # exact ties: round half to even
    for x in xs:
        assert encode_scalar(ring, x) == int(ring.encode(torch.tensor([x], dtype=torch.float64))[0])
    for bad in (float("nan"), float("inf"), 1e300):
        with pytest.raises(RingOverflowError):
            encode_scalar(ring, bad)
    for _ in range(200):
        key = os.urandom(32)
        assert keystream_element(key) == int(ring_keystream(key, 1)[0])


def test_scalar_decode_equals_the_tensor_one() -> None:
    import random

    import torch

    from protocols.neighbourhood.device import decode_scalar
    from protocols.ring import FixedPointRing

    rng = random.Random(1)
    for ring in (FixedPointRing(), FixedPointRing(8)):
        for v in [0, 1, -1, 2**63 - 1, -(2**63), *(rng.randrange(-(2**63), 2**63)
                                                for _ in range(3000))]:
            assert decode_scalar(ring, v) == float(ring.decode(torch.tensor([v]))[0])

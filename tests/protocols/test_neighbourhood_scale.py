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

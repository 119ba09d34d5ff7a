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


def test_assisted_resume_rearms_without_resending() -> None:
    """A device process that lost its state machine between sending and receiving re-arms
    with ``resume`` (same checks, nothing re-sealed) and decodes the same sum."""
    from protocols.keys import AgreementKey
    from protocols.neighbourhood import AssistedNeighbourhoodAgent, Keyring, ProtocolStateError

    contacts = {"a": {"b", "c", "d"}, "b": {"a"}, "c": {"a"}, "d": {"a"}}
    relay = NeighbourhoodRelay(contacts, variant="assisted", run_id="resume",
                               policy=NeighbourhoodPolicy(min_size=3))
    devices = make_devices(relay, ["b", "c", "d"])
    raw = AgreementKey.generate()
    fresh_key = raw.private_bytes()
    devices["a"] = AssistedNeighbourhoodAgent(
        "a", "resume", keyring=Keyring("a", "resume", AgreementKey.from_private_bytes(fresh_key)),
        contacts=contacts["a"])
    relay.register("a", raw.public_bytes())
    att = relay.begin_round(0, set(contacts))
    values = {"a": 0.0, "b": 1.0, "c": 1.0, "d": 0.0}
    ups = {}
    for x, plan in att.plans.items():
        devices[x].keyring.add_peers(relay.keys_for(plan))
        ups[x] = devices[x].start(plan, values[x])
    deliveries = att.route_phase1(ups)
    again = AssistedNeighbourhoodAgent(  # the device's next process: same key, new object
        "a", "resume", keyring=Keyring("a", "resume", AgreementKey.from_private_bytes(fresh_key)),
        contacts=contacts["a"])
    again.keyring.add_peers(relay.keys_for(att.plans["a"]))
    again.resume(att.plans["a"], values["a"])
    res = again.on_masked(deliveries["a"].envelopes, deliveries["a"].mask_sum)
    assert res is not None and res.value == 2.0 and res.real_contributors == 3
    with pytest.raises(ProtocolStateError):
        again.resume(att.plans["a"], values["a"])  # the same round twice

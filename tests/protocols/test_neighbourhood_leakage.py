"""Leakage tests: flip one contact's I_j, keep everything else, and compare what a single
contact, the target (before summing) and the relay see. Every view must be uniformly
distributed in the ring and indistinguishable between the two worlds; a power check shows
the same statistics catch a view that does depend on I_j."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from protocols.envelope import open_envelope
from protocols.neighbourhood import (
    FleetNeighbourhoodSum,
    NeighbourhoodPolicy,
    NeighbourhoodRelay,
)
from protocols.neighbourhood.local import make_devices
from protocols.neighbourhood.messages import decode_element, decode_tagged

SAMPLES = 300
ALPHA = 1e-4  # per test; real CSPRNG randomness, so no seed: keep false alarms rare
CONTACTS = {"t": {"a", "b", "c", "d"}, "a": {"t"}, "b": {"t"}, "c": {"t"}, "d": {"t"}}
POLICY = NeighbourhoodPolicy(min_size=1)


def _u(values: list[int]) -> np.ndarray:
    """Signed ring elements -> floats in [0, 1)."""
    return (np.array(values, dtype=np.int64).view(np.uint64) / 2.0**64).astype(np.float64)


def assert_uniform_and_equal(world0: list[int], world1: list[int]) -> None:
    u0, u1 = _u(world0), _u(world1)
    for u in (u0, u1):
        assert stats.kstest(u, "uniform").pvalue > ALPHA
        top = np.floor(u * 16).astype(int)
        assert stats.chisquare(np.bincount(top, minlength=16)).pvalue > ALPHA
    assert stats.ks_2samp(u0, u1).pvalue > ALPHA


def view(device, env) -> bytes:
    """What ``device`` reads from ``env`` (opened without consuming its replay guard)."""
    return open_envelope(device.keyring.pair_key(env.sender), env.context, env.blob)


def peer_views(flip_value: float, rounds: int) -> dict[str, list]:
    """Run ``rounds`` peer rounds with I_a = flip_value; collect the views."""
    relay = NeighbourhoodRelay(CONTACTS, variant="peer", run_id="leak", policy=POLICY)
    devices = make_devices(relay, sorted(CONTACTS))
    for d in devices.values():
        d.keyring.add_peers(relay.public_keys())
    values = {"t": 0.0, "a": flip_value, "b": 1.0, "c": 0.0, "d": 1.0}
    views: dict[str, list] = {"b_from_a": [], "t_partial_b": [], "relay_blob": [],
                              "relay_meta": []}
    for rnd in range(rounds):
        att = relay.begin_round(rnd, set(CONTACTS))
        ups = {x: devices[x].start(p, values[x]) for x, p in att.plans.items()}
        views["relay_meta"].append(sorted((e.sender, e.receiver, len(e.blob))
                                          for es in ups.values() for e in es))
        a_to_b = next(e for e in ups["a"] if e.receiver == "b")
        views["relay_blob"].append(a_to_b.blob)
        d1 = att.route_phase1(ups)
        got = {e.sender: dict(decode_tagged(view(devices["b"], e))) for e in d1["b"].envelopes}
        views["b_from_a"].append(got["a"]["t"])
        ups2 = {x: devices[x].on_shares(d.envelopes, d.aborted) for x, d in d1.items()}
        d2 = att.route_phase2(ups2)
        from_b = next(e for e in d2["t"].envelopes if e.sender == "b")
        views["t_partial_b"].append(decode_element(view(devices["t"], from_b)))
        for x, d in d2.items():
            devices[x].on_partials(d.envelopes, d.aborted)
    return views


def assisted_views(flip_value: float, rounds: int) -> dict[str, list]:
    relay = NeighbourhoodRelay(CONTACTS, variant="assisted", run_id="leak", policy=POLICY)
    devices = make_devices(relay, sorted(CONTACTS))
    for d in devices.values():
        d.keyring.add_peers(relay.public_keys())
    values = {"t": 0.0, "a": flip_value, "b": 1.0, "c": 0.0, "d": 1.0}
    views: dict[str, list] = {"t_from_a": [], "relay_blob": [], "relay_meta": []}
    for rnd in range(rounds):
        att = relay.begin_round(rnd, set(CONTACTS))
        ups = {x: devices[x].start(p, values[x]) for x, p in att.plans.items()}
        views["relay_meta"].append(sorted((e.sender, e.receiver, len(e.blob))
                                          for es in ups.values() for e in es))
        views["relay_blob"].append(ups["a"][0].blob)
        d1 = att.route_phase1(ups)
        from_a = next(e for e in d1["t"].envelopes if e.sender == "a")
        views["t_from_a"].append(decode_element(view(devices["t"], from_a)))
        res = {x: devices[x].on_masked(d.envelopes, d.mask_sum) for x, d in d1.items()}
        assert res["t"].value == flip_value + 2.0
    return views


def _relay_checks(v0: dict[str, list], v1: dict[str, list]) -> None:
    # metadata is identical in both worlds; envelope bytes that vary (nonce, ciphertext, tag)
    # are uniform and indistinguishable, bytes that never vary (format header) are equal
    assert v0["relay_meta"] == v1["relay_meta"]
    a0 = np.stack([np.frombuffer(b, dtype=np.uint8) for b in v0["relay_blob"]])
    a1 = np.stack([np.frombuffer(b, dtype=np.uint8) for b in v1["relay_blob"]])
    const = (a0 == a0[0]).all(axis=0)
    assert (a1[:, const] == a0[0, const]).all()
    assert (~const).sum() >= 8 + 16  # at least one ring element and a tag vary
    for arr in (a0, a1):
        body = arr[:, ~const].ravel()
        assert stats.chisquare(np.bincount(body, minlength=256)).pvalue > ALPHA
    cols = np.nonzero(~const)[0][:8]
    first0 = [int.from_bytes(r[cols].tobytes(), "little", signed=True) for r in a0]
    first1 = [int.from_bytes(r[cols].tobytes(), "little", signed=True) for r in a1]
    assert_uniform_and_equal(first0, first1)


def test_peer_contact_target_and_relay_views_do_not_depend_on_one_input() -> None:
    v0, v1 = peer_views(0.0, SAMPLES), peer_views(1.0, SAMPLES)
    assert_uniform_and_equal(v0["b_from_a"], v1["b_from_a"])  # a single contact's view
    assert_uniform_and_equal(v0["t_partial_b"], v1["t_partial_b"])  # target, one partial
    _relay_checks(v0, v1)


def test_assisted_target_and_relay_views_do_not_depend_on_one_input() -> None:
    v0, v1 = assisted_views(0.0, SAMPLES), assisted_views(1.0, SAMPLES)
    assert_uniform_and_equal(v0["t_from_a"], v1["t_from_a"])
    _relay_checks(v0, v1)


def test_the_statistics_detect_a_leaky_view() -> None:
    """Power check: a view that is x_j plus low-entropy noise is rejected."""
    rng = np.random.default_rng(0)  # test data only, not protocol randomness
    noise = rng.integers(0, 1 << 20, size=SAMPLES)
    leaky0 = [int(x) for x in noise]
    leaky1 = [int(x) + (1 << 16) for x in noise]
    with pytest.raises(AssertionError):
        assert_uniform_and_equal(leaky0, leaky1)
    # ... and a uniform view that is shifted by x_j only in its top bits
    top0 = [int(x) for x in rng.integers(-(1 << 62), 1 << 62, size=SAMPLES)]
    top1 = [x + (1 << 62) for x in top0]
    with pytest.raises(AssertionError):
        assert_uniform_and_equal(top0, top1)


def fleet_views(variant: str, flip_value: float, rounds: int) -> list[int]:
    """Fleet mode, star graph (target 0, contacts 1-4): the element contact 1 sends through
    the relay (peer: its share for holder 2; assisted: its masked value for target 0), as the
    receiver opens it, over ``rounds`` steps with I_1 = flip_value."""
    indptr = torch.tensor([0, 4, 5, 6, 7, 8])
    indices = torch.tensor([1, 2, 3, 4, 0, 0, 0, 0])
    fleet = FleetNeighbourhoodSum(indptr, indices, variant=variant,
                                  policy=NeighbourhoodPolicy(min_size=1))
    seen: list[int] = []
    relay = fleet._relay
    wanted = "shares4" if variant == "peer" else "masked4"

    def spy(t, rnd, step, tag, stats):
        out = relay(t, rnd, step, tag, stats)
        if tag == wanted:
            seen.append(int(out[0, 0]))
        return out

    fleet._relay = spy
    values = torch.tensor([0.0, flip_value, 1.0, 0.0, 1.0])
    for _ in range(rounds):
        assert float(fleet.step(values).sums[0]) == flip_value + 2.0
    assert len(seen) == rounds
    return seen


@pytest.mark.parametrize("variant", ["peer", "assisted"])
def test_fleet_relayed_elements_do_not_depend_on_one_input(variant: str) -> None:
    assert_uniform_and_equal(fleet_views(variant, 0.0, SAMPLES),
                             fleet_views(variant, 1.0, SAMPLES))

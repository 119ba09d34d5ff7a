"""Per-device state machines and relay of the secure neighbourhood sum: correct sums,
padding/refusal, dropouts at every phase with restarts, tampering, replay, misrouting,
out-of-range sums and wrong-phase calls."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols.envelope import EnvelopeError
from protocols.neighbourhood import (
    Envelope,
    FleetNeighbourhoodSum,
    MalformedMessageError,
    MissingMessageError,
    NeighbourhoodPolicy,
    NeighbourhoodRelay,
    NeighbourSumOutOfRangeError,
    Outcome,
    PeerNeighbourhoodAgent,
    ProtocolStateError,
    UnexpectedMessageError,
)
from protocols.neighbourhood.local import make_devices, run_round
from protocols.neighbourhood.messages import (
    decode_element,
    decode_mask_sum,
    decode_tagged,
    encode_element,
    encode_tagged,
)

VARIANTS = ["peer", "assisted"]


def small_graph(n: int = 14, edges: int = 30, seed: int = 0) -> dict[str, set[str]]:
    rng = random.Random(seed)
    ids = [f"d{i:02d}" for i in range(n)]
    contacts: dict[str, set[str]] = {a: set() for a in ids}
    while sum(len(c) for c in contacts.values()) < 2 * edges:
        a, b = rng.sample(ids[:-2], 2)
        contacts[a].add(b)
        contacts[b].add(a)
    contacts[ids[-2]] = {ids[0]}  # a one-contact neighbourhood
    contacts[ids[0]].add(ids[-2])
    return contacts  # ids[-1] has no contacts


def values_for(contacts, seed=1) -> dict[str, float]:
    rng = random.Random(seed)
    return {a: float(rng.random() < 0.5) for a in contacts}


def truth(contacts, values, gone=(), weights=None):
    weights = weights or {}
    return {
        t: sum(values[c] * weights.get(c, {}).get(t, 1.0) for c in cs if c not in gone)
        for t, cs in contacts.items()
    }


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_device_learns_its_weighted_sum(variant: str) -> None:
    contacts = small_graph()
    values = values_for(contacts)
    rng = random.Random(2)
    weights = {c: {t: round(rng.uniform(0.1, 2.0), 3) for t in contacts if c in contacts[t]}
               for c in contacts}
    relay = NeighbourhoodRelay(contacts, variant=variant, run_id="run-a",
                               policy=NeighbourhoodPolicy(min_size=1))
    devices = make_devices(relay, list(contacts))
    for rnd in range(2):
        res = run_round(relay, devices, values, rnd, weights=weights)
        exp = truth(contacts, values, weights=weights)
        for t, cs in contacts.items():
            if not cs:
                assert res[t] is None and relay.outcome[t] is Outcome.EMPTY
            else:
                assert res[t].value == pytest.approx(exp[t], abs=len(cs) * 2.0**-16)
                assert res[t].real_contributors == len(cs)


@pytest.mark.parametrize("variant", VARIANTS)
def test_fleet_and_per_device_agree(variant: str) -> None:
    contacts = small_graph(seed=3)
    values = values_for(contacts, seed=4)
    ids = sorted(contacts)
    pos = {a: i for i, a in enumerate(ids)}
    rows = [sorted(pos[c] for c in contacts[a]) for a in ids]
    indptr = torch.tensor([0] + [len(r) for r in rows]).cumsum(0)
    indices = torch.tensor([c for r in rows for c in r], dtype=torch.int64)
    pol = NeighbourhoodPolicy(min_size=3)
    fleet = FleetNeighbourhoodSum(indptr, indices, variant=variant, policy=pol)
    sums = fleet.step(torch.tensor([values[a] for a in ids])).sums
    relay = NeighbourhoodRelay(contacts, variant=variant, run_id="run-b", policy=pol)
    res = run_round(relay, make_devices(relay, ids), values, 0)
    for a in ids:
        assert (res[a].value if res[a] is not None else 0.0) == float(sums[pos[a]])
        assert int(fleet.step(torch.zeros(len(ids))).outcome[pos[a]]) == int(relay.outcome[a])


@pytest.mark.parametrize("variant", VARIANTS)
def test_below_minimum_pad_or_refuse(variant: str) -> None:
    contacts = small_graph(seed=5)
    values = values_for(contacts, seed=6)
    small = [t for t, cs in contacts.items() if 0 < len(cs) < 3]
    assert small
    relay = NeighbourhoodRelay(contacts, variant=variant, run_id="pad",
                               policy=NeighbourhoodPolicy(min_size=3))
    res = run_round(relay, make_devices(relay, list(contacts)), values, 0)
    exp = truth(contacts, values)
    for t in small:
        assert relay.outcome[t] is Outcome.PADDED and res[t].value == exp[t]
        assert res[t].contributors == 3 and res[t].real_contributors == len(contacts[t])
    relay = NeighbourhoodRelay(contacts, variant=variant, run_id="refuse",
                               policy=NeighbourhoodPolicy(min_size=3, below_minimum="refuse"))
    res = run_round(relay, make_devices(relay, list(contacts)), values, 0)
    for t in small:
        assert relay.outcome[t] is Outcome.REFUSED and res[t] is None


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("phase", [0, 1])
@pytest.mark.parametrize("below", ["refuse", "pad"])
def test_dropouts_are_excluded_cleanly(variant: str, phase: int, below: str) -> None:
    contacts = small_graph(seed=7)
    values = values_for(contacts, seed=8)
    hub = max(contacts, key=lambda a: len(contacts[a]))
    victim = sorted(contacts[hub])[0]
    relay = NeighbourhoodRelay(contacts, variant=variant, run_id="drop",
                               policy=NeighbourhoodPolicy(min_size=2, below_minimum=below))
    res = run_round(relay, make_devices(relay, list(contacts)), values, 0,
                    drop_at={victim: phase})
    dropped = variant == "peer" or phase == 0  # assisted contacts have only phase 0
    gone = {victim} if dropped else set()
    exp = truth(contacts, values, gone=gone)
    assert (victim not in res) == dropped
    for t, r in res.items():
        live = [c for c in contacts[t] if c not in gone]
        if len(live) >= 2 or (below == "pad" and live):
            assert r is not None and r.value == exp[t], t
            assert r.real_contributors == len(live)
        else:
            assert r is None
    if variant == "peer" and dropped:
        assert res[hub].attempt == 1  # aborted and restarted without the victim


def _round_envelopes(variant: str):
    contacts = {"a": {"b", "c", "d"}, "b": {"a", "c", "d"}, "c": {"a", "b"}, "d": {"a", "b"}}
    relay = NeighbourhoodRelay(contacts, variant=variant, run_id="tamper",
                               policy=NeighbourhoodPolicy(min_size=2))
    devices = make_devices(relay, sorted(contacts))
    attempt = relay.begin_round(0, set(contacts))
    for d in devices.values():
        d.keyring.add_peers(relay.public_keys())
    ups = {a: devices[a].start(p, 1.0) for a, p in attempt.plans.items()}
    return relay, devices, attempt, ups


@pytest.mark.parametrize("variant", VARIANTS)
def test_tampered_replayed_misrouted_envelopes_are_rejected(variant: str) -> None:
    relay, devices, attempt, ups = _round_envelopes(variant)
    env = ups["c"][0]
    flipped = bytearray(env.blob)
    flipped[-1] ^= 1
    with pytest.raises(EnvelopeError):
        devices[env.receiver].keyring.open_from(Envelope(env.context, bytes(flipped)))
    # misrouted: delivered to someone else
    other = next(a for a in devices if a not in (env.sender, env.receiver))
    with pytest.raises(UnexpectedMessageError):
        devices[other].keyring.open_from(env)
    # context rewritten by the relay (e.g. replay into another round): authentication fails
    moved = Envelope(type(env.context)(env.context.protocol, env.context.run_id, 5,
                                       env.context.step, env.sender, env.receiver), env.blob)
    with pytest.raises(EnvelopeError):
        devices[env.receiver].keyring.open_from(moved)
    # the relay refuses uploads claiming another sender or addressed outside the plan
    with pytest.raises(UnexpectedMessageError):
        attempt.route_phase1({**ups, "d": ups["c"]})


@pytest.mark.parametrize("variant", VARIANTS)
def test_replay_from_previous_round_is_rejected(variant: str) -> None:
    contacts = small_graph(seed=9)
    values = values_for(contacts)
    relay = NeighbourhoodRelay(contacts, variant=variant, run_id="replay",
                               policy=NeighbourhoodPolicy(min_size=1))
    devices = make_devices(relay, list(contacts))
    att = relay.begin_round(0, set(contacts))
    for d in devices.values():
        d.keyring.add_peers(relay.public_keys())
    old = {a: devices[a].start(p, values[a]) for a, p in att.plans.items()}
    deliveries = att.route_phase1(old)
    # finish round 0 honestly
    if variant == "peer":
        ups = {a: devices[a].on_shares(d.envelopes, d.aborted) for a, d in deliveries.items()}
        for a, d in att.route_phase2(ups).items():
            devices[a].on_partials(d.envelopes, d.aborted)
    else:
        for a, d in deliveries.items():
            devices[a].on_masked(d.envelopes, d.mask_sum)
    att1 = relay.begin_round(1, set(contacts))
    new = {a: devices[a].start(p, values[a]) for a, p in att1.plans.items()}
    with pytest.raises(UnexpectedMessageError):
        att1.route_phase1({**new, "d00": old["d00"]})
    # a device also rejects an old envelope slipped into its inbox
    target = old["d00"][0].receiver
    if variant == "peer":
        d1 = att1.route_phase1(new)
        with pytest.raises(UnexpectedMessageError):
            devices[target].on_shares(d1[target].envelopes + (old["d00"][0],), ())
    else:
        d1 = att1.route_phase1(new)
        with pytest.raises(UnexpectedMessageError):
            devices[target].on_masked(d1[target].envelopes + (old["d00"][0],),
                                      d1[target].mask_sum)


def test_inflated_partial_is_detected_by_the_range_check() -> None:
    """A malicious holder adds 2^40 to its (correctly sealed) partial: the target refuses."""
    relay, devices, attempt, ups = _round_envelopes("peer")
    deliveries = attempt.route_phase1(ups)
    up2 = {a: devices[a].on_shares(d.envelopes, d.aborted) for a, d in deliveries.items()}
    cheat = devices["c"]
    forged = []
    for env in up2["c"]:  # c seals a forged partial under its real pair key
        forged.append(cheat.keyring.seal_to(env.context, encode_element(1 << 40)))
    up2["c"] = forged
    routed = attempt.route_phase2(up2)
    with pytest.raises(NeighbourSumOutOfRangeError):
        devices["a"].on_partials(routed["a"].envelopes, routed["a"].aborted)


def test_assisted_lying_contact_is_detected_by_the_range_check() -> None:
    relay, devices, attempt, ups = _round_envelopes("assisted")
    env = next(e for e in ups["c"] if e.receiver == "a")
    ups["c"] = [e for e in ups["c"] if e.receiver != "a"] + [
        devices["c"].keyring.seal_to(env.context, encode_element(-(1 << 30)))
    ]
    routed = attempt.route_phase1(ups)
    with pytest.raises(NeighbourSumOutOfRangeError):
        devices["a"].on_masked(routed["a"].envelopes, routed["a"].mask_sum)


def test_wrong_phase_and_missing_messages() -> None:
    relay, devices, attempt, ups = _round_envelopes("peer")
    with pytest.raises(ProtocolStateError):
        devices["a"].on_partials((), False)
    with pytest.raises(ProtocolStateError):
        devices["a"].start(attempt.plans["a"], 1.0)
    deliveries = attempt.route_phase1(ups)
    short = deliveries["a"].envelopes[:-1]
    with pytest.raises(MissingMessageError):
        devices["a"].on_shares(short, deliveries["a"].aborted)
    with pytest.raises(ProtocolStateError):
        attempt.route_phase1(ups)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_payload_parsers_reject_garbage_cleanly(buf: bytes) -> None:
    for parse in (decode_tagged, decode_element, decode_mask_sum):
        try:
            parse(buf)
        except MalformedMessageError:
            pass


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.text(max_size=20), st.integers(-(2**63), 2**63 - 1)),
                max_size=20, unique_by=lambda e: e[0]))
def test_tagged_payload_round_trip(entries) -> None:
    buf = encode_tagged(entries)
    assert decode_tagged(buf) == entries
    with pytest.raises(MalformedMessageError):
        decode_tagged(buf + b"\x00")
    if entries:
        with pytest.raises(MalformedMessageError):
            decode_tagged(buf[:-1])


@pytest.mark.parametrize("variant", VARIANTS)
def test_optional_noise_per_device(variant: str) -> None:
    contacts = {"t": {f"c{k}" for k in range(6)}} | {f"c{k}": {"t"} for k in range(6)}
    values = {a: (1.0 if a in ("c0", "c1", "c2") else 0.0) for a in contacts}
    pol = NeighbourhoodPolicy(min_size=1, noise_scale=0.3, noise_bound=1.0)
    relay = NeighbourhoodRelay(contacts, variant=variant, run_id="noise", policy=pol)
    devices = make_devices(relay, sorted(contacts))
    got = [run_round(relay, devices, values, r)["t"].value for r in range(40)]
    assert all(2.0 <= v <= 4.0 for v in got)
    assert len(set(got)) > 30  # fresh noise every round
    assert abs(sum(got) / len(got) - 3.0) < 0.25


@pytest.mark.parametrize("variant", VARIANTS)
def test_wire_forms_round_trip_through_bytes_and_dicts(variant: str) -> None:
    """A round where every envelope and plan crosses the 'transport' as bytes / JSON dicts."""
    import json

    from protocols.neighbourhood import AgentPlan

    contacts = small_graph(seed=11)
    values = values_for(contacts, seed=12)
    relay = NeighbourhoodRelay(contacts, variant=variant, run_id="wire",
                               policy=NeighbourhoodPolicy(min_size=2))
    devices = make_devices(relay, list(contacts))

    def wire(envs):
        return [Envelope.from_bytes(e.to_bytes()) for e in envs]

    att = relay.begin_round(0, set(contacts))
    plans = {a: AgentPlan.from_dict(json.loads(json.dumps(p.to_dict())))
             for a, p in att.plans.items()}
    assert plans == att.plans
    for d in devices.values():
        d.keyring.add_peers(relay.public_keys())
    ups = {a: wire(devices[a].start(p, values[a])) for a, p in plans.items()}
    d1 = att.route_phase1(ups)
    exp = truth(contacts, values)
    if variant == "peer":
        ups2 = {a: wire(devices[a].on_shares(wire(d.envelopes), d.aborted))
                for a, d in d1.items()}
        res = {a: devices[a].on_partials(wire(d.envelopes), d.aborted)
               for a, d in att.route_phase2(ups2).items()}
    else:
        res = {a: devices[a].on_masked(wire(d.envelopes),
                                       None if d.mask_sum is None else wire([d.mask_sum])[0])
               for a, d in d1.items()}
    for t, r in res.items():
        if r is not None:
            assert r.value == exp[t]
    assert sum(r is not None for r in res.values()) >= len(contacts) - 3


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=120))
def test_envelope_parser_rejects_garbage_cleanly(buf: bytes) -> None:
    for data in (buf, b"NBE1" + buf):
        try:
            Envelope.from_bytes(data)
        except MalformedMessageError:
            pass


def test_same_envelope_twice_is_a_replay() -> None:
    from protocols.envelope import ReplayedEnvelopeError

    relay, devices, attempt, ups = _round_envelopes("assisted")
    env = ups["c"][0]
    devices[env.receiver].keyring.open_from(env)
    with pytest.raises(ReplayedEnvelopeError):
        devices[env.receiver].keyring.open_from(env)


def test_signed_keys_stop_a_relay_that_substitutes_a_key() -> None:
    from protocols.keys import IdentityKey, SignatureError
    from protocols.neighbourhood.keyring import Keyring

    contacts = {"a": {"b", "c"}, "b": {"a", "c"}, "c": {"a", "b"}}
    relay_id = IdentityKey.generate()
    relay = NeighbourhoodRelay(contacts, variant="peer", run_id="signed", identity=relay_id,
                               policy=NeighbourhoodPolicy(min_size=3))
    ids = {a: IdentityKey.generate() for a in contacts}
    devices = {a: PeerNeighbourhoodAgent(a, "signed", contacts=contacts[a]) for a in contacts}
    for a, dev in devices.items():
        relay.register(a, dev.keyring.public_bytes(), dev.keyring.sign_public(ids[a]),
                       ids[a].public_bytes())
    with pytest.raises(SignatureError):  # a registration signed by someone else
        relay.register("a", devices["a"].keyring.public_bytes(),
                       devices["a"].keyring.sign_public(ids["b"]), ids["a"].public_bytes())
    att = relay.begin_round(0, set(contacts))  # min 3 of 2 contacts: padded with a dummy
    trusted = {a: k.public_bytes() for a, k in ids.items()} | {"relay": relay_id.public_bytes()}
    signed = relay.signed_public_keys()
    assert any(p.startswith("dummy:") for p in signed)
    for dev in devices.values():
        dev.keyring.add_signed_peers(signed, trusted)
    ups = {a: devices[a].start(p, 1.0) for a, p in att.plans.items()}
    d1 = att.route_phase1(ups)
    ups2 = {a: devices[a].on_shares(d.envelopes, d.aborted) for a, d in d1.items()}
    res = {a: devices[a].on_partials(d.envelopes, d.aborted)
           for a, d in att.route_phase2(ups2).items()}
    assert all(r.value == 2.0 for r in res.values())
    # a relay that swaps b's key for one it controls is caught by a fresh device
    mitm = Keyring("b", "signed")
    forged = dict(signed) | {"b": (mitm.public_bytes(), signed["b"][1])}
    with pytest.raises(SignatureError):
        Keyring("z", "signed").add_signed_peers(forged, trusted)


class _CountingKey:
    """An X25519 key that counts its agreements (wraps the real key)."""

    def __init__(self) -> None:
        from protocols.keys import AgreementKey

        self.key, self.exchanges = AgreementKey.generate(), 0

    def public_bytes(self) -> bytes:
        return self.key.public_bytes()

    def exchange(self, peer_public: bytes) -> bytes:
        self.exchanges += 1
        return self.key.exchange(peer_public)


def test_agreed_secrets_carry_over_between_keyrings_and_pin_peer_keys() -> None:
    """A device that rebuilds its keyring per message (the ClientApp) agrees with a contact
    once per run, derives the same keys from the carried-over secret, and refuses a contact
    whose key changed between messages (a relay substituting keys later in the run)."""
    from protocols.keys import AgreementKey
    from protocols.neighbourhood import Keyring
    from protocols.neighbourhood.errors import UnexpectedMessageError

    peer = AgreementKey.generate()
    key = _CountingKey()
    agreed: dict[str, tuple[bytes, bytes]] = {}
    first = Keyring("a1", "run", key, agreed=agreed)  # type: ignore[arg-type]
    first.add_peers({"a2": peer.public_bytes()})
    k1 = first.pair_key("a2")
    second = Keyring("a1", "run", key, agreed=agreed)  # type: ignore[arg-type]
    second.add_peers({"a2": peer.public_bytes()})
    assert second.pair_key("a2") == k1 and key.exchanges == 1
    fresh = Keyring("a1", "run", key.key)  # nothing carried over: the same key, derived again
    fresh.add_peers({"a2": peer.public_bytes()})
    assert fresh.pair_key("a2") == k1
    third = Keyring("a1", "run", key, agreed=agreed)  # type: ignore[arg-type]
    third.add_peers({"a2": AgreementKey.generate().public_bytes()})  # substituted
    with pytest.raises(UnexpectedMessageError, match="changed within the run"):
        third.pair_key("a2")

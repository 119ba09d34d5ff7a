"""Attacks on the secure neighbourhood sum found by review (issue 13), each pinned as a
test: a relay that lies in the plan, a device that sends garbage, ambiguous statements and
out-of-range envelope fields. Each failed on the code before the fix."""

from __future__ import annotations

import pytest

from protocols.envelope import MessageContext
from protocols.neighbourhood import (
    AgentPlan,
    AssistedNeighbourhoodAgent,
    Envelope,
    MalformedMessageError,
    Neighbourhood,
    NeighbourhoodPolicy,
    NeighbourhoodRelay,
    PeerNeighbourhoodAgent,
)
from protocols.neighbourhood.assisted import mask_for
from protocols.neighbourhood.errors import CulpritError, PlanRejectedError
from protocols.neighbourhood.keyring import key_statement
from protocols.neighbourhood.local import make_devices, run_round
from protocols.neighbourhood.messages import DUMMY_PREFIX, RELAY_ID, decode_element

CONTACTS = {"a": {"b", "c", "d"}, "b": {"a", "c", "d"}, "c": {"a", "b", "d"},
            "d": {"a", "b", "c"}}


def _victim(variant: str, relay: NeighbourhoodRelay, policy: NeighbourhoodPolicy | None = None):
    cls = PeerNeighbourhoodAgent if variant == "peer" else AssistedNeighbourhoodAgent
    dev = cls("a", relay.run_id, contacts=CONTACTS["a"], policy=policy or relay.policy)
    relay.register("a", dev.keyring.public_bytes())
    dev.keyring.add_peers(relay.public_keys())
    return dev


def _relay(variant: str, **kw: object) -> NeighbourhoodRelay:
    return NeighbourhoodRelay(CONTACTS, variant=variant, run_id="atk", **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("variant", ["peer", "assisted"])
@pytest.mark.parametrize("target", [RELAY_ID, f"{DUMMY_PREFIX}x:0"])
def test_relay_cannot_name_itself_or_a_dummy_as_target(variant: str, target: str) -> None:
    """The relay plans a one-member neighbourhood whose target it controls; a device that
    served it would hand the relay its status (assisted: masked with a mask the relay
    knows; peer: the whole value as the only 'share')."""
    relay = _relay(variant, policy=NeighbourhoodPolicy(min_size=1))
    dev = _victim(variant, relay)
    plan = AgentPlan(0, 0, None, (Neighbourhood(target, ("a",), 1),))
    try:
        envs = dev.start(plan, 1.0)
    except PlanRejectedError:
        return
    # the device served the plan: show what the relay reads
    if variant == "assisted" and target == RELAY_ID:
        env = envs[0]
        masked = decode_element(relay.keyring.open_from(env))
        leaked = masked - mask_for(relay.keyring, "a", env.context)
        pytest.fail(f"relay read the device's status: {leaked / 2**16}")
    pytest.fail("device served a target controlled by the relay")


@pytest.mark.parametrize("variant", ["peer", "assisted"])
def test_device_serves_only_its_own_contacts(variant: str) -> None:
    relay = _relay(variant, policy=NeighbourhoodPolicy(min_size=1))
    dev = _victim(variant, relay)
    plan = AgentPlan(0, 0, None, (Neighbourhood("z", ("a", "b", "c"), 3),))
    with pytest.raises(PlanRejectedError, match="not one of this device's contacts"):
        dev.start(plan, 1.0)


@pytest.mark.parametrize("variant", ["peer", "assisted"])
@pytest.mark.parametrize(
    "hood,policy",
    [
        (Neighbourhood("b", ("a",), 1), NeighbourhoodPolicy(min_size=3)),  # one member
        (Neighbourhood("b", ("a", "c"), 2), NeighbourhoodPolicy(min_size=3)),
        (Neighbourhood("b", ("a", "c", "d"), 1), NeighbourhoodPolicy(min_size=3)),  # size lie
        (Neighbourhood("b", ("a", f"{DUMMY_PREFIX}b:0", f"{DUMMY_PREFIX}b:1"), 1),
         NeighbourhoodPolicy(min_size=3, below_minimum="refuse")),  # padded under REFUSE
        (Neighbourhood("b", ("a", RELAY_ID, "c"), 3), NeighbourhoodPolicy(min_size=3)),
    ],
)
def test_rosters_below_the_policy_are_refused(variant: str, hood: Neighbourhood,
                                              policy: NeighbourhoodPolicy) -> None:
    relay = _relay(variant, policy=policy)
    dev = _victim(variant, relay, policy)
    with pytest.raises(PlanRejectedError):
        dev.start(AgentPlan(0, 0, None, (hood,)), 1.0)


def test_own_roster_of_strangers_is_refused() -> None:
    relay = _relay("peer")
    dev = _victim("peer", relay)
    with pytest.raises(PlanRejectedError, match="non-contacts"):
        dev.start(AgentPlan(0, 0, Neighbourhood("a", ("x", "y", "z"), 3), ()), 1.0)


@pytest.mark.parametrize("variant", ["peer", "assisted"])
def test_device_without_a_contact_list_serves_nobody(variant: str) -> None:
    relay = _relay(variant)
    cls = PeerNeighbourhoodAgent if variant == "peer" else AssistedNeighbourhoodAgent
    dev = cls("a", "atk")
    with pytest.raises(PlanRejectedError):
        dev.start(AgentPlan(0, 0, None, (Neighbourhood("b", ("a", "c", "d"), 3),)), 1.0)
    del relay


def test_garbage_share_bundle_names_and_excludes_the_sender_not_the_receiver() -> None:
    """Device 'd' sends a garbage bundle to 'a'. Before: 'a' raised and lost the round while
    'd' stayed anonymous. Now 'a' names 'd', keeps serving, the relay retries without 'd',
    and every other device gets the exact sum over the remaining contacts."""
    contacts = {x: {y for y in "abcdef" if y != x} for x in "abcdef"}
    relay = NeighbourhoodRelay(contacts, variant="peer", run_id="garbage",
                               policy=NeighbourhoodPolicy(min_size=3))
    devices = make_devices(relay, list(contacts))
    bad = devices["d"]
    honest_start = bad.start

    def garbage_start(plan, value, **kw):  # type: ignore[no-untyped-def]
        envs = honest_start(plan, value, **kw)
        return [Envelope(e.context, bytes(len(e.blob))) if e.receiver == "a" else e
                for e in envs]

    bad.start = garbage_start  # type: ignore[method-assign]
    values = {x: float(i % 2) for i, x in enumerate("abcdef")}
    res = run_round(relay, devices, values, 0)
    assert res["a"] is not None  # the victim got its sum
    for t, r in res.items():
        assert r is not None
        # a's and d's own sums never needed a bundle from d to a: they complete at once;
        # the neighbourhoods where a holds d's shares are retried without d
        keep_d = t in ("a", "d")
        exp = sum(values[c] for c in contacts[t] if keep_d or c != "d")
        assert r.value == pytest.approx(exp, abs=1e-3), t
        assert r.real_contributors == len(contacts[t]) - (0 if keep_d else 1)


def test_garbage_bundle_culprit_is_recorded_by_the_relay() -> None:
    contacts = {x: {y for y in "abcde" if y != x} for x in "abcde"}
    relay = NeighbourhoodRelay(contacts, variant="peer", run_id="g2",
                               policy=NeighbourhoodPolicy(min_size=3))
    devices = make_devices(relay, list(contacts))
    att = relay.begin_round(0, set(contacts))
    for d in devices.values():
        d.keyring.add_peers(relay.public_keys())
    ups = {a: devices[a].start(p, 1.0) for a, p in att.plans.items()}
    ups["e"] = [Envelope(x.context, x.blob[:-1] + bytes([x.blob[-1] ^ 1])) for x in ups["e"]]
    d1 = att.route_phase1(ups)
    up2 = {a: devices[a].on_shares(d.envelopes, d.aborted) for a, d in d1.items()}
    complaints = {a: devices[a].complaints for a in up2 if devices[a].complaints}
    assert set(complaints) == set("abcd") and all(c[0][0] == "e" for c in complaints.values())
    att.route_phase2(up2, complaints)
    assert set(att.culprits) == {"e"}
    nxt = att.retry()
    assert nxt is not None and "e" not in nxt.plans


def test_assisted_garbage_contribution_names_its_sender() -> None:
    contacts = {x: {y for y in "abcd" if y != x} for x in "abcd"}
    relay = NeighbourhoodRelay(contacts, variant="assisted", run_id="g3")
    devices = make_devices(relay, list(contacts))
    att = relay.begin_round(0, set(contacts))
    for d in devices.values():
        d.keyring.add_peers(relay.public_keys())
    ups = {a: devices[a].start(p, 1.0) for a, p in att.plans.items()}
    ups["b"] = [Envelope(x.context, bytes(len(x.blob))) if x.receiver == "a" else x
                for x in ups["b"]]
    d1 = att.route_phase1(ups)
    with pytest.raises(CulpritError) as info:
        devices["a"].on_masked(d1["a"].envelopes, d1["a"].mask_sum)
    assert info.value.culprit == "b"
    assert devices["c"].on_masked(d1["c"].envelopes, d1["c"].mask_sum).value == 3.0


def test_key_statement_is_unambiguous() -> None:
    pk = bytes(range(32))
    assert key_statement("run\0a", "b", pk) != key_statement("run", "a\0b", pk)
    assert key_statement("ru", "na", pk) != key_statement("run", "a", pk)


@pytest.mark.parametrize("field", ["round", "step"])
def test_envelope_round_or_step_beyond_2_63_is_a_project_error(field: str) -> None:
    ctx = MessageContext("lpm-nbhd-peer/1", "r", 1, 1, "a", "b")
    raw = bytearray(Envelope(ctx, b"x" * 30).to_bytes())
    # the two u64 fields sit right after the four length-prefixed ids
    pos = 4 + sum(2 + len(s) for s in ("lpm-nbhd-peer/1", "r", "a", "b"))
    off = pos if field == "round" else pos + 8
    raw[off : off + 8] = (2**63).to_bytes(8, "little")
    with pytest.raises(MalformedMessageError):
        Envelope.from_bytes(bytes(raw))
    with pytest.raises(MalformedMessageError):
        AgentPlan.from_dict({"round": 2**63, "attempt": 0, "own": None, "memberships": []})
    with pytest.raises(MalformedMessageError):
        AgentPlan.from_dict({"round": 0, "attempt": 2**62, "own": None, "memberships": []})


def test_holder_inflation_within_range_is_undetected_documented_limit() -> None:
    """A holder that adds δ to its partial shifts the target's sum; within [0, Σw] nobody
    can tell (integrity, not privacy: docs/threat-model.md). Out of range it is caught and
    the error lists the parties that could have done it."""
    from protocols.neighbourhood import NeighbourSumOutOfRangeError
    from protocols.neighbourhood.messages import encode_element

    contacts = {x: {y for y in "abcd" if y != x} for x in "abcd"}
    for delta, detected in ((1.0, False), (10.0, True)):
        relay = NeighbourhoodRelay(contacts, variant="peer", run_id=f"inf{delta}",
                                   policy=NeighbourhoodPolicy(min_size=3))
        devices = make_devices(relay, list(contacts))
        att = relay.begin_round(0, set(contacts))
        for d in devices.values():
            d.keyring.add_peers(relay.public_keys())
        ups = {a: devices[a].start(p, 0.0) for a, p in att.plans.items()}
        d1 = att.route_phase1(ups)
        up2 = {a: devices[a].on_shares(d.envelopes, d.aborted) for a, d in d1.items()}
        # holder b re-seals a shifted partial for target a (it holds the pair key)
        env = next(e for e in up2["b"] if e.receiver == "a")
        part = decode_element(devices["a"].keyring.open_from(env)) + int(delta * 2**16)
        devices["a"].keyring._guard = type(devices["a"].keyring._guard)()
        up2["b"] = [devices["b"].keyring.seal_to(env.context, encode_element(part))
                    if e.receiver == "a" else e for e in up2["b"]]
        d2 = att.route_phase2(up2)
        if detected:
            with pytest.raises(NeighbourSumOutOfRangeError, match="partials came from"):
                devices["a"].on_partials(d2["a"].envelopes, d2["a"].aborted)
        else:
            r = devices["a"].on_partials(d2["a"].envelopes, d2["a"].aborted)
            assert r is not None and r.value == pytest.approx(delta)


def _count_exchanges(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    from protocols.keys import AgreementKey

    calls = [0]
    real = AgreementKey.exchange

    def counted(self: AgreementKey, peer_public: bytes) -> bytes:
        calls[0] += 1
        return real(self, peer_public)

    monkeypatch.setattr(AgreementKey, "exchange", counted)
    return calls


def test_party_keys_are_the_keys_each_side_agrees_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """The coordinator's own agents (relay, a proxy) share their pairwise keys through the
    relay's ``PartyKeys``: each key equals what the keyring computes on its own (and what
    the other side gets), and the pair's X25519 agreement runs once instead of twice."""
    from protocols.neighbourhood import Keyring, PartyKeys

    relay = _relay("assisted")
    proxy = Keyring("p", "atk", party=relay.party)
    relay.keyring.add_peers({"p": proxy.public_bytes()})
    proxy.add_peers({RELAY_ID: relay.keyring.public_bytes()})
    calls = _count_exchanges(monkeypatch)
    got = (proxy.mask_key(RELAY_ID), relay.keyring.mask_key("p"), proxy.pair_key(RELAY_ID),
           relay.keyring.pair_key("p"))
    assert calls[0] == 1
    alone_proxy = Keyring("p", "atk", proxy._key)  # the same keys, no party
    alone_relay = Keyring(RELAY_ID, "atk", relay.keyring._key)
    alone_proxy.add_peers({RELAY_ID: relay.keyring.public_bytes()})
    alone_relay.add_peers({"p": proxy.public_bytes()})
    assert got == (alone_proxy.mask_key(RELAY_ID), alone_relay.mask_key("p"),
                   alone_proxy.pair_key(RELAY_ID), alone_relay.pair_key("p"))
    assert len(set(got)) == 2  # mask root and envelope key differ
    assert not PartyKeys().is_member(proxy.public_bytes())


def test_party_keys_serve_no_outsider(monkeypatch: pytest.MonkeyPatch) -> None:
    """A device that registers a coordinator proxy's public key as its own (public keys
    are public) gets nothing from the coordinator's ``PartyKeys``: the relay's keys for it
    are bound to its own name (they differ from the proxy's) and are what the relay would
    compute without the party; a device's keys with a member are never stored there."""
    from protocols.neighbourhood import Keyring

    relay = _relay("assisted")
    proxy = Keyring("p", "atk", party=relay.party)
    relay.keyring.add_peers({"p": proxy.public_bytes(), "a": proxy.public_bytes()})
    alone = Keyring(RELAY_ID, "atk", relay.keyring._key)
    alone.add_peers({"a": proxy.public_bytes()})
    assert relay.keyring.pair_key("a") == alone.pair_key("a")
    assert relay.keyring.pair_key("a") != relay.keyring.pair_key("p")
    device = AssistedNeighbourhoodAgent("b", "atk")
    device.keyring.add_peers({RELAY_ID: relay.keyring.public_bytes()})
    relay.keyring.add_peers({"b": device.keyring.public_bytes()})
    stored = dict(relay.party._keys)
    calls = _count_exchanges(monkeypatch)
    assert relay.keyring.pair_key("b") == device.keyring.pair_key(RELAY_ID)
    assert calls[0] == 2 and relay.party._keys == stored  # each side agreed on its own


def test_dummy_mask_roots_are_random_and_kept_by_the_relay() -> None:
    """A relay-run dummy's mask root is a fresh CSPRNG key, not an X25519 agreement with
    the relay (both are the relay): the relay sums the masks its dummies kept, so padded
    neighbourhoods still decode exactly (``run_round`` checks every sum)."""
    relay = NeighbourhoodRelay({"a": ["b"], "b": ["a"]}, variant="assisted", run_id="atk",
                               policy=NeighbourhoodPolicy(min_size=3))
    devices = make_devices(relay, ["a", "b"])
    sums = run_round(relay, devices, {"a": 1.0, "b": 0.0}, 0)
    assert sums["a"].value == pytest.approx(0.0) and sums["b"].value == pytest.approx(1.0)
    dummies = list(relay._dummies.values())
    assert len(dummies) == 4
    roots = {d.keyring.mask_key(RELAY_ID) for d in dummies}
    assert len(roots) == 4
    for d in dummies:  # not derivable from the dummy's and the relay's public keys
        d.keyring.add_peers({RELAY_ID: relay.keyring.public_bytes()})
        alone = type(d.keyring)(d.agent_id, "atk", d.keyring._key)
        alone.add_peers({RELAY_ID: relay.keyring.public_bytes()})
        assert alone.mask_key(RELAY_ID) not in roots


def test_party_proxies_leave_their_masks_to_the_relay(monkeypatch: pytest.MonkeyPatch) -> None:
    """Agents the coordinator runs itself (proxies in the relay's party) hand their
    phase-1 masks to the relay instead of the relay deriving them again: the sums are exact,
    the relay derives masks for the real devices only, and no kept mask outlives its
    round. A device's upload never finds a kept mask (its context names itself)."""
    import protocols.neighbourhood.relay as relay_mod
    from protocols.neighbourhood import Keyring

    contacts = {"a": ["p", "q", "b"], "b": ["a", "p", "q"], "p": ["a", "b", "q"],
                "q": ["a", "b", "p"]}
    relay = NeighbourhoodRelay(contacts, variant="assisted", run_id="atk")
    devices = make_devices(relay, ["a", "b"])
    for name in ("p", "q"):
        agent = AssistedNeighbourhoodAgent(name, "atk", contacts=contacts[name],
                                           keyring=Keyring(name, "atk", party=relay.party))
        relay.register(name, agent.keyring.public_bytes())
        devices[name] = agent
    derived_for: list[str] = []
    real = relay_mod.mask_for

    def counting(keyring: object, contact: str, context: MessageContext) -> int:
        derived_for.append(contact)
        return real(keyring, contact, context)  # type: ignore[arg-type]

    monkeypatch.setattr(relay_mod, "mask_for", counting)
    values = {"a": 1.0, "b": 0.0, "p": 1.0, "q": 1.0}
    for rnd in range(2):
        sums = run_round(relay, devices, values, rnd)
        for t, cs in contacts.items():
            res = sums[t]
            assert res is not None and res.value == pytest.approx(sum(values[c] for c in cs))
        assert relay.party._masks == {}
    assert sorted(set(derived_for)) == ["a", "b"]


def test_two_rounds_in_flight_share_the_dummies_correctly() -> None:
    """The fleet plans the value round and the tangent round of a day before routing
    either (the same relay, so the same padding dummies): the relay runs the first round's
    dummies in the background and the second's only once the first is routed — each round's
    mask sums use that round's masks (running both early broke the second round)."""
    contacts = {"a": ["b"], "b": ["a"]}
    relay = NeighbourhoodRelay(contacts, variant="assisted", run_id="atk",
                               policy=NeighbourhoodPolicy(min_size=3))
    first = make_devices(relay, ["a", "b"])
    second = {n: AssistedNeighbourhoodAgent(n, "atk", keyring=d.keyring, contacts=contacts[n])
              for n, d in first.items()}
    att = [relay.begin_round(r, {"a", "b"}) for r in (0, 1)]
    values = [{"a": 1.0, "b": 0.0}, {"a": 0.5, "b": 1.0}]
    for r, devices in enumerate((first, second)):
        for name, plan in att[r].plans.items():
            devices[name].keyring.add_peers(relay.keys_for(plan))
        up = {n: devices[n].start(p, values[r][n]) for n, p in att[r].plans.items()}
        out = att[r].route_phase1(up)
        got = {n: devices[n].on_masked(d.envelopes, d.mask_sum) for n, d in out.items()}
        assert got["a"] is not None and got["a"].value == pytest.approx(values[r]["b"])
        assert got["b"] is not None and got["b"].value == pytest.approx(values[r]["a"])

"""Coordinator side of the neighbourhood sum: plans rosters, applies the size and dropout
policy, runs the dummy contacts used for padding, routes sealed envelopes it cannot open and,
in the assisted variant, sends each target the sum of the masks it forwarded.

Message flow of one round (both variants; the transport is the caller's, e.g. Flower):

1. ``attempt = relay.begin_round(round, online)``; every online device gets
   ``attempt.plans[id]`` and ``relay.keys_for(plan)``: the keys of the parties its plan
   names (relay, roster, targets; dummies included), O(degree), never every key of the run.
2. Every device uploads ``agent.start(plan, I_j)`` (possibly an empty list: liveness).
   ``attempt.route_phase1(uploads)`` returns per device what to deliver:
   peer -> :class:`ShareDelivery` (``agent.on_shares``), assisted ->
   :class:`MaskedDelivery` (``agent.on_masked``; done).
3. Peer only: devices upload ``agent.on_shares(...)``; ``attempt.route_phase2(uploads)``
   returns :class:`PartialDelivery` per device (``agent.on_partials``).
4. Peer only: ``attempt.retry()`` gives the next attempt (fresh shares, survivors only) for
   neighbourhoods aborted by a dropout, or ``None``.
A device missing from an upload mapping has dropped for the rest of the round.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

from protocols.envelope import MessageContext
from protocols.keys import IdentityKey, verify_signature
from protocols.neighbourhood.assisted import AssistedNeighbourhoodAgent, mask_for
from protocols.neighbourhood.device import wrap64
from protocols.neighbourhood.errors import (
    NeighbourhoodError,
    ProtocolStateError,
    UnexpectedMessageError,
)
from protocols.neighbourhood.keyring import Keyring, PartyKeys, key_statement
from protocols.neighbourhood.messages import (
    ASSISTED_PROTOCOL,
    DUMMY_PREFIX,
    PEER_PROTOCOL,
    RELAY_ID,
    STEP_MASKED,
    STEP_MASKSUM,
    STEP_PARTIALS,
    STEP_SHARES,
    AgentPlan,
    Envelope,
    Neighbourhood,
    encode_mask_sum,
    step_number,
)
from protocols.neighbourhood.noise import discrete_laplace
from protocols.neighbourhood.peer import PeerNeighbourhoodAgent
from protocols.neighbourhood.policy import NeighbourhoodPolicy, Outcome, Variant
from protocols.ring import FixedPointRing

NeighbourhoodAgent = AssistedNeighbourhoodAgent | PeerNeighbourhoodAgent


def peer(agent: NeighbourhoodAgent) -> PeerNeighbourhoodAgent:
    """``agent`` as the peer variant (phases 2 and 3 exist only there)."""
    if not isinstance(agent, PeerNeighbourhoodAgent):
        raise NeighbourhoodError(f"{agent.agent_id} is not a peer-variant agent")
    return agent


def assisted(agent: NeighbourhoodAgent) -> AssistedNeighbourhoodAgent:
    """``agent`` as the assisted variant (the masked delivery exists only there)."""
    if not isinstance(agent, AssistedNeighbourhoodAgent):
        raise NeighbourhoodError(f"{agent.agent_id} is not an assisted-variant agent")
    return agent

__all__ = [
    "MaskedDelivery",
    "NeighbourhoodRelay",
    "PartialDelivery",
    "RelayAttempt",
    "ShareDelivery",
    "plan_parties",
]

NOISE_PREFIX = DUMMY_PREFIX + "noise:"


@dataclass(frozen=True)
class ShareDelivery:
    """Peer phase-1 delivery: share bundles for the device and the aborted targets."""

    envelopes: tuple[Envelope, ...]
    aborted: frozenset[str]


@dataclass(frozen=True)
class PartialDelivery:
    """Peer phase-2 delivery: partials of the device's neighbourhood, or aborted."""

    envelopes: tuple[Envelope, ...]
    aborted: bool


@dataclass(frozen=True)
class MaskedDelivery:
    """Assisted delivery: forwarded contributions and the mask sum (``None``: refused)."""

    envelopes: tuple[Envelope, ...]
    mask_sum: Envelope | None


class NeighbourhoodRelay:
    """Relay (coordinator) for one run. ``contacts`` maps each target to its contacts."""

    def __init__(
        self,
        contacts: Mapping[str, Sequence[str]],
        *,
        variant: Variant | str,
        run_id: str,
        policy: NeighbourhoodPolicy | None = None,
        ring: FixedPointRing | None = None,
        identity: IdentityKey | None = None,
    ) -> None:
        self.variant = Variant(variant)
        self.identity = identity
        self._signatures: dict[str, bytes] = {}
        self.run_id = run_id
        self.policy = policy or NeighbourhoodPolicy()
        self.ring = ring or FixedPointRing()
        self.contacts = {t: tuple(sorted(set(cs))) for t, cs in contacts.items()}
        for t, cs in self.contacts.items():
            if t in cs or any(c.startswith(DUMMY_PREFIX) or c == RELAY_ID for c in cs):
                raise NeighbourhoodError(f"invalid contact list for {t!r}")
        #: the coordinator's pairwise keys among its own agents (relay, dummies, and the
        #: proxies a caller builds with ``Keyring(..., party=relay.party)``): agreed once
        self.party = PartyKeys()
        self.keyring = Keyring(RELAY_ID, run_id, party=self.party)
        self._public: dict[str, bytes] = {}
        self._publish(RELAY_ID, self.keyring)
        self._dummies: dict[str, NeighbourhoodAgent] = {}
        #: the attempt whose dummies have started and not finished (their state machines
        #: are shared by every round: a second round's dummies must wait for it)
        self._dummies_busy: RelayAttempt | None = None
        self.outcome: dict[str, Outcome] = {}

    @property
    def protocol(self) -> str:
        return PEER_PROTOCOL if self.variant is Variant.PEER else ASSISTED_PROTOCOL

    def _publish(self, ident: str, keyring: Keyring) -> None:
        self._public[ident] = keyring.public_bytes()
        if self.identity is not None:
            self._signatures[ident] = keyring.sign_public(self.identity)

    def register(
        self,
        agent_id: str,
        public_key: bytes,
        signature: bytes | None = None,
        identity_public: bytes | None = None,
    ) -> None:
        """Record a device's X25519 public key. With ``identity_public`` (the device's
        Ed25519 key, from the app's enrolment) the ``signature`` over the key statement is
        verified (``SignatureError`` otherwise) and kept for :meth:`signed_public_keys`."""
        if agent_id == RELAY_ID or agent_id.startswith(DUMMY_PREFIX):
            raise NeighbourhoodError(f"reserved identifier {agent_id!r}")
        if identity_public is not None:
            if signature is None:
                raise NeighbourhoodError(f"{agent_id!r}: identity given without a signature")
            verify_signature(identity_public, signature,
                             key_statement(self.run_id, agent_id, public_key))
        if signature is not None:
            self._signatures[agent_id] = bytes(signature)
        self._public[agent_id] = bytes(public_key)
        self.keyring.add_peers({agent_id: public_key})

    def public_keys(self) -> dict[str, bytes]:
        """Public keys of every party (devices, dummies, relay) to hand to devices."""
        return dict(self._public)

    def keys_for(self, plan: AgentPlan) -> dict[str, bytes]:
        """The public keys an agent needs for ``plan`` (:func:`plan_parties`): what to hand a
        device with its plan, O(degree) instead of :meth:`public_keys`' O(N)."""
        return {p: self._public[p] for p in plan_parties(plan) if p in self._public}

    def signed_public_keys(self) -> dict[str, tuple[bytes, bytes]]:
        """``{party: (public key, signature)}`` for :meth:`Keyring.add_signed_peers`; the
        relay's own and its dummies' keys are signed with the relay's ``identity``."""
        missing = sorted(set(self._public) - set(self._signatures))
        if missing:
            raise NeighbourhoodError(f"no signature for the keys of {missing}")
        return {p: (k, self._signatures[p]) for p, k in self._public.items()}

    def _dummy(self, ident: str) -> NeighbourhoodAgent:
        dev = self._dummies.get(ident)
        if dev is None:
            cls: type[NeighbourhoodAgent] = PeerNeighbourhoodAgent \
                if self.variant is Variant.PEER else AssistedNeighbourhoodAgent
            keyring = Keyring(ident, self.run_id, party=self.party)
            if cls is AssistedNeighbourhoodAgent:  # its masks: the relay keeps them
                keyring.use_random_mask_root(RELAY_ID)
            dev = cls(ident, self.run_id, keyring=keyring, ring=self.ring, policy=self.policy,
                      relay_run=True)
            self._dummies[ident] = dev
            self._publish(ident, dev.keyring)
            self.keyring.add_peers({ident: dev.keyring.public_bytes()})
        return dev

    def sample_noise(self) -> int:
        """One noise value in ring units (0 unless the policy asks for noise)."""
        if not self.policy.noisy:
            return 0
        return int(discrete_laplace(os.urandom(32), 1, self.policy.noise_scale,
                                    self.policy.effective_noise_bound, self.ring.frac_bits)[0])

    def begin_round(self, round: int, online: Collection[str]) -> RelayAttempt:
        """Plan attempt 0 of ``round`` for the ``online`` devices; the relay-run dummies'
        messages are computed in the background from here on (:meth:`RelayAttempt.
        run_dummies_now`), while the caller sends the plans and waits for the uploads."""
        online = frozenset(online)
        unknown = online - set(self._public)
        if unknown:
            raise NeighbourhoodError(f"devices without a registered key: {sorted(unknown)}")
        attempt = self._plan(round, 0, online, [t for t in self.contacts if t in online])
        attempt.run_dummies_now()
        return attempt

    def _plan(
        self, rnd: int, attempt: int, alive: frozenset[str], targets: Sequence[str]
    ) -> RelayAttempt:
        hoods: dict[str, Neighbourhood] = {}
        for t in targets:
            live = [c for c in self.contacts[t] if c in alive]
            if not live:
                self.outcome[t] = Outcome.EMPTY
                continue
            if self.policy.refuses(len(live)):
                self.outcome[t] = Outcome.REFUSED
                continue
            pad = [f"{DUMMY_PREFIX}{t}:{k}" for k in range(self.policy.padding_needed(len(live)))]
            self.outcome[t] = Outcome.PADDED if pad else Outcome.OK
            if self.policy.noisy and self.variant is Variant.PEER:
                pad.append(f"{NOISE_PREFIX}{t}")  # relay-run member sharing the noise
            for d in pad:
                self._dummy(d)
            hoods[t] = Neighbourhood(t, tuple(live + pad), len(live))
        members: dict[str, list[Neighbourhood]] = {}
        for nb in hoods.values():
            for c in nb.roster:
                members.setdefault(c, []).append(nb)
        dummies = [d for d in members if d in self._dummies]
        for d in dummies:  # a dummy gets the keys it uses only: O(degree), not O(N) (issue 12)
            self._dummies[d].keyring.add_peers(
                self.keys_for(AgentPlan(rnd, attempt, None, tuple(members[d]))))
        parties = set(alive) if attempt == 0 else set(members) | set(hoods)
        plans = {
            a: AgentPlan(rnd, attempt, hoods.get(a), tuple(members.get(a, ())))
            for a in sorted(parties | set(dummies))
        }
        return RelayAttempt(self, rnd, attempt, alive, hoods, plans)


def plan_parties(plan: AgentPlan) -> set[str]:
    """The parties whose public keys an agent needs for ``plan``: the relay, its own roster,
    the targets it serves and (peer variant: it seals shares to every co-member) the rosters
    of those targets. O(degree · roster), never every key of the run."""
    out = {RELAY_ID, *(plan.own.roster if plan.own is not None else ())}
    for nb in plan.memberships:
        out.add(nb.target)
        out.update(nb.roster)
    return out


@dataclass
class RelayAttempt:
    """One attempt of one round as the relay sees it (metadata and ciphertexts only)."""

    relay: NeighbourhoodRelay
    round: int
    attempt: int
    alive: frozenset[str]
    hoods: dict[str, Neighbourhood]
    all_plans: dict[str, AgentPlan]
    aborted: set[str] = field(default_factory=set)
    _phase: int = 0
    _dummy_uploads: dict[str, Sequence[Envelope]] | None = None
    _dummy_partials: dict[str, list[Envelope]] = field(default_factory=dict)
    _live: set[str] = field(default_factory=set)  # uploaded in phase 1
    _live2: set[str] = field(default_factory=set)  # uploaded in phase 2
    culprits: dict[str, list[tuple[str, str]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._expected: dict[int, tuple[str, str, int, int]] = {}
        self._dummy_ids = [a for a in self.all_plans if a in self.relay._dummies]
        self._plans = {a: p for a, p in self.all_plans.items() if a not in self.relay._dummies}
        self._early: threading.Thread | None = None
        self._early_out: dict[str, Sequence[Envelope]] | None = None
        self._early_error: BaseException | None = None

    def run_dummies_now(self) -> None:
        """Start the relay-run dummies' phase-1 messages in a background thread: they
        depend on the plan only, so the relay computes them while it waits for the devices'
        uploads (a blocked transport releases the interpreter lock). :meth:`route_phase1`
        waits for them; without this call it runs them itself."""
        if self._early is not None or self._dummy_uploads is not None or self._phase != 0:
            return
        if not self._dummy_ids:
            return
        if self.relay._dummies_busy not in (None, self):  # another round's dummies are out
            return  # (e.g. the tangent round beside the value round): run them at routing
        self.relay._dummies_busy = self

        def work() -> None:
            try:
                self._early_out = {d: self._run_dummy(self.relay._dummies[d])
                                   for d in self._dummy_ids}
            except BaseException as exc:  # re-raised by route_phase1
                self._early_error = exc

        self._early = threading.Thread(target=work, name="relay-dummies", daemon=True)
        self._early.start()

    def _join_early(self) -> None:
        if self._early is None:
            return
        self._early.join()
        self._early = None
        if self._early_error is not None:
            raise self._early_error
        self._dummy_uploads = self._early_out

    @property
    def plans(self) -> Mapping[str, AgentPlan]:
        """Plans for the real devices (dummies are run by the relay): a read-only view built
        once per attempt (reading it per device used to rebuild an O(N) dict each time)."""
        return MappingProxyType(self._plans)

    def _ctx_ok(self, env: Envelope, uploader: str, phase: int) -> None:
        c = env.context
        expected = self._expected.get(phase)
        if expected is None:  # (protocol, run, round, step) of this attempt's phase: once
            expected = self._expected[phase] = (self.relay.protocol, self.relay.run_id,
                                                self.round, step_number(self.attempt, phase))
        if (c.protocol, c.run_id, c.round, c.step) != expected or c.sender != uploader:
            raise UnexpectedMessageError(f"upload from {uploader!r} has context {c!r}")

    def _uploads_with_dummies(
        self, uploads: Mapping[str, Sequence[Envelope]], make
    ) -> dict[str, Sequence[Envelope]]:
        extra = set(uploads) - set(self.all_plans)
        if extra:
            raise UnexpectedMessageError(f"uploads from devices without a plan: {sorted(extra)}")
        if self._dummy_uploads is None:  # dummies run once, even if a routing call fails
            if self._dummy_ids:
                self.relay._dummies_busy = self
            self._dummy_uploads = {
                d: make(self.relay._dummies[d]) for d in self._dummy_ids
            }
        return dict(uploads) | self._dummy_uploads

    def _run_dummy(self, dev: NeighbourhoodAgent) -> list[Envelope]:
        plan = self.all_plans[dev.agent_id]
        if dev.agent_id.startswith(NOISE_PREFIX):
            assert isinstance(dev, PeerNeighbourhoodAgent)
            return dev.start_encoded(plan, {nb.target: self.relay.sample_noise()
                                            for nb in plan.memberships})
        return dev.start(plan, 0.0)

    def route_phase1(self, uploads: Mapping[str, Sequence[Envelope]]):
        """Route phase-1 uploads. Peer: ``{device: ShareDelivery}``; assisted:
        ``{device: MaskedDelivery}`` for every live target (others get nothing)."""
        if self._phase != 0:
            raise ProtocolStateError("phase 1 already routed")
        self._join_early()
        full = self._uploads_with_dummies(uploads, self._run_dummy)
        live = set(full)
        by_receiver: dict[str, list[Envelope]] = {}
        for sender, envs in full.items():
            plan = self.all_plans[sender]
            allowed = (
                {c for nb in plan.memberships for c in nb.roster} - {sender}
                if self.relay.variant is Variant.PEER
                else {nb.target for nb in plan.memberships}
            )
            for env in envs:
                self._ctx_ok(env, sender, STEP_SHARES if self.relay.variant is Variant.PEER
                             else STEP_MASKED)
                if env.receiver not in allowed:
                    raise UnexpectedMessageError(f"{sender!r} may not message {env.receiver!r}")
                by_receiver.setdefault(env.receiver, []).append(env)
        self._phase = 1
        for t in self.hoods:
            if t not in live:
                self.aborted.add(t)
                self.relay.outcome[t] = Outcome.DROPPED
        if self.relay.variant is Variant.PEER:
            for t, nb in self.hoods.items():
                if not set(nb.roster) <= live:
                    self.aborted.add(t)
            self._live = live
            out = {}
            for a in self.all_plans:
                if a in live:
                    targets = {nb.target for nb in self.all_plans[a].memberships}
                    out[a] = ShareDelivery(tuple(by_receiver.get(a, ())),
                                           frozenset(targets & self.aborted))
            return self._finish_peer1(out)
        return self._finish_assisted(by_receiver, live)

    def _finish_peer1(self, out: dict[str, ShareDelivery]) -> dict[str, ShareDelivery]:
        self._dummy_partials = {
            d: peer(self.relay._dummies[d]).on_shares(out[d].envelopes, out[d].aborted)
            for d in out if d in self.relay._dummies
        }
        return {a: d for a, d in out.items() if a not in self.relay._dummies}

    def _finish_assisted(
        self, by_receiver: dict[str, list[Envelope]], live: set[str]
    ) -> dict[str, MaskedDelivery]:
        relay = self.relay
        out: dict[str, MaskedDelivery] = {}
        for a in self._plans:
            if a not in live:
                continue
            nb = self.hoods.get(a)
            if nb is None or a in self.aborted:
                out[a] = MaskedDelivery((), None)
                continue
            envs = [e for e in by_receiver.get(a, ()) if e.sender in nb.roster]
            senders = [e.sender for e in envs]
            real = sum(1 for s in senders if s not in relay._dummies)
            if real == 0 or relay.policy.refuses(real):
                relay.outcome[a] = Outcome.REFUSED if real else Outcome.EMPTY
                out[a] = MaskedDelivery((), None)
                continue
            masks = 0
            for e in envs:  # a relay-run dummy kept its mask (the relay is its other holder),
                dummy = relay._dummies.get(e.sender)  # so did an agent in the relay's party
                if isinstance(dummy, AssistedNeighbourhoodAgent):
                    masks += dummy.sent_masks[a]
                    continue
                kept = relay.party.take_mask(e.context)
                masks += kept if kept is not None else mask_for(relay.keyring, e.sender,
                                                                e.context)
            total = wrap64(masks - relay.sample_noise())  # optional noise folded into the sum
            ctx = MessageContext(relay.protocol, relay.run_id, self.round,
                                 step_number(self.attempt, STEP_MASKSUM), RELAY_ID, a)
            out[a] = MaskedDelivery(tuple(envs),
                                    relay.keyring.seal_to(ctx, encode_mask_sum(total, senders)))
        for d in self._dummy_ids:
            assisted(relay._dummies[d]).on_masked((), None)  # dummies are never targets
        if relay._dummies_busy is self:
            relay._dummies_busy = None
        relay.party.forget_masks(self.round)
        return out

    def route_phase2(
        self,
        uploads: Mapping[str, Sequence[Envelope]],
        complaints: Mapping[str, Sequence[tuple[str, str]]] | None = None,
    ) -> dict[str, PartialDelivery]:
        """Peer: route partials; aborts neighbourhoods whose members dropped since phase 1
        or that are missing a partial. ``complaints[device]`` is that device's
        ``agent.complaints``: each named sender of an unreadable bundle is recorded in
        :attr:`culprits` and excluded from this round's retries (the accuser stays)."""
        if self.relay.variant is not Variant.PEER or self._phase != 1:
            raise ProtocolStateError("route_phase2 is the peer variant's second phase")
        for accuser, items in (complaints or {}).items():
            if accuser not in self._live:
                raise UnexpectedMessageError(f"complaint from {accuser!r}, not live")
            for culprit, reason in items:
                if culprit not in self.all_plans or culprit == accuser:
                    raise UnexpectedMessageError(f"complaint names unknown party {culprit!r}")
                self.culprits.setdefault(culprit, []).append((accuser, str(reason)))
        full = dict(uploads) | self._dummy_partials
        extra = set(uploads) - self._live
        if extra:
            raise UnexpectedMessageError(f"phase-2 uploads from dropped devices {sorted(extra)}")
        live = set(full)
        by_target: dict[str, list[Envelope]] = {}
        for sender, envs in full.items():
            allowed = {nb.target for nb in self.all_plans[sender].memberships}
            for env in envs:
                self._ctx_ok(env, sender, STEP_PARTIALS)
                if env.receiver not in allowed:
                    raise UnexpectedMessageError(f"{sender!r} may not message {env.receiver!r}")
                by_target.setdefault(env.receiver, []).append(env)
        self._phase = 2
        got_from = {t: {e.sender for e in envs} for t, envs in by_target.items()}
        for t, nb in self.hoods.items():
            if (t not in live or not set(nb.roster) <= live
                    or got_from.get(t, set()) != set(nb.roster)):
                self.aborted.add(t)
        self._live2 = live
        for d in self._dummy_ids:
            peer(self.relay._dummies[d]).on_partials((), aborted=True)
        if self.relay._dummies_busy is self:
            self.relay._dummies_busy = None
        return {
            a: PartialDelivery(
                () if a in self.aborted else tuple(by_target.get(a, ())),
                a in self.hoods and a in self.aborted,
            )
            for a in self._plans if a in live
        }

    def retry(self) -> RelayAttempt | None:
        """Peer: next attempt, survivors only, for aborted neighbourhoods whose target is live."""
        if self._phase != 2:
            raise ProtocolStateError("retry() after route_phase2 only")
        survivors = frozenset(a for a in self._live2
                              if a not in self.relay._dummies and a not in self.culprits)
        targets = [t for t in sorted(self.aborted) if t in survivors]
        if not targets:
            return None
        return self.relay._plan(self.round, self.attempt + 1, survivors, targets)

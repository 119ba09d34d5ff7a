"""Per-device key material of the neighbourhood sum: an X25519 agreement key, the public
keys of the parties it talks to, and cached pairwise keys derived with HKDF.

Pairwise keys seal envelopes between two devices (the relay cannot open them); in the
assisted variant a key shared with the coordinator derives the masks.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from protocols.envelope import MessageContext, ReplayGuard, open_envelope, seal
from protocols.keys import AgreementKey, IdentityKey, derive_key, verify_signature
from protocols.neighbourhood.errors import UnexpectedMessageError
from protocols.neighbourhood.messages import DUMMY_PREFIX, RELAY_ID, Envelope

PAIR_LABEL = "lpm-nbhd-pair"
MASK_ROOT_LABEL = "lpm-nbhd-mask-root"
KEY_STATEMENT = b"lpm-nbhd-agreement-key/2"


def _lp(raw: bytes) -> bytes:
    if len(raw) > 0xFFFF:
        raise UnexpectedMessageError("statement field too long")
    return len(raw).to_bytes(2, "big") + raw


def key_statement(run_id: str, agent_id: str, public_key: bytes) -> bytes:
    """The message an identity key signs to vouch for ``agent_id``'s agreement key: every
    field length-prefixed, so no two (run, agent, key) triples share an encoding."""
    return KEY_STATEMENT + b"".join(_lp(f) for f in (run_id.encode(), agent_id.encode(),
                                                       bytes(public_key)))


class PartyKeys:
    """The pairwise keys among the agreement keys of *one* party that runs several agents
    (the coordinator: the relay, its dummies, its proxies for synthetic agents). Two of its
    keyrings that talk to each other would each run the same X25519 agreement and HKDF;
    with a shared ``PartyKeys`` the first computes the key and the second reuses it. Only
    keys between two members are kept (a member's key with an outside party, e.g. a
    device, is never stored here), and a member is a keyring built with this object, so it
    holds the private key of the public key it registers. Never share one between parties
    (two devices): each would use key material derived from the other's private key."""

    def __init__(self) -> None:
        self._members: set[bytes] = set()
        self._secrets: dict[tuple[bytes, bytes], bytes] = {}
        self._keys: dict[tuple[bytes, bytes, bytes, str], bytes] = {}
        self._masks: dict[MessageContext, int] = {}

    def join(self, public_key: bytes) -> None:
        """Register a member's public key (its keyring holds the private key)."""
        self._members.add(bytes(public_key))

    def is_member(self, public_key: bytes) -> bool:
        return public_key in self._members

    def keep_mask(self, context: MessageContext, mask: int) -> None:
        """A member's phase-1 mask for ``context`` (its other holder, the relay, is a
        member too): the relay takes it instead of deriving it again."""
        self._masks[context] = mask

    def take_mask(self, context: MessageContext) -> int | None:
        """The mask a member kept for ``context`` (once), or ``None``."""
        return self._masks.pop(context, None)

    def forget_masks(self, up_to_round: int) -> None:
        """Drop the kept masks of rounds ≤ ``up_to_round`` (contributions not forwarded)."""
        self._masks = {c: m for c, m in self._masks.items() if c.round > up_to_round}

    def derived(self, key: AgreementKey, own_public: bytes, peer_public: bytes, info: bytes,
                label: str) -> bytes:
        """HKDF(X25519(own, peer), info, label) between two members, computed once for
        both: X25519 is symmetric and ``info`` orders the two identities."""
        lo, hi = sorted((own_public, peer_public))
        slot = (lo, hi, info, label)
        out = self._keys.get(slot)
        if out is None:
            secret = self._secrets.get((lo, hi))
            if secret is None:
                secret = self._secrets[(lo, hi)] = key.exchange(peer_public)
            out = self._keys[slot] = derive_key(secret, info, label=label)
        return out


class Keyring:
    """Agreement key of ``owner`` plus the public keys of its peers (from the relay)."""

    def __init__(self, owner: str, run_id: str, key: AgreementKey | None = None,
                 agreed: dict[str, tuple[bytes, bytes]] | None = None,
                 party: PartyKeys | None = None) -> None:
        """``agreed`` (optional, shared and updated in place): ``{peer: (peer public key,
        X25519 secret)}`` kept by the device between messages of one run and key, so a
        device that rebuilds its keyring per message agrees with each peer once per run —
        and notices a peer key that changed between messages. ``party``: the
        :class:`PartyKeys` of the party this keyring's owner belongs to (the coordinator's
        relay, dummies and proxies), which this keyring joins."""
        self.owner = owner
        self.run_id = run_id
        self._key = key if key is not None else AgreementKey.generate()
        self._own_public = self._key.public_bytes()
        self._public: dict[str, bytes] = {}
        self._agreed = agreed if agreed is not None else {}
        self._pair: dict[str, tuple[bytes, bytes]] = {}
        self._keys: dict[tuple[str, str], bytes] = {}
        self._guard = ReplayGuard()
        self._party = party
        if party is not None:
            party.join(self._own_public)

    def public_bytes(self) -> bytes:
        """This device's X25519 public key (published through the relay)."""
        return self._own_public

    def add_peers(self, public_keys: Mapping[str, bytes]) -> None:
        """Register peers' public keys; a changed key for a known peer is rejected."""
        for peer, pub in public_keys.items():
            if peer == self.owner:
                continue
            old = self._public.get(peer)
            if old is not None and old != pub:
                raise UnexpectedMessageError(f"public key of {peer!r} changed within the run")
            self._public[peer] = bytes(pub)

    def _info(self, peer: str) -> bytes:
        lo, hi = sorted((self.owner, peer))
        return b"".join(_lp(f.encode()) for f in (self.run_id, lo, hi))

    def _shared(self, peer: str) -> tuple[bytes, bytes]:
        cached = self._pair.get(peer)
        if cached is None:
            pub = self._public.get(peer)
            if pub is None:
                raise UnexpectedMessageError(f"no public key for {peer!r}")
            info = self._info(peer)
            known = self._agreed.get(peer)
            if known is not None and known[0] != pub:
                raise UnexpectedMessageError(f"public key of {peer!r} changed within the run")
            secret = known[1] if known is not None else self._key.exchange(pub)
            if known is None and not peer.startswith(DUMMY_PREFIX):  # dummies: fresh keys
                self._agreed[peer] = (pub, secret)
            cached = self._pair[peer] = (secret, info)
        return cached

    def _derived(self, peer: str, label: str) -> bytes:
        key = self._keys.get((peer, label))
        if key is None:
            pub = self._public.get(peer)
            party = self._party
            if party is not None and pub is not None and party.is_member(pub):
                key = party.derived(self._key, self._own_public, pub, self._info(peer), label)
            else:
                secret, info = self._shared(peer)
                key = derive_key(secret, info, label=label)
            self._keys[(peer, label)] = key
        return key

    def party_with(self, peer: str) -> PartyKeys | None:
        """This keyring's :class:`PartyKeys` if ``peer``'s key belongs to the same party."""
        pub = self._public.get(peer)
        party = self._party
        return party if party is not None and pub is not None and party.is_member(pub) \
            else None

    def use_random_mask_root(self, peer: str) -> None:
        """Make the mask root shared with ``peer`` a fresh random key (CSPRNG) instead of
        an X25519 agreement: for a relay-run dummy, whose masks only the relay (the other
        holder, running it) ever needs and which it keeps (``sent_masks``)."""
        self._keys[(peer, MASK_ROOT_LABEL)] = os.urandom(32)

    def sign_public(self, identity: IdentityKey) -> bytes:
        """Signature of ``identity`` over this keyring's key statement."""
        return identity.sign(key_statement(self.run_id, self.owner, self.public_bytes()))

    def add_signed_peers(
        self, signed: Mapping[str, tuple[bytes, bytes]], identities: Mapping[str, bytes]
    ) -> None:
        """Register peers' keys after verifying each signature against the peer's Ed25519
        identity from ``identities`` (relay-run dummies: the relay's identity). Raises
        ``SignatureError`` for a substituted key, ``UnexpectedMessageError`` for an unknown
        identity; nothing is registered unless every entry verifies."""
        checked: dict[str, bytes] = {}
        for peer, (pub, sig) in signed.items():
            who = RELAY_ID if peer.startswith(DUMMY_PREFIX) else peer
            identity = identities.get(who)
            if identity is None:
                raise UnexpectedMessageError(f"no identity key for {who!r}")
            verify_signature(identity, sig, key_statement(self.run_id, peer, pub))
            checked[peer] = pub
        self.add_peers(checked)

    def pair_key(self, peer: str) -> bytes:
        """Envelope key shared with ``peer`` for this run (HKDF over X25519)."""
        return self._derived(peer, PAIR_LABEL)

    def mask_key(self, peer: str) -> bytes:
        """Mask root key shared with ``peer`` (the coordinator), separate from envelopes."""
        return self._derived(peer, MASK_ROOT_LABEL)

    def seal_to(self, context: MessageContext, payload: bytes) -> Envelope:
        """Seal ``payload`` from this device to ``context.receiver``."""
        if context.sender != self.owner:
            raise UnexpectedMessageError("context sender is not this device")
        return Envelope(context, seal(self.pair_key(context.receiver), context, payload))

    def open_from(self, envelope: Envelope) -> bytes:
        """Open an envelope addressed to this device (authenticated, context-bound, at most
        once: a second delivery raises ``ReplayedEnvelopeError``)."""
        if envelope.context.receiver != self.owner:
            raise UnexpectedMessageError(
                f"envelope for {envelope.context.receiver!r} delivered to {self.owner!r}"
            )
        self._guard.check(envelope.context)
        payload = open_envelope(self.pair_key(envelope.context.sender), envelope.context,
                                envelope.blob, expected_receiver=self.owner)
        self._guard.accept(envelope.context)
        return payload

    def forget_before(self, round_: int) -> None:
        """Drop replay memory of older rounds (the state machines only accept the current
        round's contexts anyway)."""
        self._guard.forget_before(round_)

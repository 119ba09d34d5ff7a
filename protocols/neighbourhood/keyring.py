"""Per-device key material of the neighbourhood sum: an X25519 agreement key, the public
keys of the parties it talks to, and cached pairwise keys derived with HKDF.

Pairwise keys seal envelopes between two devices (the relay cannot open them); in the
assisted variant a key shared with the coordinator derives the masks.
"""

from __future__ import annotations

from collections.abc import Mapping

from protocols.envelope import MessageContext, ReplayGuard, open_envelope, seal
from protocols.keys import AgreementKey, derive_key
from protocols.neighbourhood.errors import UnexpectedMessageError
from protocols.neighbourhood.messages import Envelope

PAIR_LABEL = "lpm-nbhd-pair"
MASK_ROOT_LABEL = "lpm-nbhd-mask-root"


class Keyring:
    """Agreement key of ``owner`` plus the public keys of its peers (from the relay)."""

    def __init__(self, owner: str, run_id: str, key: AgreementKey | None = None) -> None:
        self.owner = owner
        self.run_id = run_id
        self._key = key if key is not None else AgreementKey.generate()
        self._public: dict[str, bytes] = {}
        self._pair: dict[str, tuple[bytes, bytes]] = {}
        self._keys: dict[tuple[str, str], bytes] = {}
        self._guard = ReplayGuard()

    def public_bytes(self) -> bytes:
        """This device's X25519 public key (published through the relay)."""
        return self._key.public_bytes()

    def add_peers(self, public_keys: Mapping[str, bytes]) -> None:
        """Register peers' public keys; a changed key for a known peer is rejected."""
        for peer, pub in public_keys.items():
            if peer == self.owner:
                continue
            old = self._public.get(peer)
            if old is not None and old != pub:
                raise UnexpectedMessageError(f"public key of {peer!r} changed within the run")
            self._public[peer] = bytes(pub)

    def _shared(self, peer: str) -> tuple[bytes, bytes]:
        cached = self._pair.get(peer)
        if cached is None:
            pub = self._public.get(peer)
            if pub is None:
                raise UnexpectedMessageError(f"no public key for {peer!r}")
            lo, hi = sorted((self.owner, peer))
            info = f"{self.run_id}\x00{lo}\x00{hi}".encode()
            cached = (self._key.exchange(pub), info)
            self._pair[peer] = cached
        return cached

    def _derived(self, peer: str, label: str) -> bytes:
        key = self._keys.get((peer, label))
        if key is None:
            secret, info = self._shared(peer)
            key = self._keys[(peer, label)] = derive_key(secret, info, label=label)
        return key

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

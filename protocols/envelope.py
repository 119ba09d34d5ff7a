"""Sealed envelopes: ChaCha20-Poly1305 payloads bound to their message context.

The context (protocol, run, round, step, sender, receiver) is the AEAD associated data, so
an envelope opened under any other context fails authentication: replayed into another
round, reordered into another step, or misrouted to another receiver, it is rejected.
:class:`ReplayGuard` additionally rejects a second delivery of the same context.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

__all__ = [
    "EnvelopeError",
    "MalformedEnvelopeError",
    "MessageContext",
    "MisroutedEnvelopeError",
    "ReplayGuard",
    "ReplayedEnvelopeError",
    "TamperedEnvelopeError",
    "open_envelope",
    "seal",
    "MAX_PAYLOAD_BYTES",
]

NONCE_BYTES = 12
TAG_BYTES = 16
MAX_PAYLOAD_BYTES = 64 * 1024 * 1024
_MAX_FIELD = 255


class EnvelopeError(ValueError):
    """An envelope cannot be accepted."""


class MalformedEnvelopeError(EnvelopeError):
    """Wrong length, wrong type or oversized envelope."""


class TamperedEnvelopeError(EnvelopeError):
    """Authentication failed: tampered, wrong key, or sealed under another context."""


class MisroutedEnvelopeError(EnvelopeError):
    """Delivered to a party that is not its receiver."""


class ReplayedEnvelopeError(EnvelopeError):
    """The same context was already accepted once."""


def _field(value: str) -> bytes:
    try:
        raw = value.encode()
    except UnicodeEncodeError as exc:
        raise MalformedEnvelopeError("context field is not valid UTF-8 text") from exc
    if len(raw) > _MAX_FIELD:
        raise MalformedEnvelopeError(f"context field too long ({len(raw)} > {_MAX_FIELD} bytes)")
    return bytes([len(raw)]) + raw


@dataclass(frozen=True)
class MessageContext:
    """Where a message belongs: every key and envelope is bound to it."""

    protocol: str
    run_id: str
    round: int
    step: int
    sender: str
    receiver: str

    def __post_init__(self) -> None:
        for name in ("protocol", "run_id", "sender", "receiver"):
            if not isinstance(getattr(self, name), str):
                raise MalformedEnvelopeError(f"MessageContext.{name} must be str")
        for name in ("round", "step"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**63:
                raise MalformedEnvelopeError(f"MessageContext.{name} must be an int in [0, 2^63)")

    def to_bytes(self) -> bytes:
        """Canonical, injective encoding (length-prefixed fields); computed once per
        context (it keys the mask, seals and opens the envelope: ~3 encodings each)."""
        raw = self.__dict__.get("_encoded")
        if raw is None:
            raw = b"".join(
                (
                    _field(self.protocol),
                    _field(self.run_id),
                    struct.pack(">QQ", self.round, self.step),
                    _field(self.sender),
                    _field(self.receiver),
                )
            )
            object.__setattr__(self, "_encoded", raw)  # frozen: fields never change
        return raw

    def reply(self, step: int | None = None) -> MessageContext:
        """The context of an answer: sender and receiver swapped."""
        return MessageContext(
            self.protocol,
            self.run_id,
            self.round,
            self.step if step is None else step,
            self.receiver,
            self.sender,
        )


def _aad(context: MessageContext | bytes) -> bytes:
    return bytes(context) if isinstance(context, (bytes, bytearray)) else context.to_bytes()


def seal(key: bytes, context: MessageContext | bytes, payload: bytes) -> bytes:
    """Encrypt and authenticate ``payload`` under ``key``, bound to ``context`` (a
    :class:`MessageContext`, or its pre-encoded, injective byte form).

    Returns ``nonce ‖ ciphertext ‖ tag``; the nonce is random (96 bits from the OS CSPRNG).
    """
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise MalformedEnvelopeError(f"payload of {len(payload)} bytes exceeds the limit")
    nonce = os.urandom(NONCE_BYTES)
    return nonce + ChaCha20Poly1305(key).encrypt(nonce, bytes(payload), _aad(context))


def open_envelope(
    key: bytes,
    context: MessageContext | bytes,
    blob: bytes,
    *,
    expected_receiver: str | None = None,
) -> bytes:
    """Authenticate and decrypt an envelope sealed by :func:`seal` under ``context``."""
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise MalformedEnvelopeError(f"envelope must be bytes, got {type(blob).__name__}")
    if len(blob) < NONCE_BYTES + TAG_BYTES:
        raise MalformedEnvelopeError(f"envelope of {len(blob)} bytes is too short")
    if len(blob) > MAX_PAYLOAD_BYTES + NONCE_BYTES + TAG_BYTES:
        raise MalformedEnvelopeError("envelope is oversized")
    if (expected_receiver is not None and isinstance(context, MessageContext)
            and context.receiver != expected_receiver):
        raise MisroutedEnvelopeError(
            f"envelope for {context.receiver!r} delivered to {expected_receiver!r}"
        )
    blob = bytes(blob)
    try:
        return ChaCha20Poly1305(key).decrypt(
            blob[:NONCE_BYTES], blob[NONCE_BYTES:], _aad(context)
        )
    except InvalidTag as exc:
        raise TamperedEnvelopeError(
            "envelope failed authentication (tampered, wrong key, or another context)"
        ) from exc


class ReplayGuard:
    """Remembers accepted contexts and rejects a second delivery of any of them."""

    def __init__(self) -> None:
        self._seen: set[bytes] = set()

    def check(self, context: MessageContext) -> None:
        """Raise :class:`ReplayedEnvelopeError` if ``context`` was already accepted."""
        if context.to_bytes() in self._seen:
            raise ReplayedEnvelopeError(f"replayed message {context}")

    def accept(self, context: MessageContext) -> None:
        """Check and record ``context`` (call after the envelope authenticated)."""
        self.check(context)
        self._seen.add(context.to_bytes())

    def forget_before(self, round_: int) -> None:
        """Drop memory of rounds older than ``round_`` (their keys are gone anyway)."""
        self._seen = {
            b for b in self._seen if _round_of(b) >= round_
        }

    def __len__(self) -> int:
        return len(self._seen)


def _round_of(encoded: bytes) -> int:
    pos = 0
    for _ in range(2):
        pos += 1 + encoded[pos]
    return struct.unpack_from(">Q", encoded, pos)[0]

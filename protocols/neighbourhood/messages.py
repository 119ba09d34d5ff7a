"""Wire objects of the secure neighbourhood sum: protocol names, step numbers, the plan the
relay hands each agent, relayed envelopes and the sealed payload formats.

Every relayed message is an :class:`Envelope`: a :class:`~protocols.envelope.MessageContext`
``(protocol, run_id, round, step, sender, receiver)`` in the clear (the relay routes on it)
and a ChaCha20-Poly1305 blob bound to that context. ``step = attempt * STEPS_PER_ATTEMPT +
phase``, so a restarted attempt never reuses a context.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from protocols.envelope import MessageContext
from protocols.neighbourhood.errors import MalformedMessageError

PEER_PROTOCOL = "lpm-nbhd-peer/1"
ASSISTED_PROTOCOL = "lpm-nbhd-assisted/1"
RELAY_ID = "relay"
DUMMY_PREFIX = "dummy:"  # relay-run dummy contacts (padding, noise); signed by the relay

STEPS_PER_ATTEMPT = 4
# peer phases
STEP_SHARES = 0  # contact j -> co-contact k: one share per common target
STEP_PARTIALS = 1  # holder k -> target i: sum of the shares k holds for i
# assisted phases
STEP_MASKED = 0  # contact j -> target i: w_ij*I_j + mask_ji (mask known to the coordinator)
STEP_MASKSUM = 1  # coordinator -> target i: sum of the masks of the forwarded contributions

MAX_ID_BYTES = 256
MAX_ENTRIES = 1 << 16
MAX_BLOB = 1 << 24
_MAGIC = b"NBE1"


def step_number(attempt: int, phase: int) -> int:
    """Context step of ``phase`` in restart ``attempt`` (0-based)."""
    if attempt < 0 or not 0 <= phase < STEPS_PER_ATTEMPT:
        raise ValueError(f"bad attempt/phase {attempt}/{phase}")
    return attempt * STEPS_PER_ATTEMPT + phase


def split_step(step: int) -> tuple[int, int]:
    """Inverse of :func:`step_number`: ``(attempt, phase)``."""
    return divmod(step, STEPS_PER_ATTEMPT)


@dataclass(frozen=True)
class Neighbourhood:
    """The roster of one target's neighbourhood for one attempt (relay metadata).

    ``roster`` holds the contacts that take part, dummy contacts (run by the relay,
    contributing 0) included; ``real_size`` counts the live real contacts.
    """

    target: str
    roster: tuple[str, ...]
    real_size: int

    def __post_init__(self) -> None:
        if len(set(self.roster)) != len(self.roster) or self.target in self.roster:
            raise ValueError(f"roster of {self.target!r} has duplicates or the target itself")
        if not 0 < self.real_size <= len(self.roster):
            raise ValueError("real_size must be in [1, len(roster)]")


    def to_dict(self) -> dict:
        return {"target": self.target, "roster": list(self.roster), "real_size": self.real_size}

    @classmethod
    def from_dict(cls, d: Mapping) -> Neighbourhood:
        try:
            return cls(str(d["target"]), tuple(str(x) for x in d["roster"]), int(d["real_size"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise MalformedMessageError(f"bad neighbourhood: {exc}") from exc


@dataclass(frozen=True)
class AgentPlan:
    """What the relay tells one agent for one attempt of one round.

    ``own``: the agent's neighbourhood as a target (``None`` when refused, empty or aborted);
    ``memberships``: the neighbourhoods in which the agent is a contact.
    """

    round: int
    attempt: int
    own: Neighbourhood | None
    memberships: tuple[Neighbourhood, ...]

    def to_dict(self) -> dict:
        """JSON-compatible form (for a transport record)."""
        return {
            "round": self.round,
            "attempt": self.attempt,
            "own": None if self.own is None else self.own.to_dict(),
            "memberships": [m.to_dict() for m in self.memberships],
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> AgentPlan:
        try:
            own = None if d["own"] is None else Neighbourhood.from_dict(d["own"])
            return cls(int(d["round"]), int(d["attempt"]), own,
                       tuple(Neighbourhood.from_dict(m) for m in d["memberships"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise MalformedMessageError(f"bad plan: {exc}") from exc


@dataclass(frozen=True)
class Envelope:
    """A sealed message as the relay sees it: routing context in the clear, opaque blob."""

    context: MessageContext
    blob: bytes

    @property
    def sender(self) -> str:
        return self.context.sender

    @property
    def receiver(self) -> str:
        return self.context.receiver

    def to_bytes(self) -> bytes:
        """Wire form: context fields, then the blob (for transport records)."""
        c = self.context
        out = bytearray(_MAGIC)
        for text in (c.protocol, c.run_id, c.sender, c.receiver):
            _pack_id(out, text)
        if not (0 <= c.round < 2**63 and 0 <= c.step < 2**63):
            raise MalformedMessageError("round/step out of range")
        out += struct.pack("<QQI", c.round, c.step, len(self.blob))
        return bytes(out) + self.blob

    @classmethod
    def from_bytes(cls, buf: bytes) -> Envelope:
        """Inverse of :meth:`to_bytes`; rejects truncated, oversized or trailing data."""
        buf = bytes(buf)
        if not buf.startswith(_MAGIC):
            raise MalformedMessageError("not a neighbourhood envelope")
        pos, fields = len(_MAGIC), []
        for _ in range(4):
            text, pos = _unpack_id(buf, pos)
            fields.append(text)
        if pos + 20 > len(buf):
            raise MalformedMessageError("truncated envelope header")
        rnd, step, size = struct.unpack_from("<QQI", buf, pos)
        pos += 20
        if size > MAX_BLOB or pos + size != len(buf):
            raise MalformedMessageError("envelope blob length mismatch")
        protocol, run_id, sender, receiver = fields
        ctx = MessageContext(protocol, run_id, rnd, step, sender, receiver)
        return cls(ctx, buf[pos:])


# ---------------------------------------------------------------------------- payloads
def _pack_id(out: bytearray, ident: str) -> None:
    raw = ident.encode("utf-8")
    if len(raw) > MAX_ID_BYTES:
        raise MalformedMessageError("identifier too long")
    out += struct.pack("<H", len(raw)) + raw


def _unpack_id(buf: bytes, pos: int) -> tuple[str, int]:
    if pos + 2 > len(buf):
        raise MalformedMessageError("truncated identifier length")
    (size,) = struct.unpack_from("<H", buf, pos)
    pos += 2
    if size > MAX_ID_BYTES or pos + size > len(buf):
        raise MalformedMessageError("truncated or oversized identifier")
    try:
        return buf[pos : pos + size].decode("utf-8"), pos + size
    except UnicodeDecodeError as exc:
        raise MalformedMessageError("identifier is not UTF-8") from exc


def encode_tagged(entries: Sequence[tuple[str, int]]) -> bytes:
    """``[(id, ring element)]`` -> bytes (share bundles, mask-sum contributor lists)."""
    if len(entries) > MAX_ENTRIES:
        raise MalformedMessageError("too many entries")
    out = bytearray(struct.pack("<I", len(entries)))
    for ident, value in entries:
        _pack_id(out, ident)
        out += struct.pack("<q", value)
    return bytes(out)


def decode_tagged(buf: bytes) -> list[tuple[str, int]]:
    """Inverse of :func:`encode_tagged`; rejects truncation, trailing bytes, duplicates."""
    if len(buf) < 4:
        raise MalformedMessageError("payload too short")
    (count,) = struct.unpack_from("<I", buf, 0)
    if count > MAX_ENTRIES:
        raise MalformedMessageError("too many entries")
    pos, out, seen = 4, [], set()
    for _ in range(count):
        ident, pos = _unpack_id(buf, pos)
        if pos + 8 > len(buf):
            raise MalformedMessageError("truncated ring element")
        (value,) = struct.unpack_from("<q", buf, pos)
        pos += 8
        if ident in seen:
            raise MalformedMessageError(f"duplicate entry {ident!r}")
        seen.add(ident)
        out.append((ident, value))
    if pos != len(buf):
        raise MalformedMessageError("trailing bytes after payload")
    return out


def encode_element(value: int) -> bytes:
    """One ring element (partials, masked contributions)."""
    return struct.pack("<q", value)


def decode_element(buf: bytes) -> int:
    if len(buf) != 8:
        raise MalformedMessageError(f"expected 8 bytes, got {len(buf)}")
    return struct.unpack("<q", buf)[0]


def encode_mask_sum(total: int, contributors: Sequence[str]) -> bytes:
    """Assisted phase 2 payload: mask sum and the contributors it covers."""
    return encode_element(total) + encode_tagged([(c, 0) for c in contributors])


def decode_mask_sum(buf: bytes) -> tuple[int, list[str]]:
    if len(buf) < 12:
        raise MalformedMessageError("mask-sum payload too short")
    return decode_element(buf[:8]), [c for c, _ in decode_tagged(buf[8:])]

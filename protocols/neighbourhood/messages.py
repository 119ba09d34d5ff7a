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


MAX_ROUND = 2**63 - 1
MAX_ATTEMPT = MAX_ROUND // STEPS_PER_ATTEMPT - 1


def _check_int(value: object, what: str, hi: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= hi:
        raise MalformedMessageError(f"{what} must be an int in [0, {hi}], got {value!r}")
    return value


def step_number(attempt: int, phase: int) -> int:
    """Context step of ``phase`` in restart ``attempt`` (0-based); always < 2^63."""
    _check_int(attempt, "attempt", MAX_ATTEMPT)
    _check_int(phase, "phase", STEPS_PER_ATTEMPT - 1)
    return attempt * STEPS_PER_ATTEMPT + phase


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise MalformedMessageError("identifier must be a str")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise MalformedMessageError("identifier is not valid UTF-8 text") from exc
    if size > MAX_ID_BYTES:
        raise MalformedMessageError("identifier longer than 256 bytes")
    return value


def _int(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise MalformedMessageError(f"expected an int, got {type(value).__name__}")
    return value


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
        if not isinstance(self.target, str) or not all(isinstance(c, str) for c in self.roster):
            raise MalformedMessageError("neighbourhood ids must be str")
        if len(set(self.roster)) != len(self.roster) or self.target in self.roster:
            raise MalformedMessageError(
                f"roster of {self.target!r} has duplicates or the target itself")
        if (not isinstance(self.real_size, int) or isinstance(self.real_size, bool)
                or not 0 < self.real_size <= len(self.roster)):
            raise MalformedMessageError("real_size must be in [1, len(roster)]")


    def to_dict(self) -> dict:
        return {"target": self.target, "roster": list(self.roster), "real_size": self.real_size}

    @classmethod
    def from_dict(cls, d: Mapping) -> Neighbourhood:
        try:
            roster = d["roster"]
            if not isinstance(roster, (list, tuple)) or len(roster) > MAX_ENTRIES:
                raise MalformedMessageError("roster must be a list of at most 2^16 ids")
            return cls(_text(d["target"]), tuple(_text(x) for x in roster),
                       _int(d["real_size"]))
        except MalformedMessageError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
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

    def __post_init__(self) -> None:
        _check_int(self.round, "round", MAX_ROUND)
        _check_int(self.attempt, "attempt", MAX_ATTEMPT)
        if self.own is not None and not isinstance(self.own, Neighbourhood):
            raise MalformedMessageError("own must be a Neighbourhood")
        if not all(isinstance(m, Neighbourhood) for m in self.memberships):
            raise MalformedMessageError("memberships must be Neighbourhoods")
        targets = [m.target for m in self.memberships]
        if len(set(targets)) != len(targets):
            raise MalformedMessageError("a target appears twice among the memberships")

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
            ms = d["memberships"]
            if not isinstance(ms, (list, tuple)) or len(ms) > MAX_ENTRIES:
                raise MalformedMessageError("memberships must be a list")
            return cls(_int(d["round"]), _int(d["attempt"]), own,
                       tuple(Neighbourhood.from_dict(m) for m in ms))
        except MalformedMessageError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
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
        """Inverse of :meth:`to_bytes`; rejects truncated, oversized or trailing data and
        round/step outside [0, 2^63) with :class:`MalformedMessageError`."""
        if not isinstance(buf, (bytes, bytearray, memoryview)):
            raise MalformedMessageError("envelope must be bytes")
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
        if rnd > MAX_ROUND or step > MAX_ROUND:
            raise MalformedMessageError("envelope round/step out of range [0, 2^63)")
        protocol, run_id, sender, receiver = fields
        ctx = MessageContext(protocol, run_id, rnd, step, sender, receiver)
        return cls(ctx, buf[pos:])


# ---------------------------------------------------------------------------- payloads
def _pack_id(out: bytearray, ident: str) -> None:
    try:
        raw = ident.encode("utf-8")
    except (UnicodeEncodeError, AttributeError) as exc:
        raise MalformedMessageError("identifier is not valid UTF-8 text") from exc
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
        try:
            out += struct.pack("<q", value)
        except struct.error as exc:
            raise MalformedMessageError(f"ring element out of range: {exc}") from exc
    return bytes(out)


def decode_tagged(buf: bytes) -> list[tuple[str, int]]:
    """Inverse of :func:`encode_tagged`; rejects truncation, trailing bytes, duplicates."""
    if not isinstance(buf, (bytes, bytearray, memoryview)):
        raise MalformedMessageError("payload must be bytes")
    buf = bytes(buf)
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
    try:
        return struct.pack("<q", value)
    except struct.error as exc:
        raise MalformedMessageError(f"ring element out of range: {exc}") from exc


def decode_element(buf: bytes) -> int:
    if not isinstance(buf, (bytes, bytearray, memoryview)) or len(buf) != 8:
        raise MalformedMessageError(f"expected 8 bytes, got {len(buf)}")
    return struct.unpack("<q", buf)[0]


def encode_mask_sum(total: int, contributors: Sequence[str]) -> bytes:
    """Assisted phase 2 payload: mask sum and the contributors it covers."""
    return encode_element(total) + encode_tagged([(c, 0) for c in contributors])


def decode_mask_sum(buf: bytes) -> tuple[int, list[str]]:
    if not isinstance(buf, (bytes, bytearray, memoryview)) or len(buf) < 12:
        raise MalformedMessageError("mask-sum payload too short")
    return decode_element(buf[:8]), [c for c, _ in decode_tagged(buf[8:])]

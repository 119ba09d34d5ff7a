"""Wire format of the institutional MPC round: the control header and the query.

A round starts with a control header (two int64: opcode, byte length of the query). The
query is the coordinator's request "evaluate the loss at θ", carrying θ and the public
multipliers it computed from θ (ŷ of shape (C, T) and J = ∂ŷ/∂θ of shape (C, T, P)):

    b"LPMQ" | version u8 | round u32 | C u32 | T u32 | P u32 | float64 θ[P] ŷ[C·T] J[C·T·P]

(little endian). Parsers accept exactly this layout and raise :class:`MalformedMessage`
for anything else; they never raise another exception type.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

import numpy as np
import torch

from protocols.mpc.errors import MalformedMessage

__all__ = [
    "CONTROL_GO",
    "CONTROL_STOP",
    "MAX_QUERY_BYTES",
    "Query",
    "decode_control",
    "decode_query",
    "encode_control",
    "encode_query",
]

MAGIC = b"LPMQ"
VERSION = 1
_HEADER = struct.Struct("<4sBIIII")
CONTROL_STOP = 0
CONTROL_GO = 1
MAX_CELLS, MAX_DAYS, MAX_PARAMS = 64, 4096, 64
MAX_QUERY_BYTES = _HEADER.size + 8 * (MAX_PARAMS + MAX_CELLS * MAX_DAYS * (1 + MAX_PARAMS))


@dataclass(frozen=True)
class Query:
    """One round's request: parameters θ (P,) and the public ŷ (C, T), J (C, T, P)."""

    round: int
    theta: torch.Tensor
    y_hat: torch.Tensor
    jac: torch.Tensor

    @property
    def shape(self) -> tuple[int, int, int]:
        c, t = self.y_hat.shape
        return c, t, self.theta.numel()

    def digest(self) -> bytes:
        """SHA-256 of the encoded query (peers compare it to detect equivocation)."""
        return hashlib.sha256(encode_query(self)).digest()


def encode_query(q: Query) -> bytes:
    """Serialise a query; raises :class:`MalformedMessage` on inconsistent shapes."""
    theta, y_hat, jac = q.theta, q.y_hat, q.jac
    if theta.dim() != 1 or y_hat.dim() != 2 or jac.dim() != 3:
        raise MalformedMessage("θ must be (P,), ŷ (C, T) and J (C, T, P)")
    c, t = y_hat.shape
    p = theta.numel()
    if tuple(jac.shape) != (c, t, p):
        raise MalformedMessage(f"J has shape {tuple(jac.shape)}, expected {(c, t, p)}")
    _check_dims(q.round, c, t, p)
    body = torch.cat([theta.reshape(-1), y_hat.reshape(-1), jac.reshape(-1)]).to(torch.float64)
    return _HEADER.pack(MAGIC, VERSION, q.round, c, t, p) + body.numpy().astype("<f8").tobytes()


def decode_query(data: bytes) -> Query:
    """Parse a query; every failure is a :class:`MalformedMessage`."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise MalformedMessage(f"query must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) < _HEADER.size:
        raise MalformedMessage(f"query of {len(data)} bytes is shorter than its header")
    if len(data) > MAX_QUERY_BYTES:
        raise MalformedMessage(f"query of {len(data)} bytes exceeds {MAX_QUERY_BYTES}")
    magic, version, rnd, c, t, p = _HEADER.unpack_from(data)
    if magic != MAGIC or version != VERSION:
        raise MalformedMessage("not an LPM MPC query (magic/version)")
    _check_dims(rnd, c, t, p)
    n = p + c * t + c * t * p
    if len(data) != _HEADER.size + 8 * n:
        raise MalformedMessage(f"query body has {len(data) - _HEADER.size} bytes, expected {8 * n}")
    body = torch.from_numpy(np.frombuffer(data, dtype="<f8", offset=_HEADER.size).astype(np.float64))
    if not bool(torch.isfinite(body).all()):
        raise MalformedMessage("query carries NaN or infinite values")
    theta, y_hat, jac = body[:p], body[p:p + c * t].reshape(c, t), body[p + c * t:].reshape(c, t, p)
    return Query(rnd, theta, y_hat, jac)


def _check_dims(rnd: int, c: int, t: int, p: int) -> None:
    if not (isinstance(rnd, int) and 0 <= rnd < 2**32):
        raise MalformedMessage(f"round {rnd!r} out of range")
    if not (1 <= c <= MAX_CELLS and 1 <= t <= MAX_DAYS and 1 <= p <= MAX_PARAMS):
        raise MalformedMessage(f"query shape (C={c}, T={t}, P={p}) outside 1..{MAX_CELLS}, 1..{MAX_DAYS}, 1..{MAX_PARAMS}")


def encode_control(opcode: int, length: int = 0) -> torch.Tensor:
    """The control header as an int64 tensor (opcode, byte length of the query)."""
    return torch.tensor([opcode, length], dtype=torch.int64)


def decode_control(header: torch.Tensor) -> tuple[int, int]:
    """(opcode, length) from a received control header; raises :class:`MalformedMessage`."""
    if not isinstance(header, torch.Tensor) or header.dtype != torch.int64 or tuple(header.shape) != (2,):
        raise MalformedMessage("control header must be two int64")
    opcode, length = int(header[0]), int(header[1])
    if opcode == CONTROL_STOP:
        if length != 0:
            raise MalformedMessage("stop carries no query")
        return opcode, 0
    if opcode != CONTROL_GO:
        raise MalformedMessage(f"unknown opcode {opcode}")
    if not _HEADER.size < length <= MAX_QUERY_BYTES:
        raise MalformedMessage(f"query length {length} out of range")
    return opcode, length

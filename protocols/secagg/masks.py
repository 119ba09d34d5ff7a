"""Key derivation and mask generation for SecAgg+.

All keys are HKDF-SHA256 outputs bound to (protocol, run, round, step, sender, receiver);
masks are ChaCha20 keystreams under the full 256-bit derived key (no 32-bit seeding).
"""

from __future__ import annotations

import struct

import torch

from protocols.envelope import MessageContext
from protocols.keys import AgreementKey, derive_key, ring_keystream
from protocols.secagg.config import PROTOCOL, RoundConfig
from protocols.secagg.messages import Step

__all__ = [
    "Contexts",
    "add_pairwise_mask",
    "channel_key",
    "context",
    "pairwise_mask_key",
    "self_mask_key",
    "server_mac_key",
    "signed_key_statement",
]


def context(cfg: RoundConfig, step: Step, sender: int, receiver: int) -> MessageContext:
    """The message context of ``step`` between two roster indices (``-1`` = server)."""
    ids = cfg.client_ids
    return MessageContext(
        PROTOCOL,
        cfg.run_id,
        cfg.round,
        int(step),
        "server" if sender < 0 else ids[sender],
        "server" if receiver < 0 else ids[receiver],
    )


def _field(value: str) -> bytes:
    raw = value.encode()
    return bytes([len(raw)]) + raw


class Contexts:
    """Pre-encoded context fields of one round: ``info(step, a, b)`` equals
    ``context(cfg, step, a, b).to_bytes()`` without building a MessageContext per key."""

    def __init__(self, cfg: RoundConfig) -> None:
        self.cfg = cfg
        self._head = _field(PROTOCOL) + _field(cfg.run_id)
        self._ids: dict[int, bytes] = {}  # encoded lazily: a client touches only k + 1 ids
        self._server = _field("server")
        self._steps = {int(s): struct.pack(">QQ", cfg.round, int(s)) for s in Step}

    def _id(self, index: int) -> bytes:
        if index < 0:
            return self._server
        f = self._ids.get(index)
        if f is None:
            f = self._ids[index] = _field(self.cfg.client_ids[index])
        return f

    def info(self, step: Step, sender: int, receiver: int) -> bytes:
        return b"".join((self._head, self._steps[int(step)], self._id(sender), self._id(receiver)))


def _contexts(cfg: RoundConfig | Contexts) -> Contexts:
    return cfg if isinstance(cfg, Contexts) else Contexts(cfg)


def signed_key_statement(cfg: RoundConfig | Contexts, index: int, c_pk: bytes, s_pk: bytes) -> bytes:
    """What a client signs: its two public keys bound to this run, round and identity."""
    return b"secagg/advertise" + _contexts(cfg).info(Step.ADVERTISE, index, -1) + c_pk + s_pk


def _pair(cfg: RoundConfig | Contexts, step: Step, a: int, b: int) -> bytes:
    return _contexts(cfg).info(step, min(a, b), max(a, b))


def channel_key(cfg: RoundConfig | Contexts, own: AgreementKey, me: int, peer: int, peer_pk: bytes) -> bytes:
    """Symmetric key for the share envelopes between ``me`` and ``peer``."""
    secret = own.exchange(peer_pk)
    return derive_key(secret, _pair(cfg, Step.SHARE_KEYS, me, peer), label="secagg/share-channel")


def pairwise_mask_key(
    cfg: RoundConfig | Contexts, own: AgreementKey, me: int, peer: int, peer_pk: bytes
) -> bytes:
    """Seed of the pairwise mask between ``me`` and ``peer`` (same for both ends)."""
    secret = own.exchange(peer_pk)
    return derive_key(secret, _pair(cfg, Step.MASKED_INPUT, me, peer), label="secagg/pairwise-mask")


def server_mac_key(cfg: RoundConfig | Contexts, own: AgreementKey, client: int, peer_pk: bytes) -> bytes:
    """HMAC key between client ``client`` and the server (either end computes it)."""
    secret = own.exchange(peer_pk)
    info = _contexts(cfg).info(Step.ADVERTISE, client, -1)
    return derive_key(secret, info, label="secagg/server-mac")


def self_mask_key(cfg: RoundConfig | Contexts, index: int, seed: bytes) -> bytes:
    """Key of client ``index``'s self mask b_i from its random 32-byte seed."""
    info = _contexts(cfg).info(Step.MASKED_INPUT, index, index)
    return derive_key(seed, info, label="secagg/self-mask")


def add_pairwise_mask(
    acc: torch.Tensor, key: bytes, me: int, peer: int, buf: torch.Tensor, sign: int = 1
) -> None:
    """acc += sign · (+mask if me < peer else −mask), wrapping mod 2^64 (buf is scratch)."""
    ring_keystream(key, buf.numel(), out=buf)
    if (me < peer) == (sign > 0):
        acc.add_(buf)
    else:
        acc.sub_(buf)

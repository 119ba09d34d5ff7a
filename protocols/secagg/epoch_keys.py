"""Key derivation of multi-round SecAgg+: keys agreed once per epoch, masks per day.

Every derived key and every signed statement is bound to (protocol, run, epoch, day, step,
party, party) through a length-prefixed, injective encoding. The pairwise *root* key of two
neighbours comes from X25519 of their mask keys once per epoch; each day's pairwise mask key
is HKDF(root, …, day, …) (as in Flamingo, S&P 2023), so revealing one day's key (when a
neighbour drops) says nothing about any other day's. The same root gives the pair's
*consistency key*: in the daily consistency round each client authenticates the survivor set
it saw to each live neighbour with HMAC-SHA256 under that key (a pairwise tag in place of an
Ed25519 signature: only the neighbour ever checks it, and the coordinator cannot forge it).
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Sequence
from enum import IntEnum

from protocols.keys import (
    _DOMAIN,
    KEY_BYTES,
    AgreementKey,
    InvalidKeyError,
    derive_key,
    expand_key,
)
from protocols.secagg.config import RoundConfig
from protocols.secagg.messages import hmac_sha256

__all__ = ["EStep", "EpochContexts", "PROTOCOL2"]

PROTOCOL2 = "lpm-secagg+/2"
# expand_key's message prefix for the self-mask label (domain ‖ u16 length ‖ label)
_SELF_MASK_LABEL = _DOMAIN + len(b"secagg2/self-mask").to_bytes(2, "big") + b"secagg2/self-mask"
_PAIR_MASK_LABEL = (_DOMAIN + len(b"secagg2/pairwise-mask").to_bytes(2, "big")
                    + b"secagg2/pairwise-mask")


class EStep(IntEnum):
    ADVERTISE = 0
    SETUP = 1
    SHARE = 2
    MASK = 3
    CONSISTENCY = 4
    UNMASK = 5


def _field(value: str) -> bytes:
    raw = value.encode()
    return bytes([len(raw)]) + raw


class EpochContexts:
    """Pre-encoded context fields of one epoch and the derivations built on them."""

    def __init__(self, cfg: RoundConfig) -> None:
        self.cfg = cfg
        self._head = _field(PROTOCOL2) + _field(cfg.run_id) + struct.pack(">Q", cfg.round)
        self._ids: dict[int, bytes] = {}
        self._server = _field("server")

    def _id(self, index: int) -> bytes:
        if index < 0:
            return self._server
        f = self._ids.get(index)
        if f is None:
            f = self._ids[index] = _field(self.cfg.client_ids[index])
        return f

    def info(self, step: EStep, sender: int, receiver: int, day: int = 0) -> bytes:
        """(protocol, run, epoch, day, step, sender, receiver), injectively encoded."""
        return b"".join((self._head, struct.pack(">QQ", day, int(step)), self._id(sender),
                         self._id(receiver)))

    def _pair(self, step: EStep, a: int, b: int, day: int = 0) -> bytes:
        return self.info(step, min(a, b), max(a, b), day)

    # -- statements (signed) -------------------------------------------------------------
    def advertise_statement(self, index: int, c_pk: bytes, s_pk: bytes) -> bytes:
        """What a client signs at setup: its two public keys bound to run, epoch and id."""
        return b"secagg2/advertise" + self.info(EStep.ADVERTISE, index, -1) + c_pk + s_pk

    def survivors_digest(self, day: int, bitmap: bytes) -> bytes:
        """SHA-256 of (protocol, run, epoch, day, the survivor set): what the consistency
        tags authenticate."""
        return hashlib.sha256(b"secagg2/survivors" + self.info(EStep.CONSISTENCY, -1, -1, day)
                              + struct.pack(">I", len(bitmap)) + bitmap).digest()

    @staticmethod
    def survivors_tag(key: bytes, signer: int, receiver: int, digest: bytes) -> bytes:
        """HMAC-SHA256 under the pair's consistency key: ``signer`` saw the survivor set of
        ``digest``, told to ``receiver`` (direction bound: the key is shared by both)."""
        return hmac.digest(key, struct.pack(">II", signer, receiver) + digest, "sha256")

    # -- keys ----------------------------------------------------------------------------
    def server_mac_key(self, own: AgreementKey, client: int, peer_pk: bytes) -> bytes:
        return derive_key(own.exchange(peer_pk), self.info(EStep.ADVERTISE, client, -1),
                          label="secagg2/server-mac")

    def pair_keys(self, own: AgreementKey, me: int, peer: int,
                  peer_pk: bytes) -> tuple[bytes, bytes]:
        """(channel key, pairwise root key) of two neighbours, from one X25519 agreement of
        their mask keys (the mask private key is never shared or revealed in this protocol,
        so one agreement can feed both, domain-separated by label)."""
        secret = own.exchange(peer_pk)
        info = self._pair(EStep.SETUP, me, peer)
        return (derive_key(secret, info, label="secagg2/share-channel"),
                derive_key(secret, info, label="secagg2/pairwise-root"))

    def consistency_key(self, root: bytes, a: int, b: int) -> bytes:
        """HKDF-Expand(root, (…, CONSISTENCY, lo, hi)): the pair's key for survivor-set tags
        for the whole epoch (independent of every mask key)."""
        return expand_key(root, self._pair(EStep.CONSISTENCY, a, b),
                          label="secagg2/consistency")

    def day_pair_key(self, root: bytes, day: int, a: int, b: int) -> bytes:
        """HKDF-Expand(root, (…, day, lo, hi)): the day's pairwise mask key."""
        return expand_key(root, self._pair(EStep.MASK, a, b, day), label="secagg2/pairwise-mask")

    def day_pair_keys(self, roots: Sequence[bytes], day: int, me: int,
                      peers: Sequence[int]) -> list[bytes]:
        """``[day_pair_key(root, day, me, j) ...]`` for one client's peers (a device's day):
        the same HKDF-Expand block, HMAC-SHA256(root, domain ‖ label ‖ info ‖ 1), with the
        fixed part of the message encoded once."""
        if len(roots) != len(peers):
            raise ValueError("one root per peer")
        head = b"".join((_PAIR_MASK_LABEL, self._head, struct.pack(">QQ", day, EStep.MASK)))
        ids, digest, own = self._id, hmac_sha256, self._id(me)
        out = []
        for root, j in zip(roots, peers, strict=True):
            if type(root) is not bytes or len(root) != KEY_BYTES:
                raise InvalidKeyError("expansion key must be 32 bytes")
            pair = (own, ids(j)) if me < j else (ids(j), own)
            out.append(digest(root, b"".join((head, *pair, b"\x01")), "sha256"))
        return out

    def self_mask_key(self, seed: bytes, index: int, day: int) -> bytes:
        return expand_key(seed, self.info(EStep.MASK, index, index, day),
                          label="secagg2/self-mask")

    def self_mask_keys(self, seeds: Sequence[bytes], indices: Sequence[int],
                       day: int) -> list[bytes]:
        """``[self_mask_key(seed, i, day) ...]`` for many clients (the coordinator's unmask
        stage): the same HKDF-Expand block, HMAC-SHA256(seed, domain ‖ label ‖ info ‖ 1),
        with the fixed part of the message encoded once."""
        if len(seeds) != len(indices):
            raise ValueError("one seed per index")
        head = b"".join((_SELF_MASK_LABEL, self._head, struct.pack(">QQ", day, EStep.MASK)))
        ids, digest = self._id, hmac_sha256
        out = []
        for seed, i in zip(seeds, indices, strict=True):
            if type(seed) is not bytes or len(seed) != KEY_BYTES:
                raise InvalidKeyError("expansion key must be 32 bytes")
            f = ids(i)
            out.append(digest(seed, b"".join((head, f, f, b"\x01")), "sha256"))
        return out

    def share_aad(self, day: int, sender: int, receiver: int) -> bytes:
        return b"secagg2/share" + self.info(EStep.SHARE, sender, receiver, day)

"""Keys and key derivation: Ed25519 identities, X25519 agreement, HKDF, keystreams.

Every derived key is domain-separated by a label and a message context (protocol, run,
round, step, sender, receiver), so a key for one purpose is never valid for another.
Masks and shares come only from :func:`ring_keystream`, a ChaCha20 keystream under a
256-bit key: never from ``random``, NumPy or torch generators.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from typing import TYPE_CHECKING

import numpy as np
import torch
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.asymmetric.x25519 import (
    X25519PrivateKey,
    X25519PublicKey,
)
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

if TYPE_CHECKING:
    from protocols.envelope import MessageContext

__all__ = [
    "KEY_BYTES",
    "AgreementKey",
    "IdentityKey",
    "InvalidKeyError",
    "SignatureError",
    "check_agreement_public_key",
    "derive_key",
    "expand_key",
    "ring_keystream",
    "verify_signature",
]

KEY_BYTES = 32
_NONCE_BYTES = 16
_ZERO_NONCE = bytes(_NONCE_BYTES)
_DOMAIN = b"lpm-edge/v1"


class InvalidKeyError(ValueError):
    """Key material has the wrong length or encoding."""


class SignatureError(ValueError):
    """A signature does not verify under the given public key."""


def _raw_public(key: Ed25519PublicKey | X25519PublicKey) -> bytes:
    return key.public_bytes_raw()


def _check_len(data: bytes, what: str) -> bytes:
    if not isinstance(data, (bytes, bytearray)) or len(data) != KEY_BYTES:
        raise InvalidKeyError(f"{what} must be {KEY_BYTES} bytes")
    return bytes(data)


class IdentityKey:
    """A long-term Ed25519 signing identity (device or coordinator)."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._key = private_key

    @classmethod
    def generate(cls) -> IdentityKey:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_private_bytes(cls, data: bytes) -> IdentityKey:
        return cls(Ed25519PrivateKey.from_private_bytes(_check_len(data, "Ed25519 private key")))

    def private_bytes(self) -> bytes:
        """Raw private key; store it only encrypted at rest."""
        return self._key.private_bytes_raw()

    def public_bytes(self) -> bytes:
        return _raw_public(self._key.public_key())

    def sign(self, message: bytes) -> bytes:
        return self._key.sign(message)

    def verify(self, signature: bytes, message: bytes) -> None:
        """Verify against this identity's own public key (raises :class:`SignatureError`)."""
        verify_signature(self.public_bytes(), signature, message)


def verify_signature(public_key: bytes, signature: bytes, message: bytes) -> None:
    """Verify an Ed25519 signature; raises :class:`SignatureError` or :class:`InvalidKeyError`."""
    try:
        key = Ed25519PublicKey.from_public_bytes(_check_len(public_key, "Ed25519 public key"))
        key.verify(signature, message)
    except InvalidSignature as exc:
        raise SignatureError("signature does not verify") from exc


class AgreementKey:
    """An X25519 key pair for per-round key agreement."""

    def __init__(self, private_key: X25519PrivateKey) -> None:
        self._key = private_key

    @classmethod
    def generate(cls) -> AgreementKey:
        return cls(X25519PrivateKey.generate())

    @classmethod
    def from_private_bytes(cls, data: bytes) -> AgreementKey:
        return cls(X25519PrivateKey.from_private_bytes(_check_len(data, "X25519 private key")))

    def private_bytes(self) -> bytes:
        return self._key.private_bytes_raw()

    def public_bytes(self) -> bytes:
        return _raw_public(self._key.public_key())

    def exchange(self, peer_public: bytes) -> bytes:
        """Raw X25519 shared secret with a peer; feed it to :func:`derive_key`, never use raw."""
        peer = X25519PublicKey.from_public_bytes(_check_len(peer_public, "X25519 public key"))
        try:
            return self._key.exchange(peer)
        except ValueError as exc:  # all-zero output: low-order point
            raise InvalidKeyError("peer public key is a low-order point") from exc


_PROBE: X25519PrivateKey | None = None


def check_agreement_public_key(public_key: bytes) -> bytes:
    """Validate an X25519 public key: 32 bytes and not a point of small order (with such a
    point every shared secret is all zeros, i.e. public). Raises :class:`InvalidKeyError`."""
    global _PROBE
    pk = _check_len(public_key, "X25519 public key")
    if _PROBE is None:
        _PROBE = X25519PrivateKey.generate()
    try:
        _PROBE.exchange(X25519PublicKey.from_public_bytes(pk))
    except ValueError as exc:
        raise InvalidKeyError("public key is a low-order point") from exc
    return pk


def derive_key(
    secret: bytes,
    context: MessageContext | bytes,
    *,
    label: str,
    length: int = KEY_BYTES,
) -> bytes:
    """HKDF-SHA256 of ``secret`` with info = domain ‖ label ‖ context (domain separation)."""
    if not secret:
        raise InvalidKeyError("empty secret")
    info_ctx = context if isinstance(context, (bytes, bytearray)) else context.to_bytes()
    label_b = label.encode()
    info = b"".join(
        (_DOMAIN, len(label_b).to_bytes(2, "big"), label_b, bytes(info_ctx))
    )
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(secret)


def expand_key(prk: bytes, info: bytes, *, label: str) -> bytes:
    """HKDF-Expand (RFC 5869, one 32-byte block) of a uniformly random 256-bit key ``prk``
    with info = domain ‖ label ‖ ``info``. Use only when ``prk`` is already a uniform key
    (a derived root or a fresh random seed); raw Diffie–Hellman output needs
    :func:`derive_key` (extract and expand)."""
    prk = _check_len(prk, "expansion key")
    label_b = label.encode()
    msg = b"".join((_DOMAIN, len(label_b).to_bytes(2, "big"), label_b, bytes(info), b"\x01"))
    return hmac.new(prk, msg, hashlib.sha256).digest()


def ring_keystream(
    key: bytes,
    n: int,
    *,
    nonce: bytes | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fill ``n`` uniform int64 ring elements from a ChaCha20 keystream under ``key``.

    ``nonce`` is ChaCha20's 16-byte counter‖nonce block (default zero: derive a fresh key
    per use instead). ``out`` (contiguous int64 CPU tensor, ``n`` elements) is filled in place
    with no extra copy beyond the cipher's output.
    """
    key = _check_len(key, "keystream key")
    nonce = _ZERO_NONCE if nonce is None else nonce
    if len(nonce) != _NONCE_BYTES:
        raise InvalidKeyError(f"ChaCha20 nonce must be {_NONCE_BYTES} bytes")
    if n < 0:
        raise ValueError("n must be >= 0")
    if out is None:
        out = torch.empty(n, dtype=torch.int64)
    elif out.dtype != torch.int64 or out.numel() != n or not out.is_contiguous() or out.is_cuda:
        raise ValueError("out must be a contiguous int64 CPU tensor with n elements")
    if n == 0:
        return out
    buf = out.numpy().reshape(-1).view(np.uint8)
    encryptor = Cipher(algorithms.ChaCha20(key, nonce), mode=None).encryptor()
    # Encrypting zeros yields the raw keystream; update_into writes straight into `out`.
    encryptor.update_into(bytes(len(buf)), buf.data)
    return out


def random_key() -> bytes:
    """A fresh 256-bit key from the OS CSPRNG."""
    return os.urandom(KEY_BYTES)

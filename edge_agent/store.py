"""Device-local SQLite store: contacts (pseudonymous handles), status, keys.

Private keys are encrypted at rest with ChaCha20-Poly1305 under a key derived by scrypt
from a passphrase (argument, or the ``LPM_EDGE_PASSPHRASE`` environment variable); the key
name is the associated data, so ciphertexts cannot be swapped between names.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import sqlite3
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

__all__ = ["EdgeStore", "EdgeStoreError", "WrongPassphraseError", "pseudonym", "PASSPHRASE_ENV"]

PASSPHRASE_ENV = "LPM_EDGE_PASSPHRASE"
_SCRYPT_N = 2**14
_AAD_PREFIX = b"lpm-edge/edge-store/key/v1\x00"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS contacts (handle TEXT PRIMARY KEY, weight REAL NOT NULL);
CREATE TABLE IF NOT EXISTS status (k TEXT PRIMARY KEY, v TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS keys (name TEXT PRIMARY KEY, nonce BLOB NOT NULL, ct BLOB NOT NULL);
"""


class EdgeStoreError(RuntimeError):
    """Invalid edge-store operation."""


class WrongPassphraseError(EdgeStoreError):
    """A stored private key could not be decrypted (wrong passphrase or tampered data)."""


def pseudonym(secret: bytes, identifier: str) -> str:
    """A stable pseudonymous handle for ``identifier`` (HMAC-SHA256 under ``secret``)."""
    if len(secret) < 16:
        raise EdgeStoreError("pseudonym secret must be at least 16 bytes")
    return hmac.new(secret, identifier.encode(), hashlib.sha256).hexdigest()[:32]


class EdgeStore:
    """One device's store. ``passphrase`` (or ``$LPM_EDGE_PASSPHRASE``) unlocks its keys."""

    def __init__(self, path: str | Path, passphrase: str | bytes | None = None) -> None:
        if passphrase is None:
            passphrase = os.environ.get(PASSPHRASE_ENV)
        if not passphrase:
            raise EdgeStoreError(f"a passphrase is required (argument or ${PASSPHRASE_ENV})")
        self._con = sqlite3.connect(str(path), isolation_level=None, timeout=30.0)
        self._con.execute("PRAGMA journal_mode=WAL")
        self._con.executescript(_SCHEMA)
        row = self._con.execute("SELECT v FROM meta WHERE k = 'salt'").fetchone()
        if row is None:
            salt = os.urandom(16)
            self._con.execute("INSERT INTO meta VALUES ('salt', ?)", (salt,))
        else:
            salt = bytes(row[0])
        pw = passphrase.encode() if isinstance(passphrase, str) else bytes(passphrase)
        key = Scrypt(salt=salt, length=32, n=_SCRYPT_N, r=8, p=1).derive(pw)
        self._aead = ChaCha20Poly1305(key)

    def close(self) -> None:
        self._con.close()

    # ------------------------------------------------------------------ contacts
    def set_contacts(self, contacts: dict[str, float]) -> None:
        """Replace the contact list: ``{handle: weight}`` (weights finite and >= 0)."""
        for h, w in contacts.items():
            if not h or not (w >= 0.0 and w < float("inf")):
                raise EdgeStoreError(f"invalid contact {h!r} with weight {w!r}")
        self._con.execute("BEGIN IMMEDIATE")
        try:
            self._con.execute("DELETE FROM contacts")
            self._con.executemany("INSERT INTO contacts VALUES (?, ?)",
                                  [(h, float(w)) for h, w in contacts.items()])
            self._con.execute("COMMIT")
        except BaseException:
            self._con.execute("ROLLBACK")
            raise

    def contacts(self) -> dict[str, float]:
        return {h: w for h, w in self._con.execute("SELECT handle, weight FROM contacts "
                                                    "ORDER BY handle")}

    # ------------------------------------------------------------------ status
    def set_status(self, key: str, value: Any) -> None:
        self._con.execute("INSERT OR REPLACE INTO status VALUES (?, ?)", (key, json.dumps(value)))

    def status(self, key: str, default: Any = None) -> Any:
        row = self._con.execute("SELECT v FROM status WHERE k = ?", (key,)).fetchone()
        return default if row is None else json.loads(row[0])

    # ------------------------------------------------------------------ keys
    def put_private_key(self, name: str, raw: bytes) -> None:
        """Encrypt and store a private key under ``name``."""
        if not raw:
            raise EdgeStoreError("empty key")
        nonce = os.urandom(12)
        ct = self._aead.encrypt(nonce, bytes(raw), _AAD_PREFIX + name.encode())
        self._con.execute("INSERT OR REPLACE INTO keys VALUES (?, ?, ?)", (name, nonce, ct))

    def get_private_key(self, name: str) -> bytes:
        """Decrypt the key ``name``; raises ``KeyError`` if absent, ``WrongPassphraseError``."""
        row = self._con.execute("SELECT nonce, ct FROM keys WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise KeyError(name)
        try:
            return self._aead.decrypt(bytes(row[0]), bytes(row[1]), _AAD_PREFIX + name.encode())
        except InvalidTag:
            raise WrongPassphraseError(f"cannot decrypt key {name!r}") from None

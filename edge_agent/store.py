"""Device-local encrypted store: contacts (pseudonymous handles + weights), status (S/I/R,
day, risk, …), private keys and the last accepted model bundle.

Every private row is sealed with ChaCha20-Poly1305 under a key derived by scrypt from a
passphrase (argument, or ``$LPM_EDGE_PASSPHRASE``) and a per-store random salt. A row is
addressed by an HMAC of its kind and name (names are not stored in the clear) and its kind
and name are the associated data, so ciphertexts cannot be moved between rows. Only the
format version, the salt and a verifier record are plaintext. The verifier is checked at
open, so a wrong passphrase fails at once (:class:`WrongPassphraseError`) instead of
writing rows under a second key. The files (database, ``-wal``, ``-shm``) are mode 0600.

Open it once per unit of work, as a context manager: derived keys are cached per process
(keyed by salt and a hash of the passphrase), so re-opening costs no scrypt::

    with EdgeStore(path) as store:
        store.put_private_key("run/nb_key", raw)
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
import sqlite3
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

__all__ = ["EdgeStore", "EdgeStoreError", "WrongPassphraseError", "pseudonym", "PASSPHRASE_ENV",
           "MIN_PASSPHRASE_CHARS", "FORMAT"]

PASSPHRASE_ENV = "LPM_EDGE_PASSPHRASE"
MIN_PASSPHRASE_CHARS = 8
FORMAT = b"lpm-edge/edge-store/v2"
_SCRYPT_N = 2**14
_AAD = b"lpm-edge/edge-store/row/v2\x00"
_VERIFIER_AAD = b"lpm-edge/edge-store/verifier/v2"
_VERIFIER = b"lpm-edge edge store passphrase verifier"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS sealed (id TEXT PRIMARY KEY, nonce BLOB NOT NULL, ct BLOB NOT NULL);
"""
_OLD_TABLES = {"contacts", "status", "keys"}

_key_cache: OrderedDict[tuple[bytes, bytes], bytes] = OrderedDict()
_key_cache_lock = threading.Lock()


class EdgeStoreError(RuntimeError):
    """Invalid edge-store operation, or a store that cannot be opened (damaged, truncated)."""


class WrongPassphraseError(EdgeStoreError):
    """The passphrase does not open this store (or its data was tampered with)."""


def pseudonym(secret: bytes, identifier: str) -> str:
    """A stable pseudonymous handle for ``identifier`` (HMAC-SHA256 under ``secret``)."""
    if len(secret) < 16:
        raise EdgeStoreError("pseudonym secret must be at least 16 bytes")
    return hmac.new(secret, identifier.encode(), hashlib.sha256).hexdigest()[:32]


def _derive(salt: bytes, passphrase: bytes) -> bytes:
    """scrypt(passphrase, salt), cached per process (16 entries)."""
    tag = (salt, hashlib.blake2b(passphrase, key=salt[:64], digest_size=32).digest())
    with _key_cache_lock:
        if tag in _key_cache:
            _key_cache.move_to_end(tag)
            return _key_cache[tag]
    key = Scrypt(salt=salt, length=32, n=_SCRYPT_N, r=8, p=1).derive(passphrase)
    with _key_cache_lock:
        _key_cache[tag] = key
        while len(_key_cache) > 16:
            _key_cache.popitem(last=False)
    return key


def _private_file(path: Path) -> None:
    """Create ``path`` mode 0600 (SQLite gives -wal/-shm the database file's mode)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.close(fd)
    for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        if p.exists():
            os.chmod(p, 0o600)


class EdgeStore:
    """One device's store. ``passphrase`` (or ``$LPM_EDGE_PASSPHRASE``) opens it; a new store
    needs one of at least :data:`MIN_PASSPHRASE_CHARS` characters. :attr:`opens` counts the
    stores opened in this process (a test checks a device opens its store once a message)."""

    opens: int = 0

    def __init__(self, path: str | Path, passphrase: str | bytes | None = None) -> None:
        if passphrase is None:
            passphrase = os.environ.get(PASSPHRASE_ENV)
        if not passphrase:
            raise EdgeStoreError(f"a passphrase is required (argument or ${PASSPHRASE_ENV})")
        pw = passphrase.encode() if isinstance(passphrase, str) else bytes(passphrase)
        del passphrase
        self.path = Path(path)
        self._con: sqlite3.Connection | None = None
        try:
            _private_file(self.path)
            self._con = sqlite3.connect(str(self.path), isolation_level=None, timeout=30.0)
            self._con.execute("PRAGMA journal_mode=WAL")
            key = self._open(pw)
        except sqlite3.Error as exc:
            self.close()
            raise EdgeStoreError(f"cannot open edge store {self.path}: {exc}") from None
        except OSError as exc:
            self.close()
            raise EdgeStoreError(f"cannot open edge store {self.path}: {exc.strerror}") from None
        except BaseException:
            self.close()
            raise
        EdgeStore.opens += 1
        self._aead = ChaCha20Poly1305(key)
        self._index = hmac.new(key, b"lpm-edge/edge-store/index/v2", hashlib.sha256).digest()
        for p in (Path(f"{self.path}-wal"), Path(f"{self.path}-shm")):
            if p.exists():
                os.chmod(p, 0o600)

    def _open(self, pw: bytes) -> bytes:
        con = self._con
        assert con is not None
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if tables & _OLD_TABLES and "sealed" not in tables:
            raise EdgeStoreError(f"edge store {self.path} has the old plaintext format; "
                                 "move it aside and enrol the device again")
        con.executescript(_SCHEMA)
        meta = {k: bytes(v) for k, v in con.execute("SELECT k, v FROM meta")}
        has_rows = con.execute("SELECT 1 FROM sealed LIMIT 1").fetchone() is not None
        if not meta and not has_rows:  # a new store
            if len(pw) < MIN_PASSPHRASE_CHARS:
                raise EdgeStoreError(f"a new store needs a passphrase of at least "
                                     f"{MIN_PASSPHRASE_CHARS} characters")
            salt = os.urandom(16)
            key = _derive(salt, pw)
            nonce = os.urandom(12)
            verifier = nonce + ChaCha20Poly1305(key).encrypt(nonce, _VERIFIER, _VERIFIER_AAD)
            con.execute("BEGIN IMMEDIATE")
            con.executemany("INSERT INTO meta VALUES (?, ?)",
                            [("format", FORMAT), ("salt", salt), ("verifier", verifier)])
            con.execute("COMMIT")
            return key
        missing = [k for k in ("format", "salt", "verifier") if k not in meta]
        if missing:
            raise EdgeStoreError(f"edge store {self.path} is damaged: {', '.join(missing)} "
                                 "missing (refusing to create new keys over old data)")
        if meta["format"] != FORMAT:
            raise EdgeStoreError(f"edge store {self.path} has unknown format "
                                 f"{meta['format'][:40]!r}")
        key = _derive(meta["salt"], pw)
        v = meta["verifier"]
        try:
            ChaCha20Poly1305(key).decrypt(v[:12], v[12:], _VERIFIER_AAD)
        except (InvalidTag, ValueError):
            raise WrongPassphraseError(f"wrong passphrase for edge store {self.path}") from None
        return key

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        if self._con is not None:
            self._con.close()
            self._con = None

    def __enter__(self) -> EdgeStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"EdgeStore({str(self.path)!r})"

    # ------------------------------------------------------------------ sealed rows
    def _conn(self) -> sqlite3.Connection:
        if self._con is None:
            raise EdgeStoreError("edge store is closed")
        return self._con

    def _id(self, kind: str, name: str) -> str:
        return hmac.new(self._index, f"{kind}\x00{name}".encode(), hashlib.sha256).hexdigest()

    def _put(self, kind: str, name: str, value: bytes) -> None:
        nonce = os.urandom(12)
        ct = self._aead.encrypt(nonce, value, _AAD + f"{kind}\x00{name}".encode())
        try:
            self._conn().execute("INSERT OR REPLACE INTO sealed VALUES (?, ?, ?)",
                                 (self._id(kind, name), nonce, ct))
        except sqlite3.Error as exc:
            raise EdgeStoreError(f"edge store {self.path}: {exc}") from None

    def _get(self, kind: str, name: str) -> bytes | None:
        try:
            row = self._conn().execute("SELECT nonce, ct FROM sealed WHERE id = ?",
                                       (self._id(kind, name),)).fetchone()
        except sqlite3.Error as exc:
            raise EdgeStoreError(f"edge store {self.path}: {exc}") from None
        if row is None:
            return None
        try:
            return self._aead.decrypt(bytes(row[0]), bytes(row[1]),
                                      _AAD + f"{kind}\x00{name}".encode())
        except InvalidTag:
            raise WrongPassphraseError(f"edge store {self.path}: {kind} {name!r} does not "
                                       "decrypt (tampered or moved)") from None

    # ------------------------------------------------------------------ contacts
    def set_contacts(self, contacts: dict[str, float]) -> None:
        """Replace the contact list: ``{handle: weight}`` (weights finite and >= 0)."""
        clean: dict[str, float] = {}
        for h, w in contacts.items():
            if not isinstance(h, str) or not h or not isinstance(w, int | float) \
                    or not (w >= 0.0 and math.isfinite(w)):
                raise EdgeStoreError(f"invalid contact {h!r} with weight {w!r}")
            clean[h] = float(w)
        self._put("contacts", "", json.dumps(clean, sort_keys=True).encode())

    def contacts(self) -> dict[str, float]:
        raw = self._get("contacts", "")
        return {} if raw is None else dict(sorted(json.loads(raw).items()))

    # ------------------------------------------------------------------ status
    def set_status(self, key: str, value: Any) -> None:
        """Store a JSON value (S/I/R, day, risk, …) under ``key``."""
        try:
            data = json.dumps(value, allow_nan=False).encode()
        except (TypeError, ValueError) as exc:
            raise EdgeStoreError(f"status {key!r} is not finite JSON: {exc}") from None
        self._put("status", key, data)

    def status(self, key: str, default: Any = None) -> Any:
        raw = self._get("status", key)
        return default if raw is None else json.loads(raw)

    # ------------------------------------------------------------------ keys
    def put_private_key(self, name: str, raw: bytes) -> None:
        """Encrypt and store a private key under ``name``."""
        if not raw:
            raise EdgeStoreError("empty key")
        self._put("key", name, bytes(raw))

    def get_private_key(self, name: str) -> bytes:
        """Decrypt the key ``name``; raises ``KeyError`` if absent."""
        raw = self._get("key", name)
        if raw is None:
            raise KeyError(name)
        return raw

    # ------------------------------------------------------------------ bundles
    def accepted_bundle(self) -> dict[str, Any] | None:
        """The record of the last model bundle this device accepted (anti-rollback state,
        ``mobile_export.bundle.AcceptedBundle.to_dict()``), or ``None``."""
        return self.status("bundle/accepted")

    def accept_bundle(self, record: dict[str, Any]) -> None:
        """Remember ``record`` as the last accepted bundle."""
        self.set_status("bundle/accepted", record)

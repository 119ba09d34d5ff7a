"""Signed model bundles: one file holding a manifest, its Ed25519 signature and the .ort model.

File layout (all lengths unsigned 32-bit big-endian, nothing may follow the model)::

    b"LPMBNDL\\x01"                      8-byte magic, format version 1
    u32 len | manifest                   canonical JSON (UTF-8, sorted keys, no spaces)
    u32 len | signature                  64-byte Ed25519 signature (length 0 = unsigned)
    u32 len | model                      onnxruntime .ort flatbuffer

The signature covers ``SIGNATURE_DOMAIN + manifest`` and the manifest pins the model's sha256
and size, so the signature covers the model too. A device checks, in this order: container
layout → signature under the key it trusts → manifest fields → model hash and size; only then
are the model bytes handed to onnxruntime (``mobile_export.runtime``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from mobile_export.errors import (
    BundleFormatError,
    BundleIntegrityError,
    BundleRollbackError,
    BundleSignatureError,
)
from mobile_export.schema import STATE_FIELDS, THETA_FIELDS, Theta, io_schema

if TYPE_CHECKING:
    from mobile_export.model import PersonalForecast

MAGIC = b"LPMBNDL\x01"
SIGNATURE_DOMAIN = b"lpm-edge/mobile-bundle/v1\x00"
BUNDLE_FORMAT = "lpm-forecast-bundle"
FORMAT_VERSION = 1
MAX_MANIFEST_BYTES = 64 * 1024
MAX_MODEL_BYTES = 8 * 1024 * 1024
_U32 = struct.Struct(">I")


class Signer(Protocol):
    """Anything that signs with Ed25519 and exposes its raw 32-byte public key
    (``protocols.keys.IdentityKey`` fits)."""

    def sign(self, data: bytes) -> bytes: ...

    def public_bytes(self) -> bytes: ...


SigningKey = Ed25519PrivateKey | Signer
PublicKey = Ed25519PublicKey | bytes


def canonical_json(obj: Mapping[str, Any]) -> bytes:
    """The canonical byte form of a manifest (what is signed)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _public_raw(key: PublicKey) -> bytes:
    if isinstance(key, Ed25519PublicKey):
        return key.public_bytes_raw()
    if isinstance(key, bytes | bytearray) and len(key) == 32:
        return bytes(key)
    raise TypeError("a trusted public key is an Ed25519PublicKey or its 32 raw bytes")


def _signer_public_raw(key: SigningKey) -> bytes:
    if isinstance(key, Ed25519PrivateKey):
        return _public_raw(key.public_key())
    if hasattr(key, "sign") and hasattr(key, "public_bytes"):
        raw = key.public_bytes()
        return _public_raw(raw if isinstance(raw, bytes) else bytes(raw))
    raise TypeError("a signing key is an Ed25519PrivateKey or an object with sign/public_bytes")


def make_manifest(
    model_bytes: bytes,
    *,
    theta: Theta,
    layers: tuple[str, ...],
    isolation_applies: tuple[float, ...],
    opset: int,
    model_version: str,
    signer_public_key: bytes,
    producer: Mapping[str, str],
    default_horizon: int,
    created: datetime | None = None,
) -> dict[str, Any]:
    """The manifest for ``model_bytes`` (an .ort model)."""
    created = created or datetime.now(UTC)
    return {
        "format": BUNDLE_FORMAT,
        "format_version": FORMAT_VERSION,
        "model_version": model_version,
        "created": created.astimezone(UTC).isoformat(timespec="seconds"),
        "model_format": "ort",
        "model_sha256": hashlib.sha256(model_bytes).hexdigest(),
        "model_size": len(model_bytes),
        "opset": opset,
        "theta": {"beta": float(theta.beta), "dt": float(theta.dt)},
        "layers": list(layers),
        "isolation_applies": list(isolation_applies),
        "state_fields": list(STATE_FIELDS),
        "theta_fields": list(THETA_FIELDS),
        "default_horizon": default_horizon,
        **io_schema(len(layers)),
        "signer": signer_public_key.hex(),
        "producer": dict(producer),
    }


def pack(manifest_bytes: bytes, signature: bytes, model_bytes: bytes) -> bytes:
    """Assemble the container bytes (no checks: use :func:`build_bundle`)."""
    out = bytearray(MAGIC)
    for part in (manifest_bytes, signature, model_bytes):
        out += _U32.pack(len(part))
        out += part
    return bytes(out)


def unpack(blob: bytes) -> tuple[bytes, bytes, bytes]:
    """Split container bytes into (manifest, signature, model); strict about the layout."""
    if len(blob) < len(MAGIC) or blob[: len(MAGIC)] != MAGIC:
        raise BundleFormatError("not an lpm model bundle (bad magic or unsupported version)")
    parts: list[bytes] = []
    pos = len(MAGIC)
    limits = (MAX_MANIFEST_BYTES, 1024, MAX_MODEL_BYTES)
    for name, limit in zip(("manifest", "signature", "model"), limits, strict=True):
        if pos + _U32.size > len(blob):
            raise BundleFormatError(f"bundle truncated before the {name} length")
        (length,) = _U32.unpack_from(blob, pos)
        pos += _U32.size
        if length > limit:
            raise BundleFormatError(f"bundle {name} is {length} bytes, limit {limit}")
        if pos + length > len(blob):
            raise BundleFormatError(f"bundle truncated inside the {name}")
        parts.append(blob[pos : pos + length])
        pos += length
    if pos != len(blob):
        raise BundleFormatError(f"{len(blob) - pos} unexpected bytes after the model")
    return parts[0], parts[1], parts[2]


def build_bundle(
    model_or_theta: PersonalForecast | Theta | None,
    signing_key: SigningKey,
    out_path: str | os.PathLike[str],
    *,
    theta: Theta | None = None,
    model_version: str = "1",
    created: datetime | None = None,
) -> Path:
    """Export, convert to .ort, write a signed bundle to ``out_path`` and return its path.

    ``model_or_theta`` is a :class:`PersonalForecast` (θ from ``theta``, default
    :class:`Theta`) or a :class:`Theta` (default model). The export is cached per process, so
    re-signing with a new θ costs milliseconds. Imports torch (the device side does not).
    """
    import onnx
    import onnxruntime as ort
    import torch

    from mobile_export.export import export_artifacts
    from mobile_export.model import DEFAULT_HORIZON, PersonalForecast

    if isinstance(model_or_theta, Theta):
        if theta is not None:
            raise TypeError("give θ once: either as model_or_theta or as theta=")
        model, theta = PersonalForecast(), model_or_theta
    elif model_or_theta is None or isinstance(model_or_theta, PersonalForecast):
        model, theta = model_or_theta or PersonalForecast(), theta or Theta()
    else:
        raise TypeError("model_or_theta must be a PersonalForecast, a Theta or None")
    if not (math.isfinite(theta.beta) and math.isfinite(theta.dt)
            and theta.beta >= 0 and theta.dt > 0):
        raise ValueError(f"θ out of range: {theta}")
    artifacts = export_artifacts(model)
    public = _signer_public_raw(signing_key)
    manifest = make_manifest(
        artifacts.ort,
        theta=theta,
        layers=model.layers,
        isolation_applies=tuple(float(v) for v in model.isolation_applies.flatten().tolist()),
        opset=artifacts.opset,
        model_version=model_version,
        signer_public_key=public,
        producer={
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": ort.__version__,
        },
        default_horizon=DEFAULT_HORIZON,
        created=created,
    )
    manifest_bytes = canonical_json(manifest)
    signature = signing_key.sign(SIGNATURE_DOMAIN + manifest_bytes)
    blob = pack(manifest_bytes, signature, artifacts.ort)
    verify_bundle_bytes(blob, public)  # a signer whose public_bytes() lies is caught here
    out = Path(out_path)
    _write_atomic(out, blob)
    return out


def _write_atomic(out: Path, blob: bytes) -> None:
    """Write ``blob`` to ``out`` through a fresh, unpredictable temporary file in the same
    folder (``O_EXCL``: never follows a planted link), then rename it over ``out``."""
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent or ".")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(blob)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


@dataclass(frozen=True)
class VerifiedBundle:
    """A bundle whose signature, manifest and model hash have been checked."""

    manifest: dict[str, Any]
    model: bytes
    manifest_sha256: str = ""

    def accepted(self) -> AcceptedBundle:
        """The anti-rollback record to keep once the device accepts this bundle."""
        return AcceptedBundle(self.created, self.manifest_sha256, self.manifest["model_version"])

    @property
    def theta(self) -> Theta:
        return Theta(**self.manifest["theta"])

    @property
    def created(self) -> datetime:
        """When the coordinator signed it (store it; pass it as ``not_before`` next time)."""
        return datetime.fromisoformat(self.manifest["created"])


@dataclass(frozen=True)
class AcceptedBundle:
    """What a device remembers about the last bundle it accepted: the signed creation time
    and the hash of the signed manifest. A later bundle must be strictly newer, or the very
    same manifest (re-verifying what was accepted is fine; a different bundle with the same
    timestamp is not)."""

    created: datetime
    manifest_sha256: str
    model_version: str = ""

    def __post_init__(self) -> None:
        if self.created.tzinfo is None:
            raise BundleRollbackError("the accepted bundle's time must be timezone-aware")
        if not _SHA256.fullmatch(self.manifest_sha256):
            raise BundleRollbackError("the accepted bundle's manifest hash is not sha256 hex")

    def to_dict(self) -> dict[str, str]:
        return {"created": self.created.isoformat(), "manifest_sha256": self.manifest_sha256,
                "model_version": self.model_version}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AcceptedBundle:
        try:
            return cls(datetime.fromisoformat(str(data["created"])),
                       str(data["manifest_sha256"]), str(data.get("model_version", "")))
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleRollbackError(f"stored anti-rollback record is unreadable: {exc}") from exc


class RollbackState(Protocol):
    """Where a device keeps its anti-rollback record (``edge_agent.store.EdgeStore`` fits)."""

    def accepted_bundle(self) -> dict[str, Any] | None: ...

    def accept_bundle(self, record: dict[str, Any]) -> None: ...


def verify_with_rollback(blob: bytes, trusted_public_key: PublicKey,
                         state: RollbackState) -> VerifiedBundle:
    """Verify ``blob`` against the device's last accepted bundle in ``state``, then record it
    as accepted (only ever moving forward)."""
    record = state.accepted_bundle()
    last = None if record is None else AcceptedBundle.from_dict(record)
    verified = verify_bundle_bytes(blob, trusted_public_key, last_accepted=last)
    if last is None or verified.created > last.created:
        state.accept_bundle(verified.accepted().to_dict())
    return verified


_SHA256 = re.compile("[0-9a-f]{64}")
_MAX_DEPTH = 8  # the manifest schema nests 4 levels deep


def _depth_ok(text: str) -> bool:
    """Cheap pre-parse bound on bracket nesting (strings may contain brackets: counting them
    only over-estimates, which is safe)."""
    depth = 0
    for ch in text:
        if ch in "[{":
            depth += 1
            if depth > _MAX_DEPTH:
                return False
        elif ch in "]}":
            depth -= 1
    return True


def _no_constants(name: str) -> float:
    raise BundleFormatError(f"manifest holds a non-finite number ({name})")


def _parse_created(value: str) -> datetime:
    try:
        created = datetime.fromisoformat(value)
    except ValueError as exc:
        raise BundleFormatError(f"manifest 'created' is not ISO-8601: {value[:40]!r}") from exc
    if created.tzinfo is None:
        raise BundleFormatError("manifest 'created' has no timezone")
    return created


_REQUIRED: dict[str, type | tuple[type, ...]] = {
    "format": str,
    "format_version": int,
    "model_version": str,
    "created": str,
    "model_format": str,
    "model_sha256": str,
    "model_size": int,
    "opset": int,
    "theta": dict,
    "layers": list,
    "isolation_applies": list,
    "state_fields": list,
    "theta_fields": list,
    "default_horizon": int,
    "inputs": list,
    "outputs": list,
}


def _check_manifest(manifest: Any) -> dict[str, Any]:
    if not isinstance(manifest, dict):
        raise BundleFormatError("manifest is not a JSON object")
    for field, kind in _REQUIRED.items():
        if not isinstance(manifest.get(field), kind):
            raise BundleFormatError(f"manifest field {field!r} missing or of the wrong type")
    if manifest["format"] != BUNDLE_FORMAT or manifest["format_version"] != FORMAT_VERSION:
        raise BundleFormatError(
            f"unsupported bundle {manifest['format']!r} v{manifest['format_version']}"
        )
    if manifest["model_format"] != "ort":
        raise BundleFormatError(f"unsupported model format {manifest['model_format']!r}")
    if not 1 <= manifest["opset"] <= 21:
        raise BundleFormatError(f"opset {manifest['opset']} outside 1..21")
    theta = manifest["theta"]
    if set(theta) != set(THETA_FIELDS) or not all(
        isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
        for v in theta.values()
    ):
        raise BundleFormatError(f"manifest θ must have finite numeric fields {THETA_FIELDS}")
    if not (theta["beta"] >= 0 and theta["dt"] > 0):
        raise BundleFormatError(f"manifest θ out of range (β ≥ 0, dt > 0): {theta}")
    _parse_created(manifest["created"])
    if not _SHA256.fullmatch(manifest["model_sha256"]) or not 0 < manifest["model_size"]:
        raise BundleFormatError("manifest model hash or size is malformed")
    if not 1 <= manifest["default_horizon"] <= 366:
        raise BundleFormatError("manifest default_horizon outside 1..366")
    if not all(isinstance(v, int | float) and not isinstance(v, bool) and 0 <= v <= 1
               for v in manifest["isolation_applies"]):
        raise BundleFormatError("manifest isolation_applies must be numbers in [0, 1]")
    if manifest["state_fields"] != list(STATE_FIELDS):
        raise BundleFormatError("manifest state layout differs from this runtime's")
    if manifest["theta_fields"] != list(THETA_FIELDS):
        raise BundleFormatError("manifest θ layout differs from this runtime's")
    if len(manifest["layers"]) != len(manifest["isolation_applies"]) or not manifest["layers"]:
        raise BundleFormatError("manifest layers and isolation_applies disagree")
    expected = io_schema(len(manifest["layers"]))
    if manifest["inputs"] != expected["inputs"] or manifest["outputs"] != expected["outputs"]:
        raise BundleFormatError("manifest input/output schema differs from this runtime's")
    return manifest


def verify_bundle_bytes(
    blob: bytes,
    trusted_public_key: PublicKey,
    *,
    not_before: datetime | None = None,
    last_accepted: AcceptedBundle | None = None,
) -> VerifiedBundle:
    """Check a bundle's bytes; raise a :class:`~mobile_export.errors.BundleError` subclass
    unless it is well formed, signed by ``trusted_public_key`` and its model matches.

    ``not_before`` (timezone-aware) refuses validly signed but older bundles with
    :class:`~mobile_export.errors.BundleRollbackError`: pass the ``created`` time of the
    bundle the device last accepted, so a relay cannot replay a stale θ. ``last_accepted``
    (an :class:`AcceptedBundle`) is stricter: it also refuses a *different* bundle with the
    same timestamp. A device keeps it with :func:`verify_with_rollback`.
    """
    if not_before is not None and (not isinstance(not_before, datetime)
                                   or not_before.tzinfo is None):
        raise BundleRollbackError("not_before must be a timezone-aware datetime")
    trusted = Ed25519PublicKey.from_public_bytes(_public_raw(trusted_public_key))
    manifest_bytes, signature, model = unpack(blob)
    if not signature:
        raise BundleSignatureError("bundle is unsigned")
    if len(signature) != 64:
        raise BundleSignatureError(f"signature is {len(signature)} bytes, expected 64")
    try:
        trusted.verify(signature, SIGNATURE_DOMAIN + manifest_bytes)
    except InvalidSignature:
        raise BundleSignatureError(
            "bundle signature does not verify under the trusted key "
            "(tampered manifest or signed by another key)"
        ) from None
    try:
        text = manifest_bytes.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BundleFormatError(f"signed manifest is not UTF-8: {exc}") from exc
    if not _depth_ok(text):
        raise BundleFormatError(f"signed manifest nests deeper than {_MAX_DEPTH} levels")
    try:
        manifest = json.loads(text, parse_constant=_no_constants)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise BundleFormatError(f"signed manifest is not valid JSON: {exc}") from None
    manifest = _check_manifest(manifest)
    if len(model) != manifest["model_size"]:
        raise BundleIntegrityError(
            f"model is {len(model)} bytes, the signed manifest says {manifest['model_size']}"
        )
    if hashlib.sha256(model).hexdigest() != manifest["model_sha256"]:
        raise BundleIntegrityError("model sha256 differs from the signed manifest (tampered)")
    created = _parse_created(manifest["created"])
    if not_before is not None and created < not_before:
        raise BundleRollbackError(
            f"bundle created {created.isoformat()} is older than {not_before.isoformat()}"
        )
    digest = hashlib.sha256(manifest_bytes).hexdigest()
    if last_accepted is not None:
        if created < last_accepted.created:
            raise BundleRollbackError(
                f"bundle created {created.isoformat()} is older than the accepted "
                f"{last_accepted.created.isoformat()} (version {last_accepted.model_version!r})"
            )
        if created == last_accepted.created and digest != last_accepted.manifest_sha256:
            raise BundleRollbackError(
                f"a different bundle with the accepted bundle's timestamp {created.isoformat()}"
            )
    return VerifiedBundle(manifest=manifest, model=model, manifest_sha256=digest)


def read_bundle_bytes(path: str | os.PathLike[str]) -> bytes:
    """A bundle file's bytes (size-bounded); unreadable → :class:`BundleFormatError`."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_MODEL_BYTES + MAX_MANIFEST_BYTES + 1024 + 64:
            raise BundleFormatError(f"bundle {path} is {size} bytes, too large")
        return path.read_bytes()
    except OSError as exc:
        raise BundleFormatError(f"cannot read bundle {path}: {exc}") from exc


def read_verified_bundle(
    path: str | os.PathLike[str],
    trusted_public_key: PublicKey,
    *,
    not_before: datetime | None = None,
    last_accepted: AcceptedBundle | None = None,
) -> VerifiedBundle:
    """Read and verify a bundle file (see :func:`verify_bundle_bytes`)."""
    return verify_bundle_bytes(read_bundle_bytes(path), trusted_public_key,
                               not_before=not_before, last_accepted=last_accepted)

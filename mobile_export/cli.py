"""`lpm bundle …` commands: make a signing key, build and verify signed forecast bundles."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from mobile_export.bundle import (
    build_bundle,
    read_bundle_bytes,
    read_verified_bundle,
    verify_with_rollback,
)
from mobile_export.errors import MobileExportError
from mobile_export.model import Theta

bundle_app = typer.Typer(help="Signed on-device forecast bundles.", no_args_is_help=True)


def _public_hex(key: Ed25519PrivateKey) -> str:
    return key.public_key().public_bytes_raw().hex()


def load_signing_key(path: Path) -> Ed25519PrivateKey:
    """Read an Ed25519 private key stored as 64 hex characters (raw 32 bytes)."""
    try:
        raw = bytes.fromhex(path.read_text().strip())
    except (OSError, ValueError) as exc:
        raise typer.BadParameter(f"cannot read a hex Ed25519 key from {path}: {exc}") from exc
    if len(raw) != 32:
        raise typer.BadParameter(f"{path} does not hold a 32-byte Ed25519 private key")
    return Ed25519PrivateKey.from_private_bytes(raw)


@bundle_app.command("keygen")
def keygen(
    out: Annotated[Path, typer.Option(help="Where to write the private key (mode 0600).")],
) -> None:
    """Create an Ed25519 signing key; prints the public key devices should trust."""
    key = Ed25519PrivateKey.generate()
    raw = key.private_bytes_raw()
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(raw.hex() + "\n")
    typer.echo(_public_hex(key))


@bundle_app.command("build")
def build(
    signing_key: Annotated[Path, typer.Option(help="Key file from `lpm bundle keygen`.")],
    out: Annotated[Path, typer.Option(help="Bundle file to write (.lpmb).")],
    beta: Annotated[float, typer.Option(min=0.0)] = 0.5,
    dt: Annotated[float, typer.Option(min=1e-9)] = 1.0,
    model_version: Annotated[str, typer.Option()] = "1",
) -> None:
    """Export the forecast model, convert it to .ort and write a signed bundle."""
    try:
        path = build_bundle(
            Theta(beta=beta, dt=dt), load_signing_key(signing_key), out,
            model_version=model_version,
        )
    except ValueError as exc:  # θ out of range (NaN, inf)
        raise typer.BadParameter(str(exc)) from exc
    except OSError as exc:
        typer.echo(f"error: cannot write {out}: {exc.strerror}", err=True)
        raise typer.Exit(code=1) from exc
    typer.echo(f"{path} ({path.stat().st_size} bytes)")


@bundle_app.command("verify")
def verify(
    bundle: Annotated[Path, typer.Option(help="Bundle file (.lpmb).")],
    trusted_key: Annotated[str, typer.Option(help="Ed25519 public key, 64 hex characters.")],
    store: Annotated[Path | None, typer.Option(
        help="Device store (passphrase $LPM_EDGE_PASSPHRASE): refuse a bundle older than the "
             "last one accepted there, and record this one.")] = None,
) -> None:
    """Verify a bundle's signature and model hash; prints its manifest summary."""
    try:
        key = bytes.fromhex(trusted_key)
    except ValueError as exc:
        raise typer.BadParameter(f"trusted key is not hex: {exc}") from exc
    if len(key) != 32:
        raise typer.BadParameter("trusted key must be 32 bytes (64 hex characters)")
    try:
        if store is None:
            verified = read_verified_bundle(bundle, key)
        else:
            # the device's store lives in edge_agent (imported only when asked for)
            from edge_agent.store import EdgeStore, EdgeStoreError

            try:
                with EdgeStore(store) as state:
                    verified = verify_with_rollback(read_bundle_bytes(bundle), key, state)
            except EdgeStoreError as exc:
                typer.echo(f"error: {exc}", err=True)
                raise typer.Exit(code=1) from exc
    except MobileExportError as exc:
        typer.echo(f"refused: {type(exc).__name__}: {exc}", err=True)
        raise typer.Exit(code=2) from exc
    m = verified.manifest
    typer.echo(
        f"ok: version {m['model_version']} created {m['created']} opset {m['opset']} "
        f"θ={m['theta']} sha256={m['model_sha256']}"
    )


def register(app: typer.Typer) -> None:
    """Mount the `bundle` command group on the `lpm` app."""
    app.add_typer(bundle_app, name="bundle")

"""`lpm coordinator` (the HTTP service + run loop); mounts `lpm demo` and `lpm fleet` too."""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer

if TYPE_CHECKING:
    from coordinator.http.service import WriteToken
    from coordinator.store import CoordinatorStore

__all__ = ["register", "TOKEN_ENV"]

TOKEN_ENV = "LPM_COORDINATOR_TOKEN"


def demo(
    out: Annotated[Path, typer.Option(help="Output folder (store, bundle, PNG, CSV).")] = Path(
        "out/demo"),
    devices: Annotated[int, typer.Option(min=1)] = 50,
    days: Annotated[int, typer.Option(min=2)] = 20,
    scale: Annotated[float, typer.Option(min=0.001, max=1.0)] = 0.67,
    seed: int = 0,
) -> None:
    """The full story: synthetic city + simulated devices, secure daily rounds, calibration,
    signed ONNX bundle, device forecast, results over HTTP."""
    from coordinator.cli.demo import run_demo

    run_demo(out, devices=devices, days=days, scale=scale, seed=seed)


def _write_token() -> tuple[WriteToken, bool]:
    """The write token from ``$LPM_COORDINATOR_TOKEN``, or a generated one (``True``: the
    caller prints it once the service can start). Set-but-empty or too short is an error,
    never a silent substitute."""
    from coordinator.http.service import MIN_TOKEN_CHARS, WriteToken

    raw = os.environ.get(TOKEN_ENV)
    if raw is None:
        return WriteToken(secrets.token_urlsafe(24)), True
    if not raw.strip():
        _fail(f"${TOKEN_ENV} is set but empty: set it to a secret of at least "
              f"{MIN_TOKEN_CHARS} characters, or unset it to have one generated")
    if len(raw) < MIN_TOKEN_CHARS:
        _fail(f"${TOKEN_ENV} is {len(raw)} characters; it must be at least {MIN_TOKEN_CHARS}")
    return WriteToken(raw), False


def _fail(message: str) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=1)


def _open_store(db: Path, *, check: bool = False) -> CoordinatorStore:
    """Open (and optionally integrity-check) the store; one clear line naming the file if not."""
    from coordinator.store import CoordinatorStore, StoreError

    try:
        store = CoordinatorStore(db)
        if check:
            store.check()
    except StoreError as exc:
        _fail(str(exc))
    return store


def coordinator(
    host: str = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535)] = 8080,
    db: Annotated[Path, typer.Option(help="Coordinator SQLite store.")] = Path(
        "lpm-coordinator.db"),
    resume: Annotated[bool, typer.Option(help="Resume unfinished runs at start.")] = True,
    access_log: Annotated[bool, typer.Option(help="Log every request (uvicorn access log).")
                          ] = True,
) -> None:
    """HTTP service + run loop. The write token comes from $LPM_COORDINATOR_TOKEN (or is
    generated and printed). Flower deployments run `flwr run .` against a SuperLink; the
    ServerApp writes to the same store (run config key `db`)."""
    import threading

    from coordinator.http.service import serve
    from coordinator.runner import execute_run

    token, generated = _write_token()
    store = _open_store(db, check=True)  # a failure before here prints no token at all
    if generated:
        typer.echo(f"write token (set {TOKEN_ENV} to choose one): {token.reveal()}")
    if resume:
        for rec in store.list_runs():
            if rec.config.get("federated"):  # its ServerApp owns it (lease): never here
                continue
            if rec.status in ("running", "pending") and "devices" in rec.config:
                typer.echo(f"resuming run {rec.id} from day {rec.completed_days}")
                threading.Thread(target=execute_run, args=(store, rec.id), daemon=True).start()
    serve(store, token, host=host, port=port, access_log=access_log)


def register(app: typer.Typer) -> None:
    """Mount the coordinator commands on the `lpm` app."""
    app.command("demo")(demo)
    from coordinator.cli.fleet import fleet_command

    app.command("fleet")(fleet_command)
    app.command("coordinator")(coordinator)

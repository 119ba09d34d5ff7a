"""`lpm edge …` commands: what a device runs locally."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from edge_agent.forecast import DeviceState, forecast_from_bundle
from mobile_export.errors import MobileExportError

edge_app = typer.Typer(help="Device-side commands (edge agent).", no_args_is_help=True)


def _floats(text: str, what: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise typer.BadParameter(f"{what} must be comma-separated numbers, got {text!r}") from None


def _trusted_key(value: str) -> bytes:
    """A 64-hex-character Ed25519 public key, or a file containing one."""
    text = Path(value).read_text().strip() if Path(value).is_file() else value.strip()
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise typer.BadParameter("trusted key must be 32 bytes as 64 hex characters (or a file)")
    return raw


@edge_app.command("forecast")
def forecast(
    bundle: Annotated[Path, typer.Option(help="Signed model bundle (.lpmb) from the coordinator.")],
    trusted_key: Annotated[
        str, typer.Option(help="Coordinator's Ed25519 public key: 64 hex chars, or a file.")
    ],
    prevalence: Annotated[
        str, typer.Option(help="Public exposure per layer (household,work,community), daily.")
    ] = "0.02,0.02,0.02",
    prevalence_csv: Annotated[
        Path | None, typer.Option(help="Per-day forecast: a row per day, a column per layer.")
    ] = None,
    days: Annotated[int, typer.Option(min=1, help="Horizon (ignored with --prevalence-csv).")] = 7,
    contacts: Annotated[str, typer.Option(help="Usual contacts per day per layer.")] = "3,8,6",
    age_susceptibility: Annotated[float, typer.Option(min=0.0)] = 1.0,
    susceptible: Annotated[bool, typer.Option(help="Is this device's person susceptible?")] = True,
    samples: Annotated[int, typer.Option(min=0, help="Monte Carlo samples (0 = none).")] = 0,
    seed: Annotated[int | None, typer.Option(help="Seed of the Monte Carlo uniforms.")] = None,
    store: Annotated[Path | None, typer.Option(
        help="Device store ($LPM_EDGE_PASSPHRASE): refuses a bundle older than the last one "
             "accepted (anti-rollback) and records this one.")] = None,
) -> None:
    """Rank everyday behaviour options by forecast infection risk over the next days."""
    if prevalence_csv is not None:
        forecast_rows = np.loadtxt(prevalence_csv, delimiter=",", ndmin=2, dtype=np.float32)
    else:
        forecast_rows = np.tile(np.array(_floats(prevalence, "prevalence"), np.float32), (days, 1))
    state = DeviceState(
        susceptible=susceptible,
        age_susceptibility=age_susceptibility,
        usual_contacts=tuple(_floats(contacts, "contacts")),
    )
    from edge_agent.store import EdgeStore, EdgeStoreError

    try:
        device = None if store is None else EdgeStore(store)
    except EdgeStoreError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=1) from exc
    try:
        ranked = forecast_from_bundle(
            bundle, _trusted_key(trusted_key), state, forecast_rows, samples=samples, seed=seed,
            rollback=device,
        )
    except MobileExportError as exc:
        typer.echo(f"refused: {type(exc).__name__}: {exc}", err=True)
        raise typer.Exit(code=2) from exc
    finally:
        if device is not None:
            device.close()
    table = Table(title=f"Infection risk over the next {forecast_rows.shape[0]} days")
    for column in ("rank", "option", "risk", "∂risk/∂β", *(["MC risk"] if samples else [])):
        table.add_column(column, justify="left" if column == "option" else "right")
    for r in ranked:
        mc = [] if r.mc_risk is None else [f"{r.mc_risk:.4f}"]
        table.add_row(str(r.rank), r.option.name, f"{r.risk:.4f}", f"{r.drisk_dbeta:.4f}", *mc)
    Console(width=100).print(table)


@edge_app.command("run")
def run(
    superlink: Annotated[str, typer.Option(help="SuperLink address host:port.")] = "127.0.0.1:9093",
    insecure: Annotated[bool, typer.Option(help="Plain HTTP (local tests only).")] = False,
    root_certificates: Annotated[Path | None, typer.Option(help="CA bundle for TLS.")] = None,
    port: Annotated[int, typer.Option(help="This node's local runtime API port.")] = 9094,
    auth_private_key: Annotated[
        Path | None, typer.Option(help="SuperNode auth private key (EC, OpenSSH format).")
    ] = None,
    host: Annotated[str, typer.Option(help="Host of this node's local runtime API.")] = "127.0.0.1",
    store: Annotated[Path | None, typer.Option(
        help="Device store (SQLite; private keys encrypted with $LPM_EDGE_PASSPHRASE).")] = None,
) -> None:
    """Run this device as a Flower SuperNode; the coordinator's ServerApp drives its ClientApp
    (edge_agent.client_app:app) over the SuperLink."""
    import os
    import shutil
    import sys

    exe = shutil.which("flower-supernode", path=f"{Path(sys.executable).parent}:"
                       f"{os.environ.get('PATH', '')}")
    if exe is None:
        raise typer.BadParameter("flower-supernode is not installed")
    if not insecure and root_certificates is None:
        raise typer.BadParameter("give --root-certificates for TLS, or --insecure")
    args = [exe, "--superlink", superlink, "--host", host, "--port", str(port)]
    args += ["--insecure"] if insecure else ["--root-certificates", str(root_certificates)]
    if auth_private_key is not None:  # flwr 1.41 derives the public key from the private key
        args += ["--auth-supernode-private-key", str(auth_private_key)]
    if store is not None:
        if not os.environ.get("LPM_EDGE_PASSPHRASE"):
            raise typer.BadParameter("--store needs $LPM_EDGE_PASSPHRASE (keys are encrypted)")
        args += ["--node-config", f"lpm-store='{store.resolve()}'"]
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    # the SuperNode starts flower-superexec / flwr-clientapp by name: from this environment
    os.environ["PATH"] = os.pathsep.join([str(Path(exe).parent), os.environ.get("PATH", "")])
    if os.name == "posix":
        # Become the SuperNode (exec, same pid): a SIGTERM/SIGINT/SIGKILL sent to `lpm edge
        # run` reaches it, and no orphaned flower-supernode is left behind (before: the
        # child outlived a killed parent).
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(exe, args)
    raise typer.Exit(_run_child(args))


def _run_child(args: list[str]) -> int:
    """Where exec is not available: run the SuperNode as a child, pass SIGINT/SIGTERM on to
    it and wait for it, so it never outlives this process on those signals."""
    import signal
    import subprocess

    child = subprocess.Popen(args)

    def forward(signum, _frame) -> None:
        if child.poll() is None:
            child.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return child.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if child.poll() is None:
            child.kill()
            child.wait()


_STATUS_CODES = {"susceptible": "S", "infected": "I", "recovered": "R", "s": "S", "i": "I",
                 "r": "R"}


@edge_app.command("status")
def status(
    store: Annotated[Path, typer.Option(help="This device's store (passphrase from "
                                             "$LPM_EDGE_PASSPHRASE).")],
    set_: Annotated[str | None, typer.Option(
        "--set", help="Your status: susceptible, infected or recovered. The device then reports "
                      "it instead of simulating one (it leaves the device only inside "
                      "secure aggregates).")] = None,
    clear: Annotated[bool, typer.Option(help="Forget the status you set (simulate again).")
                     ] = False,
) -> None:
    """Show or set this device's own status."""
    import time

    from edge_agent.client_app import USER_STATUS_KEY
    from edge_agent.store import EdgeStore, EdgeStoreError

    if set_ is not None and clear:
        raise typer.BadParameter("give --set or --clear, not both")
    code = None
    if set_ is not None:
        code = _STATUS_CODES.get(set_.strip().lower())
        if code is None:
            raise typer.BadParameter(f"status must be susceptible, infected or recovered, "
                                     f"got {set_!r}")
    try:
        with EdgeStore(store) as st:
            if code is not None:
                st.set_status(USER_STATUS_KEY, {"state": code, "set_at": int(time.time())})
            elif clear:
                st.set_status(USER_STATUS_KEY, None)
            user = st.status(USER_STATUS_KEY)
            run = st.status("run")
    except EdgeStoreError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=2) from None
    names = {"S": "susceptible", "I": "infected", "R": "recovered"}
    typer.echo(f"your status: {names[user['state']] if user else 'not set (simulated)'}")
    if run:
        state = next((names[c] for c in ("S", "I", "R") if float(run.get(c, 0)) > 0.5), "?")
        typer.echo(f"last run {run.get('run_id')}: day {run.get('day', '-')}, {state}, "
                   f"risk {float(run.get('risk', 0.0)):.4f}")


def register(app: typer.Typer) -> None:
    """Mount the `edge` command group on the `lpm` app."""
    app.add_typer(edge_app, name="edge")

"""The coordinator's `lpm` commands: `coordinator` (serve), `demo`, `fleet`, `calibrate`,
`forecast`, `backtest`. Modules stay light: heavy imports happen when a command runs."""

from __future__ import annotations

import typer

from coordinator.cli import calibrate, serve


def register(app: typer.Typer) -> None:
    """Mount the coordinator commands on the `lpm` app."""
    serve.register(app)
    calibrate.register(app)

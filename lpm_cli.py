"""`lpm` command line: one entry point that mounts each package's commands.

Each package owns its commands in its own ``cli`` module and exposes
``register(app)``; this module only wires them together, so the import rules
of DESIGN.md §1 hold (no app package imports another).
"""

from __future__ import annotations

import importlib

import typer

app = typer.Typer(
    name="lpm",
    help="lpm-edge: privacy-preserving federated Large Population Models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,  # locals can hold secrets (tokens, passphrases)
)

_COMMAND_MODULES = (
    "simulation.cli",
    "simulation.population_cli",
    "mobile_export.cli",
    "edge_agent.cli",
    "coordinator.cli",
)

for _name in _COMMAND_MODULES:  # an import error is fatal: never drop a command silently
    importlib.import_module(_name).register(app)


if __name__ == "__main__":
    app()

"""Simulated fleet: the coordinator's ServerApp and N edge-agent ClientApps on Flower's
simulation engine (Ray), in one process tree. The ClientApp is loaded by its string
reference, so the coordinator package never imports ``edge_agent``."""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from coordinator.runner import RunConfig
from coordinator.server_app import FederatedRun
from coordinator.store import CoordinatorStore

__all__ = ["CLIENT_APP_REF", "run_fleet", "load_client_app"]

CLIENT_APP_REF = "edge_agent.client_app:app"


def load_client_app(ref: str = CLIENT_APP_REF):
    """Import ``module:attribute``."""
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


def run_fleet(cfg: RunConfig, *, store: CoordinatorStore | None = None, run_id: str | None = None,
              on_day: Callable[[int, dict[str, object]], None] | None = None,
              num_cpus_per_client: float = 0.5, verbose: bool = False) -> list[dict[str, object]]:
    """Run ``cfg`` with ``cfg.devices`` simulated devices; returns the per-day rows."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    from flwr.simulation import run_simulation

    result: dict[str, object] = {}
    server = ServerApp()

    @server.main()
    def _main(grid: Grid, context: Context) -> None:
        try:
            result["rows"] = FederatedRun(grid, cfg, store=store, run_id=run_id,
                                          on_day=on_day).run()
        except BaseException as exc:  # re-raised in the caller's thread below
            result["error"] = exc
            raise

    run_simulation(server_app=server, client_app=load_client_app(), num_supernodes=cfg.devices,
                   backend_config={"client_resources": {"num_cpus": num_cpus_per_client,
                                                        "num_gpus": 0.0},
                                   "init_args": {"num_cpus": 2, "include_dashboard": False,
                                                 "logging_level": "error",
                                                 "log_to_driver": verbose}},
                   verbose_logging=verbose)
    if "error" in result:
        raise result["error"]  # type: ignore[misc]
    if "rows" not in result:
        raise RuntimeError("the fleet simulation ended without a result")
    return result["rows"]  # type: ignore[return-value]

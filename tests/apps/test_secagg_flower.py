"""SecAgg+ over Flower's Message API on the simulation engine (Ray): the coordinator relays
bytes between the protocols.secagg server and the devices' ClientApp; the decoded sum equals
the plain sum of the survivors' inputs, with one device silent from masked input on."""

from __future__ import annotations

import pytest
import torch

from coordinator.flower.secagg import run_secagg_round, wait_for_nodes
from protocols.secagg import InputSpec

N, L = 8, 12


@pytest.mark.slow  # ~60 s on the shared 2-core machine (Ray start-up dominates)
def test_secagg_round_over_flower_simulation(monkeypatch) -> None:
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from edge_agent.secagg_flower import app as secagg_app
    from edge_agent.secagg_flower import demo_input  # the test checks the devices' inputs
    result: dict[str, object] = {}
    server = ServerApp()

    @server.main()
    def _main(grid: Grid, context: Context) -> None:
        try:
            nodes = wait_for_nodes(grid, N)
            # drop the node at roster position 2 before masked input
            result["r"] = run_secagg_round(
                grid, nodes, InputSpec("int", L, 10_000),
                silent={"masked_input": {nodes[2]}}, degree=4, threshold=3, timeout=120,
            )
        except BaseException as exc:
            result["error"] = exc
            raise

    run_simulation(
        server_app=server, client_app=secagg_app,
        num_supernodes=N,
        backend_config={"client_resources": {"num_cpus": 0.5, "num_gpus": 0.0},
                        "init_args": {"num_cpus": 2, "include_dashboard": False,
                                      "logging_level": "error", "log_to_driver": False}},
    )
    assert "error" not in result, result.get("error")
    r = result["r"]
    assert len(r.nodes) == N and r.nodes[2] not in r.survivors and len(r.survivors) == N - 1
    assert sorted(r.partition_ids.values()) == list(range(N))
    expected = sum(demo_input(r.partition_ids[n], L) for n in r.survivors)
    assert torch.equal(r.total, expected)

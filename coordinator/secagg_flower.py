"""SecAgg+ (protocols.secagg) driven by the coordinator over a message transport.

:class:`ReportRound` is the server side of one day's report aggregation in a federated run:
the coordinator only relays the state machine's bytes; a device that errors, answers out of
protocol or does not answer counts as dropped at that stage, and the decoded sum covers
exactly the survivors. :func:`run_secagg_round` drives a stand-alone round over a Flower
``Grid`` (tests, benchmarks) with ``edge_agent.secagg_flower:app`` on the devices.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Sequence

import torch
from flwr.app import ConfigRecord, Message
from flwr.serverapp import Grid

from protocols.daily import REPORT_FIELDS, report_spec_bound
from protocols.keys import AgreementKey
from protocols.secagg import (
    InputSpec,
    RoundConfig,
    SecAggError,
    default_degree,
    default_threshold,
)
from protocols.secagg.server import SecAggServer

__all__ = ["ReportRound", "report_degree", "SecAggRoundResult", "report_spec", "run_secagg_round",
           "wait_for_nodes"]

_TYPE = "query.secagg"


def report_spec() -> InputSpec:
    """Encoding of the daily report vector (floats, 16 fractional bits)."""
    return InputSpec("float", len(REPORT_FIELDS), report_spec_bound(), 16)


def report_degree(n: int) -> int:
    """SecAgg+ neighbours per device for the daily reports: ``default_degree(n)`` but at
    least 8 (threshold 5: a device's self-mask survives 3 dropped neighbours in a day; at
    small n the default 4 aborts on 2), the complete graph below 9 devices."""
    if n - 1 <= 8:
        return n - 1
    return max(default_degree(n), 8)


class ReportRound:
    """One day's SecAgg+ round over the devices named in ``roster`` (in order)."""

    def __init__(self, run_id: str, day: int, roster: Sequence[str], registry: Sequence[bytes],
                 spec: InputSpec | None = None, min_survivors: int = 0) -> None:
        self.roster = list(roster)
        self._index = {name: i for i, name in enumerate(self.roster)}
        key = AgreementKey.generate()
        n = len(self.roster)
        degree = report_degree(n)
        # SecAgg+'s security floor: never reveal a sum of fewer than threshold + 1 (and 3)
        floor = max(3, default_threshold(degree) + 1)
        self.config = RoundConfig(run_id, day, tuple(self.roster), spec or report_spec(),
                                  os.urandom(32), key.public_bytes(), degree=degree,
                                  min_survivors=min(max(min_survivors, floor), n))
        self.server = SecAggServer(self.config, list(registry), key)
        self.rejected: dict[str, str] = {}

    def registry_for(self, name: str) -> list[int]:
        """Roster indices whose identity keys ``name`` needs: itself and its neighbours."""
        i = self._index[name]
        return [i, *self.server.graph[i]]

    def receive(self, name: str, blob: bytes) -> None:
        """Feed one device's message for the current stage; a rejected one drops it."""
        try:
            self.server.receive(self._index[name], bytes(blob))
        except SecAggError as exc:
            self.rejected[name] = f"{type(exc).__name__}: {exc}"

    def advance(self) -> dict[str, bytes]:
        """Close the stage; ``{device name: bytes}`` for the next one (SecAggAbortError if
        too few devices are left)."""
        return {self.roster[i]: b for i, b in self.server.advance().items()}

    def total(self) -> torch.Tensor:
        return self.server.decoded()

    def survivors(self) -> list[str]:
        return [self.roster[i] for i in sorted(self.server.u3)]


class SecAggRoundResult:
    """Decoded sum, the node ids in it, the roster order and each node's reported
    partition id (simulation engine; −1 elsewhere)."""

    def __init__(self, total: torch.Tensor, survivors: list[int], nodes: list[int],
                 partition_ids: dict[int, int]) -> None:
        self.total, self.survivors, self.nodes = total, survivors, nodes
        self.partition_ids = partition_ids


def wait_for_nodes(grid: Grid, n: int, wait: float = 120.0) -> list[int]:
    """The first ``n`` connected node ids (fewer if ``wait`` seconds pass)."""
    deadline = time.time() + wait
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= n or time.time() > deadline:
            return nodes[:n]
        time.sleep(0.5)


def _exchange(grid: Grid, contents: dict[int, ConfigRecord], timeout: float,
              group: str) -> dict[int, ConfigRecord]:
    from flwr.app import RecordDict

    msgs = [Message(RecordDict({"cfg": c}), dst_node_id=n, message_type=_TYPE, group_id=group)
            for n, c in contents.items()]
    out: dict[int, ConfigRecord] = {}
    for r in grid.send_and_receive(msgs, timeout=timeout):
        if not r.has_error():
            out[r.metadata.src_node_id] = r.content.config_records["cfg"]
    return out


def run_secagg_round(
    grid: Grid,
    nodes: Iterable[int],
    spec: InputSpec,
    *,
    run_id: str = "secagg",
    round_: int = 0,
    silent: dict[str, set[int]] | None = None,
    timeout: float = 120.0,
    **round_kw: int,
) -> SecAggRoundResult:
    """One SecAgg+ round over ``nodes`` (each device sums its own demo input); ``silent``
    (tests) lists node ids not contacted at a stage, as if they had dropped."""
    nodes = sorted(nodes)
    silent = silent or {}
    replies = _exchange(grid, {n: ConfigRecord({"stage": "enrol"}) for n in nodes}, timeout,
                        f"{run_id}/{round_}/enrol")
    nodes = [n for n in nodes if n in replies]
    registry = [bytes(replies[n]["identity"]) for n in nodes]  # type: ignore[arg-type]
    key = AgreementKey.generate()
    cfg = RoundConfig(run_id, round_, tuple(str(n) for n in nodes), spec, os.urandom(32),
                      key.public_bytes(), **round_kw)
    server = SecAggServer(cfg, registry, key)
    index = {n: i for i, n in enumerate(nodes)}
    cfg_bytes = cfg.to_bytes()
    gone: set[int] = set()

    def stage(name: str, contents: dict[int, ConfigRecord]) -> None:
        gone.update(silent.get(name, set()))
        live = {n: c for n, c in contents.items() if n not in gone}
        for n, r in _exchange(grid, live, timeout, f"{run_id}/{round_}/{name}").items():
            try:
                server.receive(index[n], bytes(r["payload"]))  # type: ignore[arg-type]
            except SecAggError:
                gone.add(n)  # rejected: treated as a dropout

    stage("advertise", {n: ConfigRecord({"stage": "advertise", "config": cfg_bytes,
                                         "registry": registry, "index": index[n]})
                        for n in nodes})
    for name in ("share_keys", "masked_input", "unmask"):
        out = server.advance()
        stage(name, {nodes[i]: ConfigRecord({"stage": name, "payload": b})
                     for i, b in out.items()})
    server.advance()
    pids = {n: int(replies[n].get("partition_id", -1)) for n in nodes}  # type: ignore[arg-type]
    return SecAggRoundResult(server.decoded(), [nodes[i] for i in sorted(server.u3)], nodes, pids)

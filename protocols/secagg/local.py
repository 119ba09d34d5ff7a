"""Run SecAgg+ key epochs and their daily sums in one process (tests, benchmarks,
simulations).

Every message crosses as bytes through the real state machines; ``dropouts`` names, per
stage, the clients that go silent instead of sending that stage's message.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from protocols.keys import AgreementKey, IdentityKey
from protocols.secagg.config import RoundConfig
from protocols.secagg.epoch_client import EpochClient
from protocols.secagg.epoch_server import EpochServer
from protocols.secagg.errors import SecAggAbortError
from protocols.secagg.quantize import InputSpec

__all__ = [
    "DAY_STAGES",
    "DayResult",
    "RoundResult",
    "RoundSetup",
    "make_round",
    "run_days",
    "run_epoch_day",
]

DAY_STAGES = ("masked_input", "consistency", "unmask")


@dataclass
class RoundResult:
    """Outcome of :func:`run_epoch_day`: decoded sum, survivors and traffic in bytes."""

    total: torch.Tensor
    survivors: frozenset[int]
    bytes_up: int = 0
    bytes_down: int = 0


@dataclass
class RoundSetup:
    """A round's public config plus the parties' secret keys (for in-process runs)."""

    config: RoundConfig
    identities: list[IdentityKey]
    server_key: AgreementKey

    @property
    def registry(self) -> list[bytes]:
        return [k.public_bytes() for k in self.identities]

    def epoch_server(self) -> EpochServer:
        return EpochServer(self.config, self.registry, self.server_key)

    def epoch_clients(self) -> list[EpochClient]:
        reg = self.registry
        return [EpochClient(self.config, i, k, reg) for i, k in enumerate(self.identities)]

    def agreed(self) -> tuple[EpochServer, list[EpochClient]]:
        """The epoch's key set-up run in process (advertise → roster, every message as
        bytes): the server at ``READY`` and every client ready for its first day."""
        server, clients = self.epoch_server(), self.epoch_clients()
        for i, c in enumerate(clients):
            server.receive(i, c.advertise_keys())
        for i, blob in server.advance().items():
            clients[i].accept_roster(blob)
        return server, clients


@dataclass
class DayResult:
    """One day of :func:`run_days`: decoded sum (None if the day aborted), its survivors,
    the abort (if any) and the day's traffic in bytes."""

    day: int
    total: torch.Tensor | None
    survivors: frozenset[int]
    error: SecAggAbortError | None = None
    bytes_up: int = 0
    bytes_down: int = 0


@dataclass
class EpochRun:
    """Outcome of :func:`run_days`: per-day results, setup traffic and the parties."""

    days: list[DayResult]
    setup_bytes_up: int
    setup_bytes_down: int
    server: EpochServer
    clients: list[EpochClient]


def run_days(
    setup: RoundSetup,
    inputs_per_day: Sequence[Sequence[torch.Tensor | np.ndarray]],
    dropouts: Sequence[Mapping[str, set[int]]] | None = None,
    *,
    setup_dropouts: set[int] | None = None,
    days: Sequence[int] | None = None,
) -> EpochRun:
    """One key epoch (setup once) and one masked sum per day, every message as bytes through
    the real state machines. ``dropouts[d]`` maps a day stage (:data:`DAY_STAGES`) to the
    clients silent from that stage on, that day only; ``setup_dropouts`` never advertise.
    A day that aborts is recorded (``error``) and the next day still runs."""
    n_days = len(inputs_per_day)
    days = list(days) if days is not None else list(range(n_days))
    drops = list(dropouts) if dropouts is not None else [{} for _ in range(n_days)]
    if len(days) != n_days or len(drops) != n_days:
        raise ValueError("need one day number and one dropout map per day of inputs")
    for d in drops:
        if set(d) - set(DAY_STAGES):
            raise ValueError(f"unknown stages {sorted(set(d) - set(DAY_STAGES))}")
    server, clients = setup.epoch_server(), setup.epoch_clients()
    up = down = 0
    for i, c in enumerate(clients):
        if i not in (setup_dropouts or set()):
            msg = c.advertise_keys()
            up += len(msg)
            server.receive(i, msg)
    rosters = server.advance()
    for i, blob in rosters.items():
        down += len(blob)
        clients[i].accept_roster(blob)
    results = [_one_day(server, clients, day, xs, drop)
               for day, xs, drop in zip(days, inputs_per_day, drops, strict=True)]
    return EpochRun(results, up, down, server, clients)


def _one_day(server: EpochServer, clients: list[EpochClient], day: int,
             xs: Sequence[torch.Tensor | np.ndarray], drop: Mapping[str, set[int]]) -> DayResult:
    server.open_day(day)
    gone: set[int] = set()
    up = down = 0
    try:
        outbox: dict[int, bytes] | None = None
        for stage in DAY_STAGES:
            gone |= drop.get(stage, set())
            targets = sorted(server.live) if outbox is None else sorted(outbox)
            for i in targets:
                if i in gone:
                    continue
                c = clients[i]
                if stage == "masked_input":
                    msg = c.masked_input(day, xs[i])
                else:
                    assert outbox is not None
                    down += len(outbox[i])
                    msg = (c.sign_survivors(outbox[i]) if stage == "consistency"
                           else c.unmask(outbox[i]))
                up += len(msg)
                server.receive(i, msg)
            outbox = server.advance()
    except SecAggAbortError as exc:
        return DayResult(day, None, frozenset(), exc, up, down)
    return DayResult(day, server.decoded(day), server.survivors[day], None, up, down)


def run_epoch_day(
    setup: RoundSetup,
    inputs: Sequence[torch.Tensor | np.ndarray],
    dropouts: Mapping[str, set[int]] | None = None,
) -> RoundResult:
    """Setup plus one day (the multi-round protocol used for a single sum); stages
    ``advertise`` and :data:`DAY_STAGES`. Raises :class:`SecAggAbortError` on abort."""
    dropouts = dict(dropouts or {})
    setup_drop = dropouts.pop("advertise", set())
    run = run_days(setup, [inputs], [dropouts], setup_dropouts=setup_drop)
    d = run.days[0]
    if d.error is not None:
        raise d.error
    assert d.total is not None
    return RoundResult(d.total, d.survivors, run.setup_bytes_up + d.bytes_up,
                       run.setup_bytes_down + d.bytes_down)


def make_round(
    n: int,
    spec: InputSpec,
    *,
    run_id: str = "run",
    round_: int = 0,
    degree: int = 0,
    threshold: int = 0,
    min_survivors: int = 0,
    identities: Sequence[IdentityKey] | None = None,
) -> RoundSetup:
    """A round config with a fresh public graph seed and server key, and client identities."""
    ids = list(identities) if identities is not None else [IdentityKey.generate() for _ in range(n)]
    server_key = AgreementKey.generate()
    cfg = RoundConfig(
        run_id=run_id,
        round=round_,
        client_ids=tuple(f"client-{i}" for i in range(n)),
        spec=spec,
        graph_seed=os.urandom(32),
        server_pk=server_key.public_bytes(),
        degree=degree,
        threshold=threshold,
        min_survivors=min_survivors,
    )
    return RoundSetup(cfg, ids, server_key)

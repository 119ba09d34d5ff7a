"""Run a whole SecAgg+ round in one process (tests, benchmarks, simulations).

Every message crosses as bytes through the real state machines; ``dropouts`` names, per
stage, the clients that go silent instead of sending that stage's message.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from protocols.keys import AgreementKey, IdentityKey
from protocols.secagg.client import SecAggClient
from protocols.secagg.config import RoundConfig
from protocols.secagg.quantize import InputSpec
from protocols.secagg.server import SecAggServer

__all__ = ["STAGES", "RoundResult", "RoundSetup", "make_round", "run_round"]

STAGES = ("advertise", "share_keys", "masked_input", "unmask")


@dataclass
class RoundResult:
    """Outcome of :func:`run_round`: decoded sum, survivors and traffic in bytes."""

    total: torch.Tensor
    survivors: frozenset[int]
    bytes_up: int = 0
    bytes_down: int = 0
    server: SecAggServer | None = field(default=None, repr=False)


@dataclass
class RoundSetup:
    """A round's public config plus the parties' secret keys (for in-process runs)."""

    config: RoundConfig
    identities: list[IdentityKey]
    server_key: AgreementKey

    @property
    def registry(self) -> list[bytes]:
        return [k.public_bytes() for k in self.identities]

    def server(self) -> SecAggServer:
        return SecAggServer(self.config, self.registry, self.server_key)

    def clients(self) -> list[SecAggClient]:
        reg = self.registry
        return [SecAggClient(self.config, i, k, reg) for i, k in enumerate(self.identities)]


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


def run_round(
    setup: RoundSetup,
    inputs: Sequence[torch.Tensor | np.ndarray],
    dropouts: Mapping[str, set[int]] | None = None,
) -> RoundResult:
    """Run one round; raises :class:`~protocols.secagg.errors.SecAggAbortError` when too
    many clients drop."""
    dropouts = dict(dropouts or {})
    unknown = set(dropouts) - set(STAGES)
    if unknown:
        raise ValueError(f"unknown stages {sorted(unknown)}")
    config = setup.config
    server = setup.server()
    clients = setup.clients()
    up = down = 0
    gone: set[int] = set()

    def send_all(stage: str, outbox: Mapping[int, bytes] | None) -> None:
        nonlocal up, down
        gone.update(dropouts.get(stage, set()))
        targets = range(config.n) if outbox is None else sorted(outbox)
        for i in targets:
            if i in gone:
                continue
            c = clients[i]
            if outbox is not None:
                down += len(outbox[i])
            if stage == "advertise":
                msg = c.advertise_keys()
            elif stage == "share_keys":
                msg = c.share_keys(outbox[i])  # type: ignore[index]
            elif stage == "masked_input":
                msg = c.masked_input(outbox[i], inputs[i])  # type: ignore[index]
            else:
                msg = c.unmask(outbox[i])  # type: ignore[index]
            up += len(msg)
            server.receive(i, msg)

    send_all("advertise", None)
    send_all("share_keys", server.advance())
    send_all("masked_input", server.advance())
    send_all("unmask", server.advance())
    server.advance()
    return RoundResult(server.decoded(), server.u3, up, down, server)

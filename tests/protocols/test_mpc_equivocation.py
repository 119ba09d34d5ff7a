"""Attack: a coordinator (or a relay standing in for the broadcast) sends each institution a
different query. Every institution must refuse with EQUIVOCATION before it answers anything
(real processes over gloo on 127.0.0.1: two institutions and the coordinator)."""

from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist

from protocols.mpc.institutional import (
    EQUIVOCATION,
    MALFORMED,
    OK,
    _digest_row,
    _gather,
    agree_on_query,
)
from protocols.mpc.wire import Query, encode_query
from simulation.distributed.launch import spawn_local

INSTITUTIONS = 2


def _query(theta0: float) -> bytes:
    c, t, p = 2, 5, 2
    theta = torch.tensor([theta0, 0.1], dtype=torch.float64)
    y_hat = torch.arange(c * t, dtype=torch.float64).reshape(c, t) + 1.0
    return encode_query(Query(3, theta, y_hat, torch.ones(c, t, p, dtype=torch.float64)))


def _party(rank: int, world: int, scenarios: list[list[bytes]]) -> list[int]:
    """Per scenario: institutions check the bytes they were given; the coordinator (last rank)
    joins the digest exchange with the query it claims to have sent to everyone."""
    group = dist.group.WORLD
    verdicts = []
    for received in scenarios:
        if rank == world - 1:
            _gather(_digest_row(hashlib.sha256(received[-1]).digest()), group)
            verdicts.append(-1)
            continue
        verdict, query = agree_on_query(received[rank], INSTITUTIONS, group)
        assert (query is None) == (verdict == MALFORMED)
        verdicts.append(verdict)
    return verdicts


def test_equivocating_coordinator_is_refused_by_every_institution():
    honest, forged = _query(0.5), _query(0.9)  # the forged one asks at another θ
    scenarios = [
        [honest, forged, honest],  # each institution got a different query
        [honest, honest, honest],  # the same bytes everywhere: answered
        [honest, honest[:-3], honest],  # one copy garbled: malformed there, refused elsewhere
    ]
    by_rank = spawn_local(_party, INSTITUTIONS + 1, scenarios, timeout=120)
    per_scenario = list(zip(*by_rank[:INSTITUTIONS], strict=True))
    assert per_scenario == [(EQUIVOCATION, EQUIVOCATION), (OK, OK), (EQUIVOCATION, MALFORMED)]

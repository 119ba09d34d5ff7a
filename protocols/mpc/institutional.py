"""One institutional MPC round, both seats (institution and coordinator).

Ranks 0..K−1 are institutions, rank K the coordinator; all are computing parties of the
group ``main_group`` (the dealer, rank K+1, is not). A round:

1. The coordinator broadcasts a control header and the query bytes (θ, ŷ, J; ``wire``).
2. Every party all-gathers the SHA-256 of the bytes it received: an institution refuses if
   any other institution got different bytes (equivocation would let the coordinator choose
   per-party multipliers and cancel the masks).
3. Each institution verifies the query (``query.QueryVerifier``: public model recomputed at θ,
   public box, budget) and the ring headroom, then all parties all-gather their verdicts.
   If any institution refused, nobody computes and the coordinator gets
   :class:`QueryRefused` naming each refusing institution and its reason. The session lives on.
4. Otherwise each party computes its shares of [S_L, S_g] (``loss``), institutions add their
   part of the DP noise, and the shares are reduced to the coordinator only.

What the coordinator learns per answered round: L and ∂L/∂θ (P + 1 numbers), never ŷ − y.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from protocols.mpc.errors import (
    BudgetExhausted,
    DataRejected,
    MalformedMessage,
    MPCError,
    QueryRefused,
)
from protocols.mpc.loss import (
    RoundStats,
    SharedLogCounts,
    aggregate_shares,
    assemble,
    check_headroom,
    noise_shares,
    public_multipliers,
)
from protocols.mpc.query import QueryPolicy, QueryVerifier, dp_noise_std
from protocols.mpc.wire import CONTROL_GO, Query, decode_query, encode_control, encode_query

__all__ = ["MPCError", "MPCResult", "QueryRefused", "RoundStats", "coordinator_round", "institution_round",
           "DataRejected", "VERDICTS"]

OK, MALFORMED, REFUSED, BUDGET, EQUIVOCATION, HEADROOM = range(6)
VERDICTS = {
    MALFORMED: "the query does not parse",
    REFUSED: "θ, ŷ or J is not the public model's output within the public box",
    BUDGET: "its query budget is spent",
    EQUIVOCATION: "institutions received different query bytes (equivocation)",
    HEADROOM: "the multipliers exceed the ring headroom",
}


@dataclass
class MPCResult:
    """What the coordinator learns from one round."""

    loss: float
    grad: torch.Tensor  # (P,)
    round: int = 0


def _broadcast_bytes(data: bytes | None, length: int, src: int, group, stats: RoundStats) -> bytes:
    buf = (torch.frombuffer(bytearray(data), dtype=torch.uint8) if data is not None
           else torch.empty(length, dtype=torch.uint8))
    dist.broadcast(buf, src=src, group=group)
    if data is None:
        stats.bytes_received += length
    else:
        stats.bytes_sent += length * (dist.get_world_size(group) - 1)
    return bytes(buf.numpy())


def _gather(row: torch.Tensor, group) -> list[torch.Tensor]:
    out = [torch.empty_like(row) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, row, group=group)
    return out


def _digest_row(digest: bytes | None) -> torch.Tensor:
    return torch.frombuffer(bytearray(digest or bytes(32)), dtype=torch.uint8).clone()


def agree_on_query(data: bytes, institutions: int, group) -> tuple[int, Query | None]:
    """Decode the query bytes this institution received and compare their SHA-256 digest with
    every other institution's (one all-gather, the coordinator contributing its own): the
    verdict is ``MALFORMED``, ``EQUIVOCATION`` if any institution got different bytes (a
    coordinator or relay that sent each a different query), else ``OK`` with the query."""
    rank = dist.get_rank()
    verdict, query = OK, None
    try:
        query = decode_query(data)
    except MalformedMessage:
        verdict = MALFORMED
    digests = _gather(_digest_row(query.digest() if query is not None else None), group)
    if verdict == OK and any(not torch.equal(d, digests[rank]) for d in digests[:institutions]):
        verdict = EQUIVOCATION
    return verdict, query


def institution_round(length: int, shared: SharedLogCounts, verifier: QueryVerifier, policy: QueryPolicy,
                      institutions: int, group, stats: RoundStats) -> int:
    """Answer (or refuse) one round after a GO header announced ``length`` bytes; returns
    the verdict code (``OK`` = 0 when answered)."""
    coordinator = dist.get_world_size(group) - 1
    data = _broadcast_bytes(None, length, coordinator, group, stats)
    verdict, query = agree_on_query(data, institutions, group)
    a = w = None
    if verdict == OK and query is not None:
        try:
            verifier.check(query)
            a, w = public_multipliers(query.y_hat, query.jac)
            if not check_headroom(a, w, policy.count_bound):
                verdict = HEADROOM
        except BudgetExhausted:
            verdict = BUDGET
        except QueryRefused:
            verdict = REFUSED
    verdicts = _gather(torch.tensor([verdict], dtype=torch.int64), group)
    if any(int(v) != OK for v in verdicts) or a is None or w is None:
        return verdict
    agg = aggregate_shares(shared, a, w)
    agg += noise_shares(dp_noise_std(policy, a, w), institutions, a.numel(), w.shape[-1])
    dist.reduce(agg, dst=coordinator, op=dist.ReduceOp.SUM, group=group)
    stats.bytes_sent += agg.numel() * 8
    return OK


def coordinator_round(query: Query, shared: SharedLogCounts, institutions: int, group,
                      stats: RoundStats) -> MPCResult:
    """Send ``query`` (the coordinator's last rank) and return L and ∂L/∂θ, or raise
    :class:`QueryRefused` naming the institutions that refused it."""
    rank = dist.get_rank()
    data = encode_query(query)
    dist.broadcast(encode_control(CONTROL_GO, len(data)), src=rank, group=group)
    _broadcast_bytes(data, len(data), rank, group, stats)
    _gather(_digest_row(query.digest()), group)
    verdicts = [int(v) for v in _gather(torch.tensor([OK], dtype=torch.int64), group)[:institutions]]
    refusals = [(i, v) for i, v in enumerate(verdicts) if v != OK]
    if refusals:
        reasons = "; ".join(f"institution {i}: {VERDICTS.get(v, f'code {v}')}" for i, v in refusals)
        cls = BudgetExhausted if all(v == BUDGET for _, v in refusals) else QueryRefused
        raise cls(f"round {query.round} refused — {reasons}")
    a, w = public_multipliers(query.y_hat, query.jac)
    agg = aggregate_shares(shared, a, w)
    dist.reduce(agg, dst=rank, op=dist.ReduceOp.SUM, group=group)
    stats.bytes_received += agg.numel() * 8 * institutions
    loss, grad = assemble(agg, a, w)
    return MPCResult(loss, grad, query.round)

"""Private calibration loss and gradient across institutions (one round, one party's view).

Parties: ranks 0..K−1 are institutions holding private daily counts y_k (T,); rank K is the
coordinator holding the simulated series ŷ (K, T) and its Jacobian J = ∂ŷ/∂θ (K, T, P),
both public to the parties. With the MSE loss

    L = 1/(KT) Σ (ŷ − y)² = 1/(KT) [Σ ŷ² − 2 Σ ŷ·y + Σ y²]
    ∂L/∂θ = 2/(KT) [Σ ŷ J − Σ y J]

everything secret (Σ ŷ·y, Σ y², Σ y J) is *linear* in the inputs, so it is computed on
additive shares with public integer multipliers only: no Beaver triples, no trusted dealer.
Each institution shares its encoded y_k and Σ_t y_kt² among all K+1 parties with
``protocols.sharing`` (ChaCha20); parties compute their shares of the three aggregates
locally and reduce them to the coordinator only. Any K of the K+1 parties learn nothing
(n-out-of-n sharing); the coordinator learns L and ∂L/∂θ — the agreed output — and nothing
else. Counts are scaled by ``count_scale`` to keep products inside the ring's headroom.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from protocols.mpc.crypten_compat import CRYPTEN_PRECISION_BITS, from_ring_shares, to_ring_share
from protocols.ring import FixedPointRing
from protocols.sharing import share

__all__ = ["MPCError", "MPCResult", "RoundStats", "check_round_headroom", "coordinator_round", "institution_round"]

PUBLIC_BITS = 16  # fixed-point bits of the public multipliers ŷ and J
_RING = FixedPointRing(CRYPTEN_PRECISION_BITS)
_PUBLIC = FixedPointRing(PUBLIC_BITS)


class MPCError(RuntimeError):
    """A party received inconsistent shapes or values out of range."""


@dataclass
class RoundStats:
    bytes_sent: int = 0
    bytes_received: int = 0


@dataclass
class MPCResult:
    loss: float
    grad: torch.Tensor  # (P,)


def _scatter_shares(values: torch.Tensor, src: int, world: int, stats: RoundStats) -> torch.Tensor:
    """``src`` shares ``values`` (int64) among all parties; returns this party's share."""
    out = torch.empty_like(values)
    if dist.get_rank() == src:
        parts = [p.contiguous() for p in share(values, world)]
        stats.bytes_sent += sum(p.numel() * 8 for p in parts) - parts[src].numel() * 8
        dist.scatter(out, parts, src=src)
    else:
        dist.scatter(out, None, src=src)
        stats.bytes_received += out.numel() * 8
    return out


def _broadcast_public(y_hat: torch.Tensor | None, jac: torch.Tensor | None, shape: tuple[int, int, int],
                      coordinator: int, stats: RoundStats) -> tuple[torch.Tensor, torch.Tensor]:
    k, t, p = shape
    yh = y_hat.double().contiguous() if y_hat is not None else torch.empty(k, t, dtype=torch.float64)
    jj = jac.double().contiguous() if jac is not None else torch.empty(k, t, p, dtype=torch.float64)
    dist.broadcast(yh, src=coordinator)
    dist.broadcast(jj, src=coordinator)
    n = (yh.numel() + jj.numel()) * 8
    if dist.get_rank() == coordinator:
        stats.bytes_sent += n * (dist.get_world_size() - 1)
    else:
        stats.bytes_received += n
    return yh, jj


def _party_aggregates(y_shares: torch.Tensor, sq_shares: torch.Tensor, yh: torch.Tensor,
                      jac: torch.Tensor) -> torch.Tensor:
    """This party's shares of [Σ ŷ·y, Σ y², Σ y·J_p ...] (ring, mixed scales)."""
    # CrypTen holds the ChaCha20-made shares (interop); the linear algebra runs on the raw
    # ring shares: share × public integer, summed, needs no truncation (CrypTen's own public
    # multiplication truncates, which is approximate with more than two parties).
    y_raw = to_ring_share(from_ring_shares(y_shares))
    yq = _PUBLIC.encode(yh)
    jq = _PUBLIC.encode(jac)
    cross = (y_raw * yq).sum()  # scale 2^(16+16); int64 wraps mod 2^64
    grad = (y_raw.unsqueeze(-1) * jq).sum(dim=(0, 1))  # scale 2^(16+16)
    sq = to_ring_share(from_ring_shares(sq_shares)).sum()  # scale 2^16
    return torch.cat([cross.reshape(1), sq.reshape(1), grad])


def institution_round(y_private: torch.Tensor, shape: tuple[int, int, int], count_scale: float,
                      stats: RoundStats) -> None:
    """Run one round as institution ``rank`` (< K) holding ``y_private`` (T,)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    k, t, p = shape
    if y_private.shape != (t,):
        raise MPCError(f"institution {rank}: expected {t} days, got {tuple(y_private.shape)}")
    coordinator = world - 1
    yh, jac = _broadcast_public(None, None, shape, coordinator, stats)
    y_scaled = y_private.double() / count_scale
    check_round_headroom(y_scaled, yh, jac)
    shares, sq = _share_all(y_scaled, rank, shape, stats)
    agg = _party_aggregates(shares, sq, yh, jac)
    dist.reduce(agg, dst=coordinator, op=dist.ReduceOp.SUM)
    stats.bytes_sent += agg.numel() * 8


def check_round_headroom(y_scaled: torch.Tensor, yh: torch.Tensor, jac: torch.Tensor) -> None:
    """Raise ``RingOverflowError`` if Σ y·ŷ or Σ y·J (scale 2^32) could wrap the ring.

    Both the loss cross term and every gradient entry are sums of K·T products of a scaled
    count with a public multiplier, so the bound uses the larger of |ŷ| and |J|.
    """
    if y_scaled.numel() == 0:
        return
    multiplier = max(float(yh.abs().max()) if yh.numel() else 0.0, float(jac.abs().max()) if jac.numel() else 0.0)
    _RING.check_headroom(float(y_scaled.abs().max()) * (multiplier + 1) * 2**PUBLIC_BITS, yh.numel())


def _share_all(y_scaled: torch.Tensor | None, rank: int, shape, stats: RoundStats):
    """Every institution shares its series and its sum of squares; all parties collect."""
    k, t, _ = shape
    world = dist.get_world_size()
    y_shares = torch.empty(k, t, dtype=torch.int64)
    sq_shares = torch.empty(k, dtype=torch.int64)
    for src in range(k):
        mine = src == rank and y_scaled is not None
        values = _RING.encode(y_scaled) if mine else torch.empty(t, dtype=torch.int64)
        y_shares[src] = _scatter_shares(values, src, world, stats)
        sq = _RING.encode((y_scaled**2).sum().reshape(1)) if mine else torch.empty(1, dtype=torch.int64)
        sq_shares[src] = _scatter_shares(sq, src, world, stats)[0]
    return y_shares, sq_shares


def coordinator_round(y_hat: torch.Tensor, jac: torch.Tensor, count_scale: float,
                      stats: RoundStats) -> MPCResult:
    """Run one round as the coordinator (last rank) with public ŷ (K, T) and J (K, T, P).

    ``y_hat`` is in counts (unscaled); the result is the loss and gradient of the MSE on
    counts / ``count_scale``.
    """
    world = dist.get_world_size()
    k, t = y_hat.shape
    if jac.shape[:2] != (k, t) or world != k + 1:
        raise MPCError(f"need J of shape ({k}, {t}, P) and {k + 1} parties, got {tuple(jac.shape)}, {world}")
    p = jac.shape[2]
    yh_s, jac_s = y_hat.double() / count_scale, jac.double() / count_scale
    yh, jj = _broadcast_public(yh_s, jac_s, (k, t, p), world - 1, stats)
    shares, sq = _share_all(None, world - 1, (k, t, p), stats)
    agg = _party_aggregates(shares, sq, yh, jj)
    dist.reduce(agg, dst=world - 1, op=dist.ReduceOp.SUM)
    stats.bytes_received += agg.numel() * 8 * (world - 1)
    both = 2 ** (CRYPTEN_PRECISION_BITS + PUBLIC_BITS)
    cross = FixedPointRing(0).decode(agg[:1]).item() / both
    sumsq = _RING.decode(agg[1:2]).item()
    y_dot_j = FixedPointRing(0).decode(agg[2:]) / both
    # public parts computed from the same quantised public values the parties used
    yq = _PUBLIC.decode(_PUBLIC.encode(yh))
    jq = _PUBLIC.decode(_PUBLIC.encode(jj))
    n = k * t
    loss = ((yq**2).sum().item() - 2 * cross + sumsq) / n
    grad = 2 * (torch.einsum("kt,ktp->p", yq, jq) - y_dot_j) / n
    return MPCResult(loss, grad)

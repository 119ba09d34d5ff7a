"""The calibration loss on secret counts: log-MSE, its nonlinear part under CrypTen.

    L(θ) = 1/n Σ_ct (a_ct − b_ct)²,   a = log1p(ŷ(θ)) public,  b = log1p(y) secret,  n = C·T
    ∂L/∂θ = 2/n Σ_ct (a_ct − b_ct) · w_ct,   w = ∂a/∂θ = J / (1 + ŷ)   (public)

``b`` and ``Σ b²`` are nonlinear in the secret counts and are computed once per session
under CrypTen on the parties' shares (its ``log`` approximation: Householder iterations on
a limit-approximated exp, with Beaver squares and wrap-count truncation from
``protocols.mpc.dealer``). A cell's count may be the sum of several institutions' series
(shares are added before the log), so the log of a cross-institution sum is never seen by
anyone. Each round is then linear in the shared ``b``: every party multiplies its raw ring
shares by public integers (no truncation, exact) and only the sums

    S_L = Σ b² − 2 Σ a·b,   S_g = Σ b·w      (P + 1 numbers, ring scale 2^32)

are reduced to the coordinator, which adds the public parts: n·L = Σ a² + S_L and
n/2 · ∂L/∂θ = Σ a·w − S_g.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from protocols.mpc.crypten_compat import CRYPTEN_PRECISION_BITS
from protocols.mpc.errors import MPCError
from protocols.ring import FixedPointRing
from protocols.sharing import share

__all__ = ["LOG_CONFIG", "OUT_BITS", "SharedLogCounts", "aggregate_shares", "assemble", "check_headroom",
           "public_multipliers", "setup_shared_logs"]

SECRET = FixedPointRing(CRYPTEN_PRECISION_BITS)
PUBLIC = FixedPointRing(16)
OUT_BITS = CRYPTEN_PRECISION_BITS + 16
OUT = FixedPointRing(OUT_BITS)
RAW = FixedPointRing(0)
# CrypTen log settings measured best at 16 fractional bits on (1 + y)/200, y ∈ [0, 3·10^4]
LOG_CONFIG = {"functions.log_iterations": 2, "functions.log_exp_iterations": 10}
LOG_SCALE = 200.0
HEADROOM = 2.0**61


@dataclass
class SharedLogCounts:
    """This party's raw ring shares: b = log1p(y) (C, T) at 2^16 and Σ b² at 2^32."""

    b: torch.Tensor
    b2_sum: torch.Tensor


@dataclass
class RoundStats:
    """Bytes this party sent and received over the session."""

    bytes_sent: int = 0
    bytes_received: int = 0


def share_counts(y: torch.Tensor | None, rank: int, cells: list[int], n_cells: int, days: int,
                 group, stats: RoundStats) -> torch.Tensor:
    """Institutions (ranks 0..K−1) share y/LOG_SCALE (ChaCha20 shares); every computing party
    returns its share of the per-cell sums (C, T), already + 1/LOG_SCALE."""
    world = dist.get_world_size(group)
    cell_shares = torch.zeros(n_cells, days, dtype=torch.int64)
    for src, cell in enumerate(cells):
        out = torch.empty(days, dtype=torch.int64)
        if rank == src:
            if y is None or y.shape != (days,):
                raise MPCError(f"institution {rank}: expected {days} days")
            parts = [p.contiguous() for p in share(SECRET.encode(y.double() / LOG_SCALE), world)]
            dist.scatter(out, parts, src=src, group=group)
            stats.bytes_sent += 8 * days * (world - 1)
        else:
            dist.scatter(out, None, src=src, group=group)
            stats.bytes_received += 8 * days
        cell_shares[cell] += out
    if rank == 0:  # a public constant is added by one party
        cell_shares += SECRET.encode(torch.tensor(1.0 / LOG_SCALE))
    return cell_shares


def setup_shared_logs(x_shares: torch.Tensor) -> SharedLogCounts:
    """b = log(x) + log(LOG_SCALE) = log1p(y) and Σ b², computed under CrypTen."""
    from crypten.config import cfg
    from crypten.mpc import MPCTensor

    x = MPCTensor.from_shares(x_shares, precision=CRYPTEN_PRECISION_BITS)
    with cfg.temp_override(LOG_CONFIG):
        b = x.log() + math.log(LOG_SCALE)
    b2 = b.square().sum()
    return SharedLogCounts(b._tensor.share.clone(), b2._tensor.share.clone() * PUBLIC.scale)


def public_multipliers(y_hat: torch.Tensor, jac: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """a = log1p(ŷ⁺) (C, T) and w = ∂a/∂θ = J/(1 + ŷ⁺) (C, T, P), quantised to the public grid."""
    pos = y_hat.double().clamp(min=0)
    a = torch.log1p(pos)
    w = jac.double() / (1 + pos).unsqueeze(-1) * (y_hat.double() >= 0).unsqueeze(-1)
    return PUBLIC.decode(PUBLIC.encode(a)), PUBLIC.decode(PUBLIC.encode(w))


def check_headroom(a: torch.Tensor, w: torch.Tensor, count_bound: float) -> bool:
    """True if S_L and S_g (scale 2^32) cannot wrap for any counts in [0, count_bound]."""
    n = a.numel()
    b_max = math.log1p(count_bound) + 1.0  # + slack for the log approximation
    a_max = float(a.abs().max()) if n else 0.0
    w_max = float(w.abs().max()) if w.numel() else 0.0
    bound = n * max(b_max**2 + 2 * a_max * b_max, b_max * w_max) * OUT.scale
    return math.isfinite(bound) and bound < HEADROOM


def aggregate_shares(shared: SharedLogCounts, a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """This party's shares of [S_L, S_g (P)] at scale 2^32 (exact ring arithmetic)."""
    aq, wq = PUBLIC.encode(a), PUBLIC.encode(w)
    cross = (shared.b * aq).sum()
    s_l = shared.b2_sum - 2 * cross
    s_g = (shared.b.unsqueeze(-1) * wq).sum(dim=(0, 1))
    return torch.cat([s_l.reshape(1), s_g])


def noise_shares(std_total: float, institutions: int, n: int, p: int) -> torch.Tensor:
    """One institution's part of the output noise, encoded at 2^32 (std σ/√K each)."""
    from protocols.mpc.query import gaussian_noise

    if std_total == 0.0:
        return torch.zeros(1 + p, dtype=torch.int64)
    z = gaussian_noise(1 + p, std_total / math.sqrt(institutions))
    z[0] *= n
    z[1:] *= n / 2
    return OUT.encode(z)


def assemble(total: torch.Tensor, a: torch.Tensor, w: torch.Tensor) -> tuple[float, torch.Tensor]:
    """The coordinator's L and ∂L/∂θ from the reduced [S_L, S_g] and the public parts."""
    n = a.numel()
    s = OUT.decode(total)
    loss = ((a**2).sum().item() + s[0].item()) / n
    grad = 2 * (torch.einsum("ct,ctp->p", a, w) - s[1:]) / n
    return loss, grad

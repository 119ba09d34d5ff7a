"""Verifiable queries: what an institution checks before it answers a round.

A query is "the loss at θ". The public multipliers (ŷ, J = ∂ŷ/∂θ) are not the
coordinator's to choose: every institution recomputes them from θ with the *public* model
(same simulator, seed, population and settings as the coordinator — a run configuration the
institution's operator sets, never one received from the coordinator) and refuses unless the
coordinator's values are bit-identical on the 2^-16 grid (``tolerance_ulps``, default 0).
It also refuses θ outside the public box and any round beyond the per-run budget. So the
coordinator learns at most ``max_rounds`` × (P + 1) numbers per run — L and ∂L/∂θ at points
of the model's P-dimensional parameter space — not the C·T daily counts, and optionally
each answer carries Gaussian noise calibrated to a documented (ε, δ) (see ``docs/mpc.md``).
"""

from __future__ import annotations

import importlib
import json
import math
import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Protocol, runtime_checkable

import torch

from protocols.mpc.errors import BudgetExhausted, MPCError, QueryRefused
from protocols.mpc.wire import Query
from protocols.ring import FixedPointRing

__all__ = [
    "LogLinearModel",
    "PublicModel",
    "QueryPolicy",
    "QueryVerifier",
    "dp_noise_std",
    "gaussian_noise",
    "load_public_model",
    "single_thread",
]

_GRID = FixedPointRing(16)  # the grid on which ŷ and J must agree
LN2 = math.log(2.0)


@runtime_checkable
class PublicModel(Protocol):
    """The public simulator as a function of θ: ŷ (C, T) and J = ∂ŷ/∂θ (C, T, P)."""

    n_params: int

    def evaluate(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


@dataclass(frozen=True)
class QueryPolicy:
    """An institution's public rules for answering queries (same for every party).

    ``count_bound`` is the public bound on one cell-day count (larger counts are refused at
    load; it fixes the log's domain and the DP sensitivity). ``dp_epsilon`` switches on
    Gaussian noise so that the whole run (``max_rounds`` answers) is (ε, δ)-DP for one case
    added to or removed from any one count (zCDP accounting).
    """

    max_rounds: int = 64
    theta_low: float = -20.0
    theta_high: float = 20.0
    tolerance_ulps: int = 0
    count_bound: float = 30_000.0
    dp_epsilon: float | None = None
    dp_delta: float = 1e-6

    def __post_init__(self) -> None:
        if self.max_rounds < 1:
            raise MPCError("max_rounds must be >= 1")
        if not (math.isfinite(self.theta_low) and math.isfinite(self.theta_high) and self.theta_low < self.theta_high):
            raise MPCError("need finite theta_low < theta_high")
        if self.tolerance_ulps < 0 or not 0 < self.count_bound < 1e9:
            raise MPCError("tolerance_ulps must be >= 0 and count_bound in (0, 1e9)")
        if self.dp_epsilon is not None and not (0 < self.dp_epsilon < 1e3 and 0 < self.dp_delta < 1):
            raise MPCError("dp_epsilon must be in (0, 1000) and dp_delta in (0, 1)")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> QueryPolicy:
        try:
            fields = json.loads(text)
            return cls(**fields)
        except (TypeError, ValueError) as exc:
            raise MPCError(f"bad query policy: {exc}") from None

    @property
    def rho_per_round(self) -> float | None:
        """zCDP budget per answer: (ε, δ) → ρ = (√(ln 1/δ + ε) − √(ln 1/δ))², split evenly."""
        if self.dp_epsilon is None:
            return None
        log_inv = math.log(1 / self.dp_delta)
        return (math.sqrt(log_inv + self.dp_epsilon) - math.sqrt(log_inv)) ** 2 / self.max_rounds


class QueryVerifier:
    """Checks each query against the public model, the box and the budget (one per run)."""

    def __init__(self, model: PublicModel, policy: QueryPolicy, cells: int, days: int) -> None:
        self.model, self.policy, self.cells, self.days = model, policy, cells, days
        self.answered = 0

    def check(self, q: Query) -> None:
        """Raise :class:`QueryRefused` (or :class:`BudgetExhausted`) unless ``q`` is honest."""
        if self.answered >= self.policy.max_rounds:
            raise BudgetExhausted(f"query budget of {self.policy.max_rounds} rounds is spent")
        c, t, p = q.shape
        if (c, t, p) != (self.cells, self.days, self.model.n_params):
            raise QueryRefused(f"query shape (C={c}, T={t}, P={p}) is not the public model's "
                               f"({self.cells}, {self.days}, {self.model.n_params})")
        if bool((q.theta < self.policy.theta_low).any() or (q.theta > self.policy.theta_high).any()):
            raise QueryRefused(f"θ outside the public box [{self.policy.theta_low}, {self.policy.theta_high}]")
        with single_thread():
            y_hat, jac = self.model.evaluate(q.theta.clone())
        if tuple(y_hat.shape) != (c, t) or tuple(jac.shape) != (c, t, p):
            raise QueryRefused("the public model's output does not match the query's shape")
        if not (_same_on_grid(y_hat, q.y_hat, self.policy.tolerance_ulps)
                and _same_on_grid(jac, q.jac, self.policy.tolerance_ulps)):
            raise QueryRefused("ŷ or J is not the public model's output at θ")
        self.answered += 1


def _same_on_grid(mine: torch.Tensor, theirs: torch.Tensor, ulps: int) -> bool:
    a, b = mine.detach().double(), theirs.double()
    if not bool(torch.isfinite(a).all()) or float(a.abs().max()) >= 2.0**40:
        return False
    return int((_GRID.encode(a) - _GRID.encode(b)).abs().max()) <= ulps


@contextmanager
def single_thread() -> Iterator[None]:
    """Evaluate the public model with one torch thread (bit-identical across processes)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def dp_noise_std(policy: QueryPolicy, a: torch.Tensor, w: torch.Tensor) -> float:
    """Total noise std per output (L and each ∂L/∂θ_p) for one round, 0.0 without DP.

    Loss L = mean((a − b)²) with a = log1p(ŷ) public and b = log1p(y) secret, y ∈ [0, B].
    One case more or less changes one b by at most ln 2, so for that cell
    ΔL ≤ (2·D·ln2 + ln2²)/n with D = max(a, log1p(B) − a), and ‖Δ∂L/∂θ‖₂ ≤ 2·ln2·‖w‖₂/n
    (w = ∂a/∂θ). The L2 sensitivity is the worst cell's; σ = Δ/√(2ρ) per round.
    """
    rho = policy.rho_per_round
    if rho is None:
        return 0.0
    n = a.numel()
    d = torch.maximum(a, math.log1p(policy.count_bound) - a)
    d_loss = (2 * d * LN2 + LN2**2) / n
    d_grad = 2 * LN2 * w.norm(dim=-1) / n
    sensitivity = float(torch.sqrt(d_loss**2 + d_grad**2).max())
    return sensitivity / math.sqrt(2 * rho)


def gaussian_noise(n: int, std: float) -> torch.Tensor:
    """``n`` normal draws from the OS CSPRNG (Box–Muller on 53-bit uniforms)."""
    if n <= 0 or std == 0.0:
        return torch.zeros(max(n, 0), dtype=torch.float64)
    raw = struct.unpack(f"<{2 * n}Q", os.urandom(16 * n))
    u = torch.tensor([((r >> 11) + 1) * 2.0**-53 for r in raw], dtype=torch.float64).view(2, n)
    return std * torch.sqrt(-2 * torch.log(u[0])) * torch.cos(2 * math.pi * u[1])


def load_public_model(spec: str, kwargs: dict | None = None) -> PublicModel:
    """Build the public model ``module:factory`` with ``kwargs`` (run config set locally)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise MPCError(f"public model spec must be 'module:factory', got {spec!r}")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise MPCError(f"cannot load public model {spec!r}: {exc}") from None
    try:
        model = factory(**(kwargs or {}))
    except TypeError as exc:
        raise MPCError(f"public model {spec!r} does not take {sorted(kwargs or {})}: {exc}") from None
    if not isinstance(model, PublicModel):
        raise MPCError(f"{spec} did not return a PublicModel")
    return model


class LogLinearModel:
    """ŷ_ct = exp(θ_c + θ_C · t/T): one level per cell and a shared growth rate.

    A small closed-form public model (reference for tests and benchmarks); J is exact.
    """

    def __init__(self, cells: int, days: int) -> None:
        if cells < 1 or days < 1:
            raise MPCError("cells and days must be >= 1")
        self.cells, self.days, self.n_params = cells, days, cells + 1

    def evaluate(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        theta = theta.double()
        if theta.shape != (self.n_params,):
            raise MPCError(f"θ must have {self.n_params} entries")
        t = torch.arange(self.days, dtype=torch.float64) / self.days
        y_hat = torch.exp(theta[: self.cells, None] + theta[self.cells] * t)
        jac = torch.zeros(self.cells, self.days, self.n_params, dtype=torch.float64)
        jac[torch.arange(self.cells), :, torch.arange(self.cells)] = y_hat
        jac[:, :, self.cells] = y_hat * t
        return y_hat, jac


def log_linear_model(cells: int, days: int) -> LogLinearModel:
    """Factory for :class:`LogLinearModel` (``protocols.mpc.query:log_linear_model``)."""
    return LogLinearModel(cells, days)

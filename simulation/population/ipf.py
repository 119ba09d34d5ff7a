"""Iterative proportional fitting (IPF) of a contingency table to target margins."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from simulation.population.errors import PopulationError

__all__ = ["IPFResult", "ipf", "integerize"]


@dataclass(frozen=True)
class IPFResult:
    """The fitted table, the sweeps it took and the largest relative margin error left."""

    table: np.ndarray
    iterations: int
    max_error: float


def ipf(
    seed: np.ndarray,
    margins: Sequence[tuple[tuple[int, ...], np.ndarray]],
    tol: float = 1e-9,
    max_iter: int = 1000,
) -> IPFResult:
    """Scale ``seed`` (non-negative; zeros stay structural zeros) until its sum over the
    axes not in each ``(axes, target)`` pair equals ``target``.

    Raises :class:`PopulationError` for inconsistent totals or margins the seed's zeros
    make unreachable (no convergence within ``max_iter`` sweeps).
    """
    table = np.asarray(seed, dtype=np.float64).copy()
    if np.any(table < 0) or not np.all(np.isfinite(table)):
        raise PopulationError("IPF seed must be finite and non-negative")
    totals = [float(np.sum(t)) for _, t in margins]
    if any(np.any(np.asarray(t) < 0) for _, t in margins):
        raise PopulationError("IPF margins must be non-negative")
    if totals and max(totals) - min(totals) > 1e-6 * max(max(totals), 1.0):
        raise PopulationError(f"IPF margins disagree on the total: {totals}")
    all_axes = tuple(range(table.ndim))
    err = np.inf
    for it in range(1, max_iter + 1):
        for axes, target in margins:
            other = tuple(a for a in all_axes if a not in axes)
            current = table.sum(axis=other, keepdims=True)
            target_b = np.asarray(target, dtype=np.float64).reshape(current.shape)
            with np.errstate(divide="ignore", invalid="ignore"):
                factor = np.where(current > 0, target_b / current, 0.0)
            table *= factor
        err = 0.0
        for axes, target in margins:
            other = tuple(a for a in all_axes if a not in axes)
            cur = table.sum(axis=other)
            t = np.asarray(target, dtype=np.float64).reshape(cur.shape)
            err = max(err, float(np.max(np.abs(cur - t)) / max(float(t.sum()), 1.0)))
        if err < tol:
            return IPFResult(table, it, err)
    raise PopulationError(
        f"IPF did not converge in {max_iter} sweeps (error {err:.2e}): the seed's zeros "
        "make the margins unreachable"
    )


def integerize(values: np.ndarray, total: int | None = None) -> np.ndarray:
    """Non-negative integers summing to ``total`` (default round(sum)), each within 1 of its
    value scaled to that total (largest remainder)."""
    v = np.clip(np.asarray(values, dtype=np.float64), 0, None)
    total = int(round(v.sum())) if total is None else int(total)
    s = v.sum()
    if total == 0 or s == 0:
        if total and s == 0:
            raise PopulationError("cannot distribute a positive total over all-zero weights")
        return np.zeros(v.shape, dtype=np.int64)
    scaled = v * (total / s)
    base = np.floor(scaled).astype(np.int64)
    rest = total - int(base.sum())
    if rest > 0:
        frac = (scaled - base).ravel()
        top = np.argsort(-frac, kind="stable")[:rest]
        flat = base.ravel()
        flat[top] += 1
        base = flat.reshape(v.shape)
    return base

"""Differentiable discrete events: Bernoulli transitions with selectable gradient estimators.

Every estimator takes event probabilities ``p`` and uniforms ``u`` (common random numbers)
and returns the event indicator. They differ only in what the backward pass sees:

* ``straight_through`` — forward 1[u < p], backward ∂/∂p = 1 (biased; cheap).
* ``expected`` — the individual-based mean-field (expected-value) mode: the event *is* p,
  so the state carries per-agent probabilities. Exact gradients of a deterministic surrogate.
* ``relaxed`` — forward 1[u < p], backward through a logistic relaxation of the threshold,
  σ((logit p − logit u)/τ) (a Gumbel/Concrete-style estimator, reparameterised on u).

Measured biases against finite differences with common random numbers are in
``docs/simulation.md`` and pinned by tests.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["ESTIMATORS", "EstimatorError", "get_estimator"]

_EPS = 1e-6


class EstimatorError(ValueError):
    """Unknown estimator name."""


def straight_through(p: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    hard = (u < p.detach()).to(p.dtype)
    return hard + (p - p.detach())


def expected(p: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return p


def relaxed(p: torch.Tensor, u: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    hard = (u < p.detach()).to(p.dtype)
    pc = p.clamp(_EPS, 1 - _EPS)
    uc = u.clamp(_EPS, 1 - _EPS)
    soft = torch.sigmoid((torch.logit(pc) - torch.logit(uc)) / temperature)
    return hard + (soft - soft.detach())


ESTIMATORS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "straight_through": straight_through,
    "expected": expected,
    "relaxed": relaxed,
}


def get_estimator(name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    try:
        return ESTIMATORS[name]
    except KeyError:
        raise EstimatorError(f"unknown estimator {name!r}; choose from {sorted(ESTIMATORS)}") from None

"""Differentiable discrete events: Bernoulli transitions with selectable gradient estimators.

Every estimator takes event probabilities ``q`` and uniforms ``u`` (common random numbers)
and returns the event indicator 1[u < q]. Models multiply the indicator by the agent's state
(``new = S · event(q, u)``): the state factor is then differentiated exactly (product rule),
and only the indicator's derivative differs between estimators:

* ``smoothed`` (default) — a smoothed *stochastic derivative* (Arya et al., NeurIPS 2022,
  "Automatic differentiation of programs with discrete randomness"; StochasticAD.jl's
  smoothing). Raising q by dq flips an event that did *not* happen (u ≥ q) with probability
  dq / (1 − q); the backward is therefore ∂x/∂q = (1 − x) / (1 − q): zero for events that
  happened, 1/(1 − q) for those that did not (the right stochastic derivative, smoothed).
  Locally unbiased (E[(1 − x)/(1 − q)] = 1). With the state multiplier outside the event,
  the linear propagation reproduces an alternative path's own timeline exactly (an agent
  infected earlier is absorbed when the primal path infects it later, and recovers on the
  primal recovery draw); only interactions between two perturbations are dropped.
* ``straight_through`` — backward ∂x/∂q = 1 for every event, including those that already
  happened (treats an infected agent as "more infected"; biased upwards in saturating runs).
* ``expected`` — the individual-based mean-field (expected-value) mode: the event *is* q,
  so the state carries per-agent probabilities. Exact gradients of a deterministic surrogate.
* ``relaxed`` — backward through a logistic relaxation of the threshold,
  σ((logit q − logit u)/τ) (a Gumbel/Concrete-style estimator, reparameterised on u).

Measured biases against finite differences with common random numbers over a grid of
parameter points are in ``docs/simulation.md`` (``benchmarks/bench_gradients.py``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["DEFAULT_ESTIMATOR", "ESTIMATORS", "RUN_ESTIMATORS", "EstimatorError", "get_estimator", "hard_forward"]

_EPS = 1e-6
DEFAULT_ESTIMATOR = "auto"
#: estimators that act on a whole run rather than per event (``simulation.fused_sir``,
#: ``simulation.stochastic_triples``); "auto" picks "triples" for the plain SIR model on a
#: unit-weight graph in reverse mode, "nonbacktracking" for other fused SIR runs and
#: "smoothed" elsewhere
RUN_ESTIMATORS = ("auto", "nonbacktracking", "triples")


class EstimatorError(ValueError):
    """Unknown estimator name."""


def smoothed(p: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """1[u < p] forward; backward (1 − x)/(1 − p) (smoothed right stochastic derivative)."""
    pd = p.detach()
    hard = (u < pd).to(p.dtype)
    weight = (1 - hard) / (1 - pd).clamp(min=_EPS)
    return hard + (p - pd) * weight


def straight_through(p: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """1[u < p] forward; backward ∂x/∂p = 1."""
    hard = (u < p.detach()).to(p.dtype)
    return hard + (p - p.detach())


def expected(p: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The event is its probability (mean-field surrogate)."""
    return p


def relaxed(p: torch.Tensor, u: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """1[u < p] forward; backward through σ((logit p − logit u)/τ)."""
    hard = (u < p.detach()).to(p.dtype)
    pc = p.clamp(_EPS, 1 - _EPS)
    uc = u.clamp(_EPS, 1 - _EPS)
    soft = torch.sigmoid((torch.logit(pc) - torch.logit(uc)) / temperature)
    return hard + (soft - soft.detach())


ESTIMATORS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "smoothed": smoothed,
    "straight_through": straight_through,
    "expected": expected,
    "relaxed": relaxed,
}


def get_estimator(name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The per-event estimator function registered under ``name`` ("auto", "nonbacktracking"
    and "triples" act on whole runs in the engine; per event they are ``smoothed``)."""
    if name in RUN_ESTIMATORS:
        return smoothed
    try:
        return ESTIMATORS[name]
    except KeyError:
        raise EstimatorError(
            f"unknown estimator {name!r}; choose from {sorted([*ESTIMATORS, *RUN_ESTIMATORS])}") from None


def hard_forward(estimator: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> bool:
    """True when the estimator's forward value is the sampled 0/1 event (all but ``expected``)."""
    return estimator is not expected

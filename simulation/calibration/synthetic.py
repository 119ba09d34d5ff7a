"""Synthetic-truth recovery: simulate with a known β, start elsewhere, fit it back."""

from __future__ import annotations

from collections.abc import Callable

import torch

from simulation.calibration.losses import log_mse
from simulation.calibration.point import CalibrationResult, calibrate
from simulation.engine import simulate
from simulation.models import SIR
from simulation.population import ContactGraph, random_contact_graph

__all__ = ["recover_beta"]


def recover_beta(
    *,
    agents: int = 100_000,
    true_beta: float = 0.5,
    start_beta: float = 0.4,
    days: int = 40,
    steps: int = 30,
    seed: int = 7,
    graph: ContactGraph | None = None,
    progress: Callable[[int, float], None] | None = None,
) -> CalibrationResult:
    """Fit β of an SIR to daily new infections simulated at ``true_beta`` (same seed: CRN).

    Uses the straight-through estimator (the default; within ~10 % of finite differences).
    """
    g = graph or random_contact_graph(agents, 10, seed=seed)
    with torch.no_grad():
        target = simulate(SIR(true_beta), g, days, seed=seed)["new_infections"][1:]
    model = SIR(start_beta)
    model.gamma.requires_grad_(False)

    def loss() -> torch.Tensor:
        return log_mse(simulate(model, g, days, seed=seed)["new_infections"][1:], target)

    return calibrate(loss, {"beta": model.beta}, steps=steps, lr=0.03, lr_decay=0.9,
                     progress=progress)

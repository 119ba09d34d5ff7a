"""Equivalence check: the partitioned run against the single-process run.

``run_case(rank, world, spec)`` (a ``spawn_local`` target) and ``reference(spec)`` run the
same case — population, model, days, seed — and return the daily series and the
parameter gradients of the total number of infections as plain numpy, so a test or
``python -m simulation.distributed check`` can compare them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from simulation.distributed.partition import DistributedError
from simulation.population import Population, synthesize
from simulation.substeps import SubstepModel

__all__ = ["Case", "build_case", "compare", "reference", "run_case", "run_cases"]


@dataclass(frozen=True)
class Case:
    """One equivalence case (a synthetic Oxford-like population scaled to ``n`` agents)."""

    model: str = "sir"
    n: int = 5_000
    days: int = 20
    seed: int = 3
    beta: float = 0.5
    method: str = "metis"
    estimator: str | None = None  # None: the engine's default
    grad: bool = True
    checkpoint_days: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def build_case(case: Case) -> tuple[SubstepModel, Population]:
    from simulation.models import SEIRM, SIR

    pop = synthesize("oxford", seed=case.seed, scale=case.n / 150_000)
    model: SubstepModel
    if case.model == "sir":
        model = SIR(beta=case.beta)
    elif case.model == "seirm":
        # testing and vaccination on, so isolation makes the neighbour sum non-binary
        model = SEIRM(beta=case.beta, vaccination_rate=0.01, test_rate=0.1)
    else:
        raise DistributedError(f"unknown model {case.model!r}; choose 'sir' or 'seirm'")
    return model, pop


def _result(model, traj) -> dict[str, Any]:
    total = traj.total_infections
    return {
        "series": {k: v.detach().numpy().copy() for k, v in traj.series.items()},
        "grads": {k: (None if p.grad is None else p.grad.detach().numpy().copy())
                  for k, p in model.named_parameters()},
        "total": float(total.detach()),
        "meta": {k: v for k, v in traj.meta.items() if k != "owned"},
    }


def _est(case: Case) -> dict[str, Any]:
    return {} if case.estimator is None else {"estimator": case.estimator}


def _loss(model, traj, case: Case) -> torch.Tensor:
    """Total infections, plus (automatic gradient sync only) a prior on β that lives outside
    the simulation: it must not be summed over ranks."""
    loss = traj.total_infections
    if case.checkpoint_days is None:
        loss = loss + 100.0 * (model.beta - 0.3) ** 2
    return loss


def reference(case: Case) -> dict[str, Any]:
    """The single-process engine run of ``case``."""
    from simulation.engine import simulate

    model, pop = build_case(case)
    with torch.set_grad_enabled(case.grad):
        traj = simulate(model, pop, case.days, case.seed, **_est(case),
                        checkpoint_days=case.checkpoint_days)
        if case.grad:
            _loss(model, traj, case).backward()
    return _result(model, traj)


def run_case(rank: int, world: int, case: Case) -> dict[str, Any]:
    """The partitioned run of ``case`` on this rank (call on every rank).

    Without checkpointing: the engine's own ``simulate`` on a ``PartitionedPopulation``
    (automatic gradient sync). With it: the runner with ``sync_grads=False`` and an explicit
    ``sync_gradients`` after ``backward()``.
    """
    from simulation.distributed.runner import PartitionedPopulation, simulate, sync_gradients
    from simulation.engine import simulate as engine_simulate

    model, pop = build_case(case)
    with torch.set_grad_enabled(case.grad):
        if case.checkpoint_days is None:
            traj = engine_simulate(model, PartitionedPopulation(pop, method=case.method),
                                   case.days, case.seed, **_est(case))
        else:
            traj = simulate(model, pop, case.days, case.seed, **_est(case),
                            partition=case.method, checkpoint_days=case.checkpoint_days,
                            sync_grads=False)
        if case.grad:
            _loss(model, traj, case).backward()
            if case.checkpoint_days is not None:
                sync_gradients(model)
    return _result(model, traj)


def compare(ref: dict[str, Any], got: dict[str, Any]) -> dict[str, float]:
    """Max |difference| of the series (expected 0) and max relative gradient difference."""
    series = max(float(np.abs(ref["series"][k] - got["series"][k]).max()) for k in ref["series"])
    rel = 0.0
    for k, g in ref["grads"].items():
        h = got["grads"][k]
        if g is None or h is None:
            if (g is None) != (h is None) and np.abs(g if g is not None else h).max() > 0:
                rel = float("inf")
            continue
        scale = max(float(np.abs(g).max()), 1e-12)
        rel = max(rel, float(np.abs(g - h).max()) / scale)
    return {"series_max_abs_diff": series, "grad_max_rel_diff": rel}


def run_cases(rank: int, world: int, cases: list[Case]) -> list[dict[str, Any]]:
    """Several cases in one set of processes (one spawn, several checks)."""
    return [run_case(rank, world, c) for c in cases]

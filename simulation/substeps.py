"""Model composition in the spirit of FLAME: a model is an ordered list of substeps.

Each :class:`Substep` is an ``nn.Module`` with three phases: ``observe`` (read the state),
``policy`` (decide actions from observations) and ``transition`` (write new state
tensors). Calibratable parameters are ``nn.Parameter``s of the substeps or the model.
Substeps live in the model's own registry (an ``nn.ModuleDict``): there is no global
namespace, so two models never share or overwrite each other's substeps.

State is a plain dict of named tensors. A transition returns only the tensors it changes;
the state is updated in place of the dict (no copies of untouched tensors, no deep copies).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["StepContext", "Substep", "SubstepModel", "State"]

State = dict[str, torch.Tensor]


@dataclass
class StepContext:
    """What a substep may read besides the state: day, Δt, randomness, shared operators."""

    day: int
    dt: float
    uniforms: torch.Tensor  # [streams, n] for this day (common random numbers)
    estimator: Any  # callable (p, u) -> event indicator
    neighbour_sum: Any  # callable (x) -> Σ_j w_ij x_j
    degree: torch.Tensor  # n_i (float)
    attributes: Mapping[str, torch.Tensor]
    extras: dict[str, Any] = field(default_factory=dict)


class Substep(nn.Module):
    """One observation → policy → transition step. Override the three phases."""

    #: state tensors this substep reads and writes (documentation and validation)
    reads: tuple[str, ...] = ()
    writes: tuple[str, ...] = ()

    def observe(self, state: State, ctx: StepContext) -> dict[str, torch.Tensor]:
        return {}

    def policy(
        self, state: State, obs: dict[str, torch.Tensor], ctx: StepContext
    ) -> dict[str, torch.Tensor]:
        return {}

    def transition(
        self, state: State, action: dict[str, torch.Tensor], ctx: StepContext
    ) -> State:
        return {}

    def forward(self, state: State, ctx: StepContext) -> State:
        obs = self.observe(state, ctx)
        action = self.policy(state, obs, ctx)
        return self.transition(state, action, ctx)


class SubstepModel(nn.Module):
    """An ordered registry of substeps plus the state layout and daily series it reports."""

    compartments: tuple[str, ...] = ()

    def __init__(self) -> None:
        super().__init__()
        self.substeps = nn.ModuleDict()

    def add_substep(
        self, name: str, substep: Substep, *, before: str | None = None, after: str | None = None
    ) -> None:
        """Register ``substep`` under ``name`` (at the end, or before/after another one)."""
        if name in self.substeps:
            raise KeyError(f"substep {name!r} already registered in {type(self).__name__}")
        if before is not None and after is not None:
            raise ValueError("give before or after, not both")
        anchor = before or after
        items = list(self.substeps.items())
        if anchor is None:
            items.append((name, substep))
        else:
            names = [k for k, _ in items]
            if anchor not in names:
                raise KeyError(f"no substep {anchor!r}; have {names}")
            idx = names.index(anchor) + (1 if after else 0)
            items.insert(idx, (name, substep))
        self.substeps = nn.ModuleDict(dict(items))

    def remove_substep(self, name: str) -> Substep:
        if name not in self.substeps:
            raise KeyError(f"no substep {name!r}")
        sub = self.substeps[name]
        self.substeps = nn.ModuleDict({k: v for k, v in self.substeps.items() if k != name})
        assert isinstance(sub, Substep)
        return sub

    def initial_state(
        self, n: int, generator: torch.Generator, device: torch.device
    ) -> State:  # pragma: no cover - abstract
        raise NotImplementedError

    def n_uniform_streams(self) -> int:
        """How many uniform random streams per agent per day the substeps consume."""
        return 2

    def step(self, state: State, ctx: StepContext) -> State:
        for sub in self.substeps.values():
            state.update(sub(state, ctx))
        return state

    def observe_series(self, state: State) -> dict[str, torch.Tensor]:
        """Daily aggregates (compartment totals) for the trajectory."""
        return {c: state[c].sum() for c in self.compartments}

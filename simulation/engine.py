"""Run a substep model over a population for a number of days, differentiably.

``simulate`` is the one entry point for CPU and CUDA (``device=``). Randomness is common
random numbers: the uniforms of day t come from :func:`step_uniforms` (seed, day), so an
external runner (e.g. a decentralised run where the neighbour sum comes from the secure
protocol) reproduces the same events exactly. ``checkpoint_days`` recomputes chunks of days
in the backward pass instead of storing them (memory ↔ time).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from simulation.estimators import DEFAULT_ESTIMATOR, RUN_ESTIMATORS, get_estimator
from simulation.fused_sir import simulate_sir_fused, supports_fused_sir
from simulation.kernels import NeighbourSum
from simulation.population import ContactGraph, Population
from simulation.rng import counter_uniforms, counter_uniforms_at
from simulation.stochastic_triples import DEFAULT_FLIPS, simulate_sir_triples, triples_serves
from simulation.stochastic_triples_seirm import (
    simulate_seirm_triples,
    supports_seirm_triples,
    undifferentiated,
)
from simulation.substeps import State, StepContext, SubstepModel

__all__ = ["SimulationError", "Trajectory", "agent_uniforms", "simulate", "step_day", "step_uniforms",
           "resolve_device"]


class SimulationError(ValueError):
    """Invalid simulation settings."""


def resolve_device(device: str | torch.device) -> torch.device:
    """Validate a device string; clear error if CUDA is asked for but absent."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SimulationError("device 'cuda' requested but no CUDA GPU is available")
    if dev.type not in ("cpu", "cuda"):
        raise SimulationError(f"unsupported device {device!r} (use 'cpu' or 'cuda')")
    return dev


def step_uniforms(
    seed: int, day: int, n: int, device: str | torch.device = "cpu", streams: int = 2
) -> torch.Tensor:
    """Uniforms [streams, n] for one day, reproducible from (seed, day), the same on every
    device (counter-based SplitMix64, ``simulation.rng``).

    Modelling randomness only: never use it for anything secret.
    """
    return counter_uniforms(seed, day, n, torch.device(device), streams)


def agent_uniforms(seed: int, day: int, agents: torch.Tensor, n: int, streams: int = 2) -> torch.Tensor:
    """The columns ``agents`` of :func:`step_uniforms` (seed, day, n) — [streams, len(agents)] —
    without drawing the other agents' (a device, or a rank, needs only its own)."""
    return counter_uniforms_at(seed, day, agents, n, torch.device("cpu"), streams)


def step_day(
    model: SubstepModel,
    state: State,
    day: int,
    uniforms: torch.Tensor,
    *,
    neighbour_sum: Callable[[torch.Tensor], torch.Tensor],
    degree: torch.Tensor,
    attributes: Mapping[str, torch.Tensor],
    estimator: Any,
    extras: dict[str, Any] | None = None,
    dt: float = 1.0,
) -> State:
    """One simulated day of ``model``: the one place a :class:`StepContext` is built (the
    engine, the coordinator's hybrid run and each device's ClientApp all step through it)."""
    ctx = StepContext(day=day, dt=dt, uniforms=uniforms, estimator=estimator,
                      neighbour_sum=neighbour_sum, degree=degree, attributes=attributes,
                      extras=extras if extras is not None else {})
    return model.step(state, ctx)


@dataclass
class Trajectory:
    """Daily series (tensors of length days + 1, differentiable) and the final state."""

    series: dict[str, torch.Tensor]
    final_state: State
    days: int
    meta: dict[str, object] = field(default_factory=dict)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.series[name]

    @property
    def total_infections(self) -> torch.Tensor:
        return self.series["new_infections"].sum()

    def to_frame(self):  # -> pandas.DataFrame
        import pandas as pd

        data = {k: v.detach().cpu().numpy() for k, v in self.series.items()}
        return pd.DataFrame({"day": range(self.days + 1), **data})


def _graph_of(population: Population | ContactGraph) -> ContactGraph:
    return population.graph if isinstance(population, Population) else population


def simulate(
    model: SubstepModel,
    population: Population | ContactGraph,
    days: int,
    seed: int = 0,
    *,
    estimator: str = DEFAULT_ESTIMATOR,
    device: str | torch.device = "cpu",
    neighbour_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
    checkpoint_days: int | None = None,
    progress: Callable[[int], None] | None = None,
    initial_state: State | None = None,
    extras: dict[str, torch.Tensor] | None = None,
    uniforms: Callable[[int, int], torch.Tensor] | None = None,
    layer_weights: Mapping[str, torch.Tensor] | None = None,
    flips: int = DEFAULT_FLIPS,
) -> Trajectory:
    """Simulate ``days`` days; returns the daily compartment totals and new infections.

    ``neighbour_sum`` replaces the central CSR sum (it gets the per-agent infectious vector
    and must return Σ_j w_ij x_j per agent). ``progress(day)`` is called after each day.
    ``extras`` reach every substep as ``ctx.extras`` (e.g. ``{"beta_t": β per day}``).
    ``uniforms(day, streams)`` replaces :func:`step_uniforms` (the partitioned runner,
    ``simulation.distributed``, keys them by global agent id). A population that carries
    ``simulate_partitioned`` (``simulation.distributed.PartitionedPopulation``) runs
    partitioned over its process group, with the same arguments and results.

    ``layer_weights`` (layer name → scalar tensor, e.g. an ``nn.ParameterDict`` from
    ``simulation.kernels_layers.layer_weight_parameters``; default ``model.layer_weights`` if
    the model has one) makes the layer weights learnable: the neighbour sum becomes
    Σ_l w_l (A_l x) over the per-layer CSRs and gradients reach every w_l (layers not named
    keep their baked weight). Without it the merged CSR (weights baked in) is used, unchanged.
    ``flips`` (the "triples" estimator only): alternative paths per parameter; the estimate is
    unbiased for any value, its variance falls as 1/flips.
    The fused run estimators ("auto", "nonbacktracking", "triples") carry no layer-weight
    tangents: "auto" then runs "smoothed", the others are refused. For the plain SIR model
    "auto" is "triples" (unbiased, reverse mode, unit-weight graphs) and "nonbacktracking"
    otherwise (forward-mode tangents, weighted graphs); for the plain SEIRM model it is
    "triples" when only β, latent_days, infectious_days or the isolation efficacy require a
    gradient, else "smoothed".
    """
    if layer_weights is None:
        layer_weights = getattr(model, "layer_weights", None)
    layered = layer_weights is not None and len(layer_weights) > 0
    runner = getattr(population, "simulate_partitioned", None)
    if layered and (neighbour_sum is not None or runner is not None):
        raise SimulationError("learnable layer weights need the central per-layer CSR sum "
                              "(not a neighbour_sum hook or a partitioned population)")
    if runner is not None and neighbour_sum is None and uniforms is None:
        return runner(model, days, seed, estimator=estimator, device=device,
                      checkpoint_days=checkpoint_days, progress=progress,
                      initial_state=initial_state, extras=extras)
    if days < 0:
        raise SimulationError("days must be >= 0")
    if checkpoint_days is not None and checkpoint_days < 1:
        raise SimulationError("checkpoint_days must be >= 1")
    dev = resolve_device(device)
    graph = _graph_of(population)
    merged = graph.merged()
    n = merged.n
    attributes = population.attributes if isinstance(population, Population) else {}
    attributes = {k: v.to(dev) for k, v in attributes.items()}
    if "age_band" not in attributes:
        attributes["age_band"] = torch.zeros(n, dtype=torch.int8, device=dev)
    op: Callable[[torch.Tensor], torch.Tensor]
    if layered and layer_weights is not None:
        from simulation.kernels_layers import LayeredNeighbourSum

        try:
            op = LayeredNeighbourSum(graph, layer_weights, dev)
        except ValueError as exc:
            raise SimulationError(str(exc)) from None
    else:
        op = neighbour_sum or NeighbourSum(merged, dev)
    degree = merged.degree().to(dev).float()
    est = get_estimator(estimator)
    model = model.to(dev)
    if estimator in RUN_ESTIMATORS:
        hooks = layered or any(h is not None for h in (neighbour_sum, uniforms, extras, initial_state))
        seirm_triples = supports_seirm_triples(model) and not hooks and dev.type == "cpu"
        if estimator == "auto" and (supports_fused_sir(model, dev, hooks) and triples_serves(model, merged) or (
                seirm_triples and not undifferentiated(model))):
            estimator = "triples"
        if estimator == "triples" and seirm_triples:
            if torch.is_grad_enabled() and any(p.requires_grad for p in model.parameters()):
                series_t, final = simulate_seirm_triples(model, merged, attributes, days, seed, op, degree,
                                                         flips=flips, progress=progress)
                return Trajectory(series_t, final, days,
                                  {"seed": seed, "estimator": "triples", "device": str(dev), "n": n})
            estimator = "smoothed"  # nothing to differentiate: the plain hard forward
        if estimator == "triples":
            if not supports_fused_sir(model, dev, hooks) or merged.weights is not None:
                raise SimulationError("the triples estimator runs the plain SEIRM model, or the plain SIR model over "
                                      "a unit-weight contact graph, on CPU without hooks; use 'nonbacktracking' "
                                      "or 'smoothed'")
            series_t, final = simulate_sir_triples(model, merged, days, seed, flips=flips, progress=progress)
            return Trajectory(series_t, final, days, {"seed": seed, "estimator": "triples", "device": str(dev), "n": n})
        if supports_fused_sir(model, dev, hooks):
            series_t, final = simulate_sir_fused(model, merged, days, seed, progress)
            return Trajectory(series_t, final, days,
                              {"seed": seed, "estimator": "nonbacktracking", "device": str(dev), "n": n})
        if estimator == "nonbacktracking":
            raise SimulationError("the nonbacktracking estimator runs the plain SIR model on CPU without "
                                  "neighbour_sum/uniforms/extras/initial_state hooks or learnable layer_weights; "
                                  "use 'smoothed'")
        estimator = "smoothed"

    gen = torch.Generator().manual_seed(int(seed))
    state = initial_state if initial_state is not None else model.initial_state(n, gen, dev)
    keys = sorted(state)
    streams = model.n_uniform_streams()
    series: dict[str, list[torch.Tensor]] = {c: [state[c].sum()] for c in model.compartments}
    series["new_infections"] = [state["new_infections"].sum()]

    def run_days(start: int, stop: int, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        st = dict(zip(keys, tensors, strict=True))
        outs = []
        for day in range(start, stop):
            u = uniforms(day, streams) if uniforms is not None else step_uniforms(seed, day, n, dev, streams)
            st = step_day(model, st, day, u, neighbour_sum=op, degree=degree, attributes=attributes,
                          estimator=est, extras=extras)
            outs.append(torch.stack([st[c].sum() for c in (*model.compartments, "new_infections")]))
        return (*(st[k] for k in keys), torch.stack(outs))

    chunk = checkpoint_days or days or 1
    day = 0
    while day < days:
        stop = min(day + chunk, days)
        tensors = tuple(state[k] for k in keys)
        if checkpoint_days is not None and torch.is_grad_enabled():
            out = checkpoint(run_days, day, stop, *tensors, use_reentrant=False)
        else:
            out = run_days(day, stop, *tensors)
        state = dict(zip(keys, out[:-1], strict=True))
        daily = out[-1]
        for j, c in enumerate((*model.compartments, "new_infections")):
            series[c].extend(daily[:, j].unbind(0))
        if progress is not None:
            for d in range(day, stop):
                progress(d)
        day = stop
    return Trajectory(
        {k: torch.stack(v) for k, v in series.items()},
        state,
        days,
        {"seed": seed, "estimator": estimator, "device": str(dev), "n": n},
    )

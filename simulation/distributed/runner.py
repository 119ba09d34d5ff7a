"""The rank-local runner: ``simulate`` over a partitioned population, same API as the engine.

Every rank calls :func:`simulate` with the same arguments (the same global population, or
any population object with the same graph). Rank 0 partitions (or takes ``partition=``)
and broadcasts the owner array; each rank cuts its :class:`~simulation.distributed.halo.Shard`,
slices attributes and the initial state to its agents, draws its uniforms by *global* agent
id (``counter_uniforms_at``) and runs the unchanged engine (``simulation.engine.simulate``)
with a :class:`~simulation.distributed.halo.DistributedNeighbourSum`. The daily series are
summed over ranks, so every rank returns the global :class:`~simulation.engine.Trajectory`
(with ``final_state`` holding only its own agents, ids in ``meta["owned"]``).

Gradients: every rank backpropagates the same (replicated) loss of the global series. The
parameters enter the simulation through an all-reduce-in-backward identity, so after
``backward()`` each rank holds the full gradient — a calibration loop runs unchanged (its
optimiser steps stay identical on every rank). With ``checkpoint_days`` use
``sync_grads=False`` and :func:`sync_gradients` after ``backward()``.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.utils.stateless import _reparametrize_module

from simulation import engine
from simulation.distributed.halo import DistributedNeighbourSum, Shard, build_shard, check_counts
from simulation.distributed.partition import DistributedError, Partition, partition_graph
from simulation.population import ContactGraph, CSRLayer, Population
from simulation.rng import counter_uniforms_at
from simulation.substeps import SubstepModel

__all__ = ["LocalGraph", "PartitionedPopulation", "prepare", "simulate", "sync_gradients", "world"]


class LocalGraph(ContactGraph):
    """A rank's view of the graph for the engine: owned rows, columns into owned ∪ halo."""

    def __init__(self, owned_rows: CSRLayer) -> None:
        super().__init__({"local": owned_rows}, {"local": 1.0})

    def merged(self, weighted: bool = True) -> CSRLayer:
        """The owned rows (already merged and weighted by the global graph)."""
        layer = self.layers["local"]
        return layer if weighted else CSRLayer(layer.indptr, layer.indices)


def world(group=None) -> tuple[int, int]:
    """(rank, world size); (0, 1) when torch.distributed is not initialised."""
    if not dist.is_available() or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _graph_and_attributes(population: Population | ContactGraph):
    if isinstance(population, Population):
        return population.graph.merged(), population.attributes
    return population.merged(), {}


def _shared_partition(
    layer: CSRLayer, attributes, method: str, partition: Partition | None, group
) -> Partition:
    """Rank 0 decides; the owner array is broadcast so every rank uses the same one."""
    rank, size = world(group)
    if partition is not None:
        if partition.n_parts != size or partition.n != layer.n:
            raise DistributedError(
                f"partition has {partition.n_parts} parts for {partition.n} agents; "
                f"world is {size} ranks, graph {layer.n} agents"
            )
        parts = torch.from_numpy(partition.parts.copy())
        method = partition.method
    elif rank == 0:
        parts = torch.from_numpy(partition_graph(layer, size, method, attributes=attributes).parts)
    else:
        parts = torch.empty(layer.n, dtype=torch.int32)
    if size > 1:
        dist.broadcast(parts, 0, group=group)
    return Partition(parts.numpy().astype(np.int32, copy=False), size, method)


def prepare(
    population: Population | ContactGraph,
    *,
    method: str = "metis",
    partition: Partition | None = None,
    group=None,
) -> tuple[Shard, Population, Partition]:
    """Partition (collectively), cut this rank's shard and its local population view."""
    layer, attributes = _graph_and_attributes(population)
    part = _shared_partition(layer, attributes, method, partition, group)
    rank, size = world(group)
    shard = build_shard(layer, part, rank)
    if size > 1:
        check_counts(shard, group)
    owned = shard.owned
    local_attrs = {k: v[owned] for k, v in attributes.items()}
    local = Population(shard.n_local, local_attrs, LocalGraph(shard.owned_layer()))
    return shard, local, part


class PartitionedPopulation(Population):
    """A population (global ``n``, attributes, graph) plus this rank's shard: hand it to
    ``simulation.engine.simulate`` (or any code calling it) and the run is partitioned.

    Build it collectively (every rank, same population); rank 0's partition is broadcast.
    """

    def __init__(
        self,
        population: Population | ContactGraph,
        *,
        method: str = "metis",
        partition: Partition | None = None,
        group=None,
    ) -> None:
        if isinstance(population, ContactGraph):
            population = Population(population.n, {}, population)
        super().__init__(population.n, population.attributes, population.graph,
                         dict(population.meta))
        self.shard, self.local, self.partition = prepare(
            population, method=method, partition=partition, group=group
        )
        self.group = group

    def simulate_partitioned(self, model: SubstepModel, days: int, seed: int = 0,
                             **kwargs: Any) -> engine.Trajectory:
        """The engine's hook: run ``model`` on this rank's shard (see :func:`simulate`)."""
        return simulate(model, self, days, seed, **kwargs)


class _GradAllReduce(torch.autograd.Function):
    """Identity on a parameter; backward sums its gradient over ranks. Parameters enter the
    partitioned simulation through it, so after ``backward()`` every rank holds the full
    gradient of the (replicated) loss and terms outside the simulation are not summed."""

    @staticmethod
    def forward(ctx, p: torch.Tensor, group) -> torch.Tensor:  # type: ignore[override]
        ctx.group = group
        return p.view_as(p)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None

    @staticmethod
    def jvp(ctx, tangent: torch.Tensor, _group):  # type: ignore[override]
        return tangent  # identity forward: the parameter's tangent is every rank's own


class _ReplicatedSum(torch.autograd.Function):
    """Sum over ranks; every rank holds the result (a replicated loss), so the backward is
    the identity: each rank's local terms get the loss gradient once."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:  # type: ignore[override]
        ctx.group = group
        out = x.detach().clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return grad, None

    @staticmethod
    def jvp(ctx, tangent: torch.Tensor, _group):  # type: ignore[override]
        # forward mode: the series' tangents are sums over ranks like the series
        out = tangent.detach().clone()
        dist.all_reduce(out, group=ctx.group)
        return out


def sync_gradients(model: torch.nn.Module, group=None) -> None:
    """Sum parameter gradients over ranks (call once after ``backward()``, on every rank)."""
    _, size = world(group)
    if size == 1:
        return
    for p in model.parameters():  # same order on every rank; absent grads count as zero
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        dist.all_reduce(g, group=group)
        if p.grad is None and g.abs().sum() > 0:
            p.grad = g


def simulate(
    model: SubstepModel,
    population: Population | ContactGraph,
    days: int,
    seed: int = 0,
    *,
    partition: Partition | str = "metis",
    group=None,
    shard: tuple[Shard, Population] | None = None,
    sync_grads: bool = True,
    **kwargs: Any,
) -> engine.Trajectory:
    """``simulation.engine.simulate`` on this rank's part of the population (collective).

    Same arguments as the engine (``estimator``, ``device``, ``checkpoint_days``,
    ``progress``, ``extras``); ``partition`` is a method name or a :class:`Partition`;
    ``shard`` reuses a ``prepare`` result (a :class:`PartitionedPopulation` carries one).
    With ``sync_grads`` (default) the parameters' gradients through the simulation are
    summed over ranks inside ``backward()``; with ``checkpoint_days`` (recomputation runs
    outside this call) pass ``sync_grads=False`` and call :func:`sync_gradients` yourself.
    Without an initialised process group this is the plain engine run.
    """
    for bad in ("neighbour_sum", "uniforms"):
        if bad in kwargs:
            raise DistributedError(f"{bad}= is set by the partitioned runner")
    rank, size = world(group)
    if shard is None and isinstance(population, PartitionedPopulation):
        shard, group = (population.shard, population.local), population.group
        rank, size = world(group)
    if size == 1 and shard is None:
        return engine.simulate(model, population, days, seed, **kwargs)
    if shard is None:
        method = partition if isinstance(partition, str) else partition.method
        given = partition if isinstance(partition, Partition) else None
        sh, local, _ = prepare(population, method=method, partition=given, group=group)
    else:
        sh, local = shard
    dev = engine.resolve_device(kwargs.pop("device", "cpu"))
    initial = kwargs.pop("initial_state", None)
    if initial is None:  # the engine's own draw over all agents, then this rank's slice
        gen = torch.Generator().manual_seed(int(seed))
        full = model.initial_state(sh.n_total, gen, torch.device("cpu"))
        initial = {k: v[sh.owned].to(dev) for k, v in full.items()}
        del full
    elif next(iter(initial.values())).shape[0] == sh.n_total:
        initial = {k: v[sh.owned.to(v.device)].to(dev) for k, v in initial.items()}
    op = DistributedNeighbourSum(sh, dev, group)
    owned = sh.owned.to(dev)

    def uniforms(day: int, streams: int) -> torch.Tensor:
        return counter_uniforms_at(seed, day, owned, sh.n_total, dev, streams)

    model = model.to(dev)
    wrap = sync_grads and size > 1 and torch.is_grad_enabled()
    if wrap and kwargs.get("checkpoint_days") is not None:
        raise DistributedError(
            "checkpoint_days recomputes outside simulate(): pass sync_grads=False and call "
            "sync_gradients(model) after backward()"
        )
    params = {n: _GradAllReduce.apply(p, group) for n, p in model.named_parameters()
              if wrap and p.requires_grad}
    with warnings.catch_warnings(), _reparametrize_module(model, params):
        warnings.filterwarnings("ignore", message="The .grad attribute of a Tensor that is not a leaf")
        traj = engine.simulate(
            model, local, days, seed, device=dev, neighbour_sum=op, uniforms=uniforms,
            initial_state=initial, **kwargs,
        )
    if size > 1:
        names = list(traj.series)
        stacked = _ReplicatedSum.apply(torch.stack([traj.series[k] for k in names]), group)
        traj.series = dict(zip(names, stacked.unbind(0), strict=True))
    traj.meta.update(
        {"n": sh.n_total, "rank": rank, "world": size, "n_local": sh.n_local,
         "n_halo": sh.n_halo, "halo_bytes_per_exchange": sh.halo_bytes(),
         "exchanges": op.exchanges, "exchange_seconds": op.exchange_seconds, "owned": sh.owned}
    )
    return traj

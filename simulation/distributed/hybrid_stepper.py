"""Partitioned stepping of the coordinator's hybrid run (issue 16, first cut).

Every rank runs the same ``HybridSimulation`` loop (SPMD); :class:`HybridStepper` replaces
its one ``step_day`` call. The synthetic–synthetic (``central``) layer is partitioned with
METIS and summed with :class:`DistributedNeighbourSum` (halo exchange); each rank steps only
its own agents with ``agent_uniforms`` (the columns of ``step_uniforms``, so events equal
the 1-rank run). The cross sums (edges touching a physical agent) are computed on rank 0
only, which holds the fleet's protocol state, from the full ``I`` and broadcast.

First cut, measured limits: the full ``I`` and the new state are assembled on every rank
with an ``all_reduce`` of full-length vectors (each rank fills its own entries, the others
are zero, so the sums are exact), i.e. O(n) bytes per day per rank, not halo-only; so the
hybrid's aggregates are computed by the unchanged 1-rank code. No autograd window yet.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from simulation.engine import agent_uniforms, step_day
from simulation.population import CSRLayer
from simulation.substeps import SubstepModel

from .halo import DistributedNeighbourSum
from .partition import DistributedError
from .runner import LocalGraph, prepare, world

State = dict[str, torch.Tensor]


class HybridStepper:
    """One rank's part of a hybrid run's day (collective: every rank calls :meth:`step`)."""

    def __init__(self, central: CSRLayer, n: int, group=None, method: str = "metis",
                 timeout: float = 60.0) -> None:
        self.n, self.group, self.timeout = int(n), group, float(timeout)
        self.rank, self.size = world(group)
        shard, _, part = prepare(LocalGraph(central), method=method, group=group)
        self.shard, self.partition = shard, part
        self.owned = shard.owned.long()
        self.op = DistributedNeighbourSum(shard, "cpu", group)

    def _full(self, local: torch.Tensor) -> torch.Tensor:
        """The length-n vector from every rank's owned entries (exact: x + 0 = x)."""
        full = torch.zeros((self.n, *local.shape[1:]), dtype=local.dtype)
        full[self.owned] = local
        if self.size > 1:
            dist.all_reduce(full, group=self.group)
        return full

    def step(
        self,
        model: SubstepModel,
        state: State,
        day: int,
        seed: int,
        *,
        cross_fn: Callable[[torch.Tensor], torch.Tensor] | None,
        degree: torch.Tensor,
        attributes: Mapping[str, torch.Tensor],
        estimator: Any,
    ) -> tuple[State, torch.Tensor]:
        """Step day ``day``; returns the full new state and the full neighbour sums.

        ``cross_fn(I_full) -> cross sums [n]`` is called on rank 0 only (None: no cross)."""
        if self.size > 1:  # a dead or stuck rank is named here rather than hanging the day
            try:
                dist.monitored_barrier(self.group, timeout=timedelta(seconds=self.timeout))
            except RuntimeError as e:
                raise DistributedError(f"hybrid day {day}, rank {self.rank}: a peer rank "
                                       f"failed or is stuck: {e}") from e
        if self.size > 1:  # rank 0's β (calibration updates it there) on every rank
            for p in model.parameters():
                dist.broadcast(p.data, 0, group=self.group)
        own = self.owned
        local = {k: v[own].clone() for k, v in state.items()}
        captured: dict[str, torch.Tensor] = {}

        def neighbour_sum(infected: torch.Tensor) -> torch.Tensor:
            central = self.op(infected)
            full_i = self._full(infected.detach())
            if self.rank == 0 and cross_fn is not None:
                cross = torch.nan_to_num(torch.as_tensor(cross_fn(full_i), dtype=torch.float64),
                                         nan=0.0)
            else:
                cross = torch.zeros(self.n, dtype=torch.float64)
            if self.size > 1:
                dist.broadcast(cross, 0, group=self.group)
            total = central + cross[own].to(central.dtype)
            captured["sums"] = total
            return total

        new = step_day(model, local, day, agent_uniforms(seed, day, own, self.n),
                       neighbour_sum=neighbour_sum, degree=degree[own],
                       attributes={k: v[own] for k, v in attributes.items()},
                       estimator=estimator)
        torch.set_num_threads(1)
        # one collective for the whole state and the sums (float64 holds float32 exactly)
        parts = [*new.values(), captured["sums"]]
        full = self._full(torch.stack([v.detach().double() for v in parts]).T).T
        out = [f.to(v.dtype) for f, v in zip(full.unbind(0), parts, strict=True)]
        return dict(zip(new, out[:-1], strict=True)), out[-1]

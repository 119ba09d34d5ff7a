"""Partitioned stepping of the coordinator's hybrid run (issue 16): halo-only traffic.

Every rank runs the same ``HybridSimulation`` loop (SPMD); with ``procs_group`` its
``step()`` hands the day to :meth:`HybridStepper.day`. Each rank holds only its own agents'
state (``sim.state`` is the owned rows, global ids ``stepper.owned``):

* the synthetic–synthetic (``central``) layer is METIS-partitioned and summed with
  :class:`DistributedNeighbourSum` (one halo exchange, ≤ 8 B per cut edge);
* every physical agent is owned by rank 0 (they have no central edges, so this cuts
  nothing), which holds the fleet's protocol state. The cross sums (edges touching a
  physical agent) need the ``I`` of the *cross boundary*: the synthetic agents with a
  physical contact. Each rank sends rank 0 only its boundary agents' ``I`` (once a day,
  after the step, so rank 0 has it before the next day's protocol round, as remote mode
  needs), and rank 0 sends each rank only its boundary agents' cross sums;
* the day's aggregates are reduced as counts (compartment totals, per-area infected,
  the physical agents' report sums from rank 0): one ``all_reduce`` of 8 + areas floats;
* uniforms by global id (``agent_uniforms``), so events equal the 1-rank run bit for bit.

Per day a rank receives 4 B × (its halo + its cross boundary) + a fixed header (β, the
counts vector, the day-start barrier); ``bytes_received``/``bytes_sent`` count it.
In remote mode (``HybridSimulation(remote=True)``) rank 0 passes the devices' cross sums
to ``step(cross_sums=...)`` (other ranks pass nothing) and reads the boundary ``I`` for the
protocol with ``sim.cross_infected()``; the synthetic hazard bases the calibration needs
are gathered to rank 0 (ids and values of the agents with h > 0, in global order).
No autograd window across ranks (the hybrid steps under ``no_grad``), no tangents.
"""

from __future__ import annotations

import time
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist

from simulation.engine import agent_uniforms, step_day, step_uniforms
from simulation.kernels import NeighbourSum
from simulation.models import infection_probability, infection_probability_dbeta

from .halo import DistributedNeighbourSum
from .partition import DistributedError, Partition, partition_graph
from .runner import LocalGraph, prepare, world

if TYPE_CHECKING:  # pragma: no cover
    from coordinator.hybrid import HybridSimulation

State = dict[str, torch.Tensor]
_WARMUP_ROUND = 2**62  # the setup's timing runs of the protocol: a round no day uses
HEADER_BYTES = 1024  # per day and rank, beyond the per-agent traffic: β, barrier, counts


def _compact_fleet(sim: HybridSimulation, ends: torch.Tensor) -> Any:
    """The simulated fleet's protocol over the cross endpoints ``ends`` only (relabelled
    0..m−1, rows in the same order): its sums equal the full protocol's at ``ends`` (the
    masks cancel in the ring, refusals and padding depend on the degrees only). Noise is
    drawn per agent id over all n, so a noisy policy keeps the full-length protocol (None)."""
    from protocols.neighbourhood import FleetNeighbourhoodSum

    full = sim._fleet_sum()
    if full.policy.noisy:
        return None
    cross = sim.split.cross
    ip, ix = cross.indptr.numpy(), cross.indices.numpy()
    e = ends.numpy()
    deg = ip[e + 1] - ip[e]
    ptr = np.zeros(e.size + 1, np.int64)
    np.cumsum(deg, out=ptr[1:])
    pos = np.repeat(ip[e] - ptr[:-1], deg) + np.arange(ptr[-1], dtype=np.int64)
    cols = np.searchsorted(e, ix[pos])
    w = None if cross.weights is None else cross.weights[torch.from_numpy(pos)]
    return FleetNeighbourhoodSum(torch.from_numpy(ptr), torch.from_numpy(cols), w,
                                 variant=full.variant, policy=full.policy, ring=full.ring,
                                 run_id=full.run_id)


class HybridStepper:
    """One rank's part of a hybrid run (collective: every rank calls :meth:`day`)."""

    def __init__(self, sim: HybridSimulation, group: Any = None, method: str = "metis",
                 timeout: float = 60.0, gather_hazard: bool | None = None,
                 rank0_share: float | None = None) -> None:
        split = sim.split
        self.n, self.group, self.timeout = int(split.n), group, float(timeout)
        self.rank, self.size = world(group)
        self.gather_hazard = bool(sim.remote if gather_hazard is None else gather_hazard)
        self.bytes_sent = self.bytes_received = 0
        # wall seconds per phase (benchmark accounting): day-start barrier and β, the cross
        # sums (rank 0's protocol step and the scatter), the halo exchange, the end-of-day
        # collectives (counts, boundary I, hazard), and the whole day
        self.seconds = dict.fromkeys(("sync", "cross", "halo", "reduce", "day"), 0.0)
        phys = split.physical.numpy()
        cp = split.cross.indptr.numpy()
        self.ends = torch.from_numpy(np.flatnonzero(cp[1:] > cp[:-1]))  # cross endpoints E
        self._fleet = None
        self.balance: dict[str, float] = {}
        if self.rank == 0:  # METIS on the synthetic layer; the (isolated) physical go to 0
            self._fleet = None if sim.remote else _compact_fleet(sim, self.ends)
            shares = None
            if self.size > 1 and method == "metis":
                share = self._rank0_share(sim) if rank0_share is None else float(rank0_share)
                shares = [share] + [(1 - share) / (self.size - 1)] * (self.size - 1)
            parts = partition_graph(split.central, self.size, method, shares=shares).parts.copy()
            parts[phys] = 0
        else:  # replaced by rank 0's owner array (broadcast in prepare)
            parts = np.zeros(self.n, np.int32)
        shard, _, part = prepare(LocalGraph(split.central),
                                 partition=Partition(parts, self.size, method), group=group)
        self.shard, self.partition = shard, part
        self.owned = shard.owned.long()
        self.op = DistributedNeighbourSum(shard, "cpu", group)
        own_np = self.owned.numpy()
        # the cross boundary: synthetic agents with a physical contact, by owner rank
        boundary = (cp[1:] > cp[:-1]) & ~split.is_physical.numpy()
        self.boundary_ids = [torch.from_numpy(np.flatnonzero(boundary & (part.parts == r)))
                             for r in range(self.size)]
        self.boundary_local = torch.from_numpy(
            np.searchsorted(own_np, self.boundary_ids[self.rank].numpy()))
        self.sizes = [int(b.numel()) for b in self.boundary_ids]
        self.phys_local = torch.from_numpy(np.searchsorted(own_np, phys))  # rank 0 only
        if self.rank != 0 and np.isin(phys, own_np).any():
            raise DistributedError("physical agents must all be owned by rank 0")
        area = sim.area
        self.area_local = None if area is None else area.long()[self.owned]
        self.areas = 0 if area is None else int(area.max()) + 1
        self.area_den = None if area is None else \
            torch.bincount(area.long(), minlength=self.areas).clamp(min=1)
        self.degree = split.degree[self.owned]
        self.attributes = {k: v[self.owned] for k, v in sim.attributes.items()}
        # rank 0: the cross endpoints' I and the protocol over E only (relabelled, built
        # above), so no step of a day is O(n) on rank 0
        self.cross_I = sim.state["I"][self.ends].clone() if self.rank == 0 else torch.zeros(0)
        self._own_ends = torch.zeros(0, dtype=torch.int64)  # positions in E of rank 0's agents
        self._own_at = torch.zeros(0, dtype=torch.int64)  # ... and their local indices
        if self.rank == 0:
            ends = self.ends.numpy()
            mine = np.isin(ends, own_np)
            self._own_ends = torch.from_numpy(np.flatnonzero(mine))
            self._own_at = torch.from_numpy(np.searchsorted(own_np, ends[mine]))
            self._pos = [torch.from_numpy(np.searchsorted(ends, b.numpy()))
                         for b in self.boundary_ids]
        sim.state = {k: v[self.owned].clone() for k, v in sim.state.items()}

    def _rank0_share(self, sim: HybridSimulation) -> float:
        """Rank 0's fraction of the synthetic agents: rank 0 also runs the fleet's protocol
        each day, so it gets less of the rest. Measured once in CPU seconds (wall time on a
        shared machine is the scheduler's), best of 2: t_f, one protocol step over E; t_s,
        one whole synthetic day; share = (t_s − (P−1) t_f) / (P t_s),
        within [0.05, 1/P]. Remote mode (the protocol runs outside the day): 1/P."""
        p = self.size
        if self._fleet is None:
            return 1.0 / p
        central = NeighbourSum(sim.split.central, "cpu")
        t_f = t_s = float("inf")
        with torch.no_grad():
            for k in range(2):
                t0 = time.process_time()
                self._fleet.step(sim.state["I"][self.ends], round=_WARMUP_ROUND + k)
                t_f = min(t_f, time.process_time() - t0)
                t0 = time.process_time()
                step_day(sim.model, {k: v.clone() for k, v in sim.state.items()}, 0, step_uniforms(sim.seed, 0, self.n),
                         neighbour_sum=central, degree=sim.split.degree,
                         attributes=sim.attributes, estimator=sim._estimator)
                t_s = min(t_s, time.process_time() - t0)
        torch.set_num_threads(1)
        share = min(max((t_s - (p - 1) * t_f) / (p * t_s), 0.05), 1.0 / p)
        self.balance = {"fleet_step_s": t_f, "synthetic_day_s": t_s, "rank0_share": share}
        return share

    # ------------------------------------------------------------------ collectives
    def _a2a(self, values: torch.Tensor, send: list[int], recv: list[int]) -> torch.Tensor:
        out = torch.empty(sum(recv), dtype=values.dtype)
        dist.all_to_all_single(out, values.contiguous(), recv, send, group=self.group)
        self.bytes_sent += values.numel() * values.element_size()
        self.bytes_received += out.numel() * out.element_size()
        return out

    def _gather_boundary(self, infected: torch.Tensor) -> None:
        """Rank 0's ``cross_I`` (over E) ← every rank's boundary agents' ``I``."""
        if self.rank == 0:
            self.cross_I[self._own_ends] = infected[self._own_at].to(self.cross_I.dtype)
        if self.size == 1:
            return
        send = [self.sizes[self.rank] if (q == 0 and self.rank != 0) else 0
                for q in range(self.size)]
        recv = self.sizes[:] if self.rank == 0 else [0] * self.size
        recv[0] = 0
        mine = self.boundary_local if self.rank else self.boundary_local[:0]  # 0 keeps its own
        got = self._a2a(infected.index_select(0, mine).float(), send, recv)
        if self.rank == 0 and got.numel():
            self.cross_I[torch.cat(self._pos[1:])] = got.to(self.cross_I.dtype)

    def _scatter_cross(self, cross: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        """This rank's cross sums [n_local] from rank 0's ``cross`` over E."""
        local = torch.zeros(self.owned.numel(), dtype=dtype)
        if self.rank == 0:
            assert cross is not None
            local[self._own_at] = cross[self._own_ends]
        if self.size == 1:
            return local
        send = [self.sizes[q] if (self.rank == 0 and q != 0) else 0 for q in range(self.size)]
        recv = [self.sizes[self.rank] if (q == 0 and self.rank != 0) else 0
                for q in range(self.size)]
        pieces = torch.cat([cross[self._pos[q]] for q in range(1, self.size)]) \
            if self.rank == 0 and cross is not None else torch.zeros(0, dtype=dtype)
        got = self._a2a(pieces.to(dtype), send, recv)
        if self.rank != 0:
            local[self.boundary_local] = got
        return local

    def _all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            dist.all_reduce(x, group=self.group)
            nb = x.numel() * x.element_size()
            self.bytes_sent += nb
            self.bytes_received += nb
        return x

    def _gather_hazard(self, h: torch.Tensor) -> torch.Tensor:
        """Rank 0: the hazard bases h > 0 of all ranks in global id order (else: local)."""
        keep = h > 0
        ids, vals = self.owned[keep].double(), h[keep].double()
        if self.size == 1:
            return vals
        k = torch.tensor([ids.numel() if q == 0 else 0 for q in range(self.size)])
        counts = self._a2a(k, [1] * self.size, [1] * self.size)  # rank 0: every rank's k
        recv = [2 * int(c) for c in counts] if self.rank == 0 else [0] * self.size
        send = [2 * ids.numel() if q == 0 else 0 for q in range(self.size)]
        got = self._a2a(torch.stack([ids, vals], 1).flatten(), send, recv)
        if self.rank != 0:
            return vals
        pairs = got.view(-1, 2)
        order = torch.argsort(pairs[:, 0])
        return pairs[order, 1].contiguous()

    # ------------------------------------------------------------------ the day
    def cross_infected(self) -> torch.Tensor:
        """Rank 0: length-n ``I``, exact at every cross-edge endpoint (0 elsewhere)."""
        if self.rank != 0:
            raise DistributedError("the cross boundary's I is held by rank 0 only")
        full = torch.zeros(self.n, dtype=self.cross_I.dtype)
        full[self.ends] = self.cross_I
        return full

    def day(self, sim: HybridSimulation, cross_sums: torch.Tensor | None) -> dict[str, object]:
        """Step ``sim``'s day ``sim.day`` on this rank's agents; returns the global aggregates
        (equal on every rank). Remote mode: rank 0 passes the devices' ``cross_sums``."""
        day, model = sim.day, sim.model
        t_day = time.perf_counter()
        if sim.remote and self.rank == 0 and cross_sums is None:
            raise DistributedError("remote mode: rank 0 needs the protocol's cross sums")
        if self.size > 1:  # a dead or stuck rank is named here rather than hanging the day
            try:
                dist.monitored_barrier(self.group, timeout=timedelta(seconds=self.timeout))
            except RuntimeError as e:
                raise DistributedError(f"hybrid day {day}, rank {self.rank}: a peer rank "
                                       f"failed or is stuck: {e}") from e
            params = [q.data for q in model.parameters()]  # rank 0's β (calibration sets it)
            flat = torch.cat([q.flatten().double() for q in params])  # one message, exact
            dist.broadcast(flat, 0, group=self.group)
            for q, v in zip(params, flat.split([q.numel() for q in params]), strict=True):
                q.copy_(v.view_as(q))
        self.seconds["sync"] += time.perf_counter() - t_day
        state = sim.state
        captured: dict[str, torch.Tensor] = {}

        def neighbour_sum(infected: torch.Tensor) -> torch.Tensor:
            halo0 = self.op.exchange_seconds
            central = self.op(infected)
            self.seconds["halo"] += self.op.exchange_seconds - halo0
            t0 = time.perf_counter()
            cross = None
            if self.rank == 0:
                if sim.remote:
                    given = torch.as_tensor(cross_sums, dtype=torch.float64)[self.ends]
                elif self._fleet is not None:
                    given = self._fleet.step(self.cross_I, round=day).sums
                else:  # a noisy protocol: its noise is drawn per agent id over all n
                    given = sim._fleet_sum().step(self.cross_infected(), round=day).sums
                    given = given[self.ends]
                cross = torch.nan_to_num(given.to(torch.float64), nan=0.0)
                cross = cross.to(central.dtype)
            total = central + self._scatter_cross(cross, central.dtype)
            self.seconds["cross"] += time.perf_counter() - t0
            captured["sums"] = total
            return total

        with torch.no_grad():
            susceptible = state["S"].clone()
            new = step_day(model, state, day, agent_uniforms(sim.seed, day, self.owned, self.n),
                           neighbour_sum=neighbour_sum, degree=self.degree,
                           attributes=self.attributes, estimator=sim._estimator)
            torch.set_num_threads(1)  # the numba kernel may have changed torch's threads
            phys = self.phys_local if self.rank == 0 else self.phys_local[:0]
            if sim.remote:
                for v in new.values():
                    v[phys] = 0.0
            sums = captured["sums"]
            h = susceptible / self.degree.clamp(min=1.0) * sums
            h[phys] = 0.0
            beta_now: torch.Tensor = model.beta.detach()
            sums_p, s_p, deg_p = sums[phys], susceptible[phys], self.degree[phys]
            p = infection_probability(sums_p, s_p, deg_p, beta_now)
            dp = infection_probability_dbeta(sums_p, s_p, deg_p, beta_now)
            names = (*model.compartments, "new_infections")
            vec = [new[c].double().sum() for c in names]
            vec += [new["I"][phys].sum().double(), new["new_infections"][phys].sum().double(),
                    p.sum().double(), dp.sum().double()]
            head = torch.stack(vec)
            if self.area_local is not None:
                num = torch.bincount(self.area_local, weights=new["I"].double(),
                                     minlength=self.areas)
                head = torch.cat([head, num])
            t0 = time.perf_counter()
            red = self._all_reduce(head)
            self._gather_boundary(new["I"])
            hazard = self._gather_hazard(h) if self.gather_hazard else h[h > 0].double()
            self.seconds["reduce"] += time.perf_counter() - t0
        sim.state, sim.last_synthetic_hazard = new, hazard
        sim.day += 1
        self.seconds["day"] += time.perf_counter() - t_day
        k = len(names)
        agg: dict[str, object] = {c: float(red[i]) for i, c in enumerate(names)}
        if self.area_den is None:
            exposure = {"all": float(red[names.index("I")].float() / self.n)}
        else:
            exposure = {str(a): float(v) for a, v in
                        enumerate((red[k + 4:] / self.area_den).tolist())}
        agg["exposure"] = exposure
        if not sim.remote:
            agg.update({"physical_I": float(red[k]), "physical_new_infections": float(red[k + 1]),
                        "physical_expected_new": float(red[k + 2]),
                        "physical_dp_dbeta": float(red[k + 3])})
        return agg

    # ------------------------------------------------------------------ checkpoints
    def full_state(self, state: State) -> State | None:
        """Rank 0: the whole state from every rank's rows (collective; others get None)."""
        names = list(state)
        local = torch.stack([state[k].double() for k in names], 1)
        if self.size == 1:
            return state
        recv = [int(self.partition.sizes()[q]) * len(names) if self.rank == 0 else 0
                for q in range(self.size)]
        send = [local.numel() if q == 0 else 0 for q in range(self.size)]
        got = self._a2a(local.flatten(), send, recv)
        if self.rank != 0:
            return None
        ids = torch.cat([torch.from_numpy(self.partition.owned(q)) for q in range(self.size)])
        full = torch.empty(self.n, len(names), dtype=torch.float64)
        full[ids] = got.view(-1, len(names))
        return {k: full[:, i].to(state[k].dtype).contiguous() for i, k in enumerate(names)}

    def restore(self, sim: HybridSimulation) -> None:
        """``sim.state`` was just loaded whole (a checkpoint): keep this rank's rows, and on
        rank 0 the cross endpoints' I the next day's protocol reads."""
        full = sim.state
        if next(iter(full.values())).shape[0] != self.n:
            raise DistributedError(f"a checkpoint of {self.n} agents expected")
        if self.rank == 0:
            self.cross_I = full["I"][self.ends].clone()
        sim.state = {k: v[self.owned].clone() for k, v in full.items()}

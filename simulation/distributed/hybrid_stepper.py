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
With ``tangents=True`` (forward-mode ∂state/∂β, the full-path calibration's input) every
message above carries the tangent column beside the value: the halo exchange sends [x, ẋ]
in one ``all_to_all`` (8 B per boundary agent and receiving rank), the cross scatter
[sum, dsum], the boundary gather [I, ∂I/∂β]; the day's tangent totals ride in the counts'
``all_reduce``. No reverse-mode window across ranks (the hybrid steps under ``no_grad``).
With a :class:`~simulation.distributed.replay.PartitionedReplay` attached, each day opens
with rank 0 releasing the ranks that served its calibration fits since the last day.
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
        # forward-mode tangents ∂state/∂β (``HybridSimulation(tangents=True)``): each rank
        # carries its own agents' rows, rank 0 the cross endpoints' ∂I/∂β and their public
        # cross weight sums (the tangent round's decoding)
        self.tangents = bool(sim.tangents)
        self.cross_dI = sim.tangent["I"][self.ends].clone() if self.rank == 0 else \
            torch.zeros(0)
        self._cross_wsum = sim._cross_wsum[self.ends] if self.rank == 0 else torch.zeros(0)
        self._too_large = False  # a tangent past the protocol's public bound (fleet mode)
        # the full-path calibration's replay (simulation.distributed.replay), if attached:
        # its serving ranks answer rank 0's fits between two days
        self.replay: Any = None
        sim.state = {k: v[self.owned].clone() for k, v in sim.state.items()}
        sim.tangent = {k: v[self.owned].clone() for k, v in sim.tangent.items()}

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

    def _gather_boundary(self, infected: torch.Tensor, tangent: torch.Tensor | None = None
                         ) -> None:
        """Rank 0's ``cross_I`` (over E) ← every rank's boundary agents' ``I``; with
        ``tangent`` (∂I/∂β) also ``cross_dI``, the two columns in the same message."""
        cols = [infected] if tangent is None else [infected, tangent]
        if self.rank == 0:
            self.cross_I[self._own_ends] = infected[self._own_at].to(self.cross_I.dtype)
            if tangent is not None:
                self.cross_dI[self._own_ends] = tangent[self._own_at].to(self.cross_dI.dtype)
        if self.size == 1:
            return
        k = len(cols)
        send = [k * self.sizes[self.rank] if (q == 0 and self.rank != 0) else 0
                for q in range(self.size)]
        recv = [k * c for c in self.sizes] if self.rank == 0 else [0] * self.size
        recv[0] = 0
        mine = self.boundary_local if self.rank else self.boundary_local[:0]  # 0 keeps its own
        rows = torch.stack([c.index_select(0, mine).float() for c in cols], 1)
        got = self._a2a(rows.flatten(), send, recv).view(-1, k)
        if self.rank == 0 and got.numel():
            at = torch.cat(self._pos[1:])
            self.cross_I[at] = got[:, 0].to(self.cross_I.dtype)
            if tangent is not None:
                self.cross_dI[at] = got[:, 1].to(self.cross_dI.dtype)

    def _scatter_cross(self, cross: torch.Tensor | None, dtype: torch.dtype,
                       columns: int = 1) -> torch.Tensor:
        """This rank's cross sums [n_local] (or [n_local, columns]: values and tangents in
        one message) from rank 0's ``cross`` over E."""
        shape = (self.owned.numel(),) if columns == 1 else (self.owned.numel(), columns)
        local = torch.zeros(shape, dtype=dtype)
        if self.rank == 0:
            assert cross is not None
            local[self._own_at] = cross[self._own_ends]
        if self.size == 1:
            return local
        send = [columns * self.sizes[q] if (self.rank == 0 and q != 0) else 0
                for q in range(self.size)]
        recv = [columns * self.sizes[self.rank] if (q == 0 and self.rank != 0) else 0
                for q in range(self.size)]
        pieces = torch.cat([cross[self._pos[q]] for q in range(1, self.size)]) \
            if self.rank == 0 and cross is not None else torch.zeros(0, dtype=dtype)
        got = self._a2a(pieces.to(dtype).flatten(), send, recv)
        if self.rank != 0:
            local[self.boundary_local] = got.view(-1, columns) if columns > 1 else got
        return local

    def _all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            dist.all_reduce(x, group=self.group)
            nb = x.numel() * x.element_size()
            self.bytes_sent += nb
            self.bytes_received += nb
        return x

    def _gather_hazard(self, h: torch.Tensor, s: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rank 0: the hazard bases h > 0 of all ranks in global id order and the same
        agents' S before the day (else: local)."""
        keep = h > 0
        ids, vals, sus = self.owned[keep].double(), h[keep].double(), s[keep].double()
        if self.size == 1:
            return vals, sus
        k = torch.tensor([ids.numel() if q == 0 else 0 for q in range(self.size)])
        counts = self._a2a(k, [1] * self.size, [1] * self.size)  # rank 0: every rank's k
        recv = [3 * int(c) for c in counts] if self.rank == 0 else [0] * self.size
        send = [3 * ids.numel() if q == 0 else 0 for q in range(self.size)]
        got = self._a2a(torch.stack([ids, vals, sus], 1).flatten(), send, recv)
        if self.rank != 0:
            return vals, sus
        rows = got.view(-1, 3)
        order = torch.argsort(rows[:, 0])
        return rows[order, 1].contiguous(), rows[order, 2].contiguous()

    # ------------------------------------------------------------------ the day
    def cross_infected(self) -> torch.Tensor:
        """Rank 0: length-n ``I``, exact at every cross-edge endpoint (0 elsewhere)."""
        if self.rank != 0:
            raise DistributedError("the cross boundary's I is held by rank 0 only")
        full = torch.zeros(self.n, dtype=self.cross_I.dtype)
        full[self.ends] = self.cross_I
        return full

    def cross_tangent(self) -> torch.Tensor:
        """Rank 0: length-n ∂I/∂β, exact at every cross-edge endpoint (0 elsewhere): what the
        tangent round of the protocol reads (``tangents=True``)."""
        if self.rank != 0:
            raise DistributedError("the cross boundary's tangents are held by rank 0 only")
        full = torch.zeros(self.n, dtype=self.cross_dI.dtype)
        full[self.ends] = self.cross_dI
        return full

    def _sync(self, day: int, model: Any) -> None:
        """Open the day: the monitored barrier, then rank 0's parameters to every rank."""
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

    def day(self, sim: HybridSimulation, cross_sums: torch.Tensor | None,
            cross_dsums: torch.Tensor | None = None) -> dict[str, object]:
        """Step ``sim``'s day ``sim.day`` on this rank's agents; returns the global aggregates
        (equal on every rank). Remote mode: rank 0 passes the devices' ``cross_sums`` (and,
        with tangents, ``cross_dsums``)."""
        day, model = sim.day, sim.model
        t_day = time.perf_counter()
        if sim.remote and self.rank == 0 and (cross_sums is None or
                                              (self.tangents and cross_dsums is None)):
            raise DistributedError("remote mode: rank 0 needs the protocol's cross sums" +
                                   (" of values and tangents" if self.tangents else ""))
        if self.replay is not None:  # a fit between two days: rank 0 is done with it
            if self.rank == 0:
                self.replay.release()
            else:
                self.replay.serve()
        self._sync(day, model)
        self.seconds["sync"] += time.perf_counter() - t_day
        if self.tangents:
            return self._day_tangent(sim, cross_sums, cross_dsums, t_day)
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
            hazard, sus = self._gather_hazard(h, susceptible) if self.gather_hazard else \
                (h[h > 0].double(), susceptible[h > 0].double())
            self.seconds["reduce"] += time.perf_counter() - t0
        sim.state, sim.last_synthetic_hazard, sim.last_synthetic_susceptible = new, hazard, sus
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

    def _cross_tangent_sums(self, sim: HybridSimulation, day: int,
                            cross_sums: torch.Tensor | None, cross_dsums: torch.Tensor | None
                            ) -> torch.Tensor:
        """Rank 0: the cross sums over E of values and tangents, float32 [|E|, 2], exactly as
        the 1-rank ``_step_tangent`` computes them at those rows (rounds 2d and 2d+1 of the
        fleet's protocol; a tangent t is sent as (t + B)/(2B), decoded with the public
        cross weight sum; remote mode: the devices' decoded sums)."""
        from coordinator.hybrid import TANGENT_BOUND

        def decoded(given: torch.Tensor) -> torch.Tensor:
            return torch.nan_to_num(torch.as_tensor(given, dtype=torch.float64), nan=0.0)

        if sim.remote:
            assert cross_sums is not None and cross_dsums is not None
            v = decoded(torch.as_tensor(cross_sums)[self.ends])
            t = decoded(torch.as_tensor(cross_dsums)[self.ends])
            return torch.stack([v, t], 1).to(torch.float32)
        bound = TANGENT_BOUND
        if self._fleet is not None:  # the protocol over E only
            x, dx = self.cross_I.double(), self.cross_dI.double()
            v = decoded(self._fleet.step(x, round=2 * day).sums).double()
            c = decoded(self._fleet.step((dx + bound) / (2 * bound), round=2 * day + 1).sums)
        else:  # a noisy protocol: its noise is drawn per agent id over all n
            full = sim._fleet_sum()
            x, dx = self.cross_infected().double(), self.cross_tangent().double()
            v = decoded(full.step(x, round=2 * day).sums).double()[self.ends]
            c = decoded(full.step((dx + bound) / (2 * bound), round=2 * day + 1).sums
                        ).double()[self.ends]
        t = 2 * bound * c - bound * self._cross_wsum
        return torch.stack([v.to(torch.float32), t.to(torch.float32)], 1)

    def _day_tangent(self, sim: HybridSimulation, cross_sums: torch.Tensor | None,
                     cross_dsums: torch.Tensor | None, t_day: float) -> dict[str, object]:
        """The day with forward-mode tangents ∂state/∂β (``HybridSimulation(tangents=True)``):
        what :meth:`day` does, with the tangent column beside the value in every message
        (one halo exchange of [x, ẋ], one cross scatter of [sum, dsum], one boundary gather
        of [I, ∂I/∂β]) and the day's tangent totals in the counts' all_reduce. Every agent's
        value and tangent equal the 1-rank run's bit for bit; the float64 totals of the
        float32 per-agent tangents are summed per rank, then over ranks (≤ 1e-12 relative
        from the 1-rank run's one sum)."""
        import torch.autograd.forward_ad as fwad

        from coordinator.hybrid import TANGENT_BOUND, HybridError

        day, model = sim.day, sim.model
        if self._too_large:  # the 1-rank run refuses the tangent round at this point too
            raise HybridError(f"a tangent exceeds the public bound {TANGENT_BOUND}")
        beta = float(model.beta.detach())
        captured: dict[str, torch.Tensor] = {}

        def neighbour_sum(infected: torch.Tensor) -> torch.Tensor:
            primal, tangent = fwad.unpack_dual(infected)
            if tangent is None:
                tangent = torch.zeros_like(primal)
            halo0 = self.op.exchange_seconds
            central, dcentral = self.op.dual(primal.detach(), tangent.detach())
            self.seconds["halo"] += self.op.exchange_seconds - halo0
            t0 = time.perf_counter()
            cross = self._cross_tangent_sums(sim, day, cross_sums, cross_dsums) \
                if self.rank == 0 else None
            local = self._scatter_cross(cross, torch.float32, columns=2)
            self.seconds["cross"] += time.perf_counter() - t0
            val = central + local[:, 0].to(central.dtype)
            tan = dcentral + local[:, 1].to(dcentral.dtype)
            captured["sums"] = val
            return fwad.make_dual(val, tan)

        with torch.no_grad(), fwad.dual_level():
            beta_t = fwad.make_dual(torch.full((day + 1,), beta), torch.ones(day + 1))
            dual = {k: fwad.make_dual(v, sim.tangent[k]) for k, v in sim.state.items()}
            s_before = sim.state["S"].clone()
            out = step_day(model, dual, day, agent_uniforms(sim.seed, day, self.owned, self.n),
                           neighbour_sum=neighbour_sum, degree=self.degree,
                           attributes=self.attributes, estimator=sim._estimator,
                           extras={"beta_t": beta_t})
            torch.set_num_threads(1)  # the numba kernel may have changed torch's threads
            unpacked = {k: fwad.unpack_dual(v) for k, v in out.items()}
        new = {k: u.primal.clone() for k, u in unpacked.items()}
        dnew = {k: (torch.zeros_like(u.primal) if u.tangent is None else u.tangent.clone())
                for k, u in unpacked.items()}
        phys = self.phys_local if self.rank == 0 else self.phys_local[:0]
        if sim.remote:
            for d in (new, dnew):
                for v in d.values():
                    v[phys] = 0.0
        sums = captured["sums"]
        one_step = infection_probability_dbeta(sums, s_before, self.degree, beta)
        h = s_before / self.degree.clamp(min=1.0) * sums
        h[phys] = 0.0
        names = (*model.compartments, "new_infections")
        d_new = dnew["new_infections"]
        too_large = (dnew["I"].double().abs() > TANGENT_BOUND).sum().double() \
            if not sim.remote else torch.zeros((), dtype=torch.float64)
        head = torch.stack([*(new[c].double().sum() for c in names),
                            d_new.double().sum(), d_new[phys].double().sum(),
                            one_step.double().sum(), too_large])
        t0 = time.perf_counter()
        red = self._all_reduce(head)
        self._gather_boundary(new["I"], dnew["I"])
        hazard, sus = self._gather_hazard(h, s_before) if self.gather_hazard else \
            (h[h > 0].double(), s_before[h > 0].double())
        self.seconds["reduce"] += time.perf_counter() - t0
        sim.state, sim.tangent, sim.last_synthetic_hazard = new, dnew, hazard
        sim.last_synthetic_susceptible = sus
        sim.day += 1
        k = len(names)
        self._too_large = bool(red[k + 3] > 0)
        self.seconds["day"] += time.perf_counter() - t_day
        agg: dict[str, object] = {c: float(red[i]) for i, c in enumerate(names)}
        agg.update({"d_new_dbeta": float(red[k]), "d_new_dbeta_physical": float(red[k + 1]),
                    "d_new_dbeta_synthetic": float(red[k] - red[k + 1]),
                    "one_step_dbeta": float(red[k + 2])})
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

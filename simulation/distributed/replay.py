"""The full-path calibration's synthetic replay on the partitioned hybrid run (issue 16).

:class:`coordinator.calibration_path.SyntheticReplay` replays the synthetic agents of a
remote-mode hybrid run from day 0 at any per-day β, with forward-mode tangents, on one
process over all n agents. :class:`PartitionedReplay` is the same replay (same API for the
calibrator on rank 0: ``record``, ``run``, ``days``, ``beta_devices``) over the ranks of a
partitioned ``HybridSimulation(procs_group=...)``: each rank replays its own agents
(``agent_uniforms`` by global id, one halo exchange of [x, ẋ] per day through
:meth:`DistributedNeighbourSum.dual`), and the daily totals are summed over ranks.

Control flow (SPMD with one caller): the calibrator calls :meth:`run` on rank 0 only; the
other ranks answer in :meth:`serve`, which loops on rank 0's commands until
:meth:`release`. With the replay attached (the default), the partitioned stepper does both
at the start of every day: rank 0 releases, the others serve first — so a calibration fit
that runs between two days needs no extra call. After the last day, rank 0 calls
:meth:`release` once its last fit is done and the other ranks call :meth:`serve` once.

What travels per ``run`` call: one broadcast of the command and of β_t and the seeds
(8 B × (3 + T(K+1))), each rank's boundary cross sums of the days recorded since the last
call (16 B per boundary agent and day, once per day over the run), one halo exchange of
[x, ẋ] per day and direction, and one all_reduce of (K+1)·T float64 totals.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.autograd.forward_ad as fwad
import torch.distributed as dist

from simulation.engine import agent_uniforms, step_day
from simulation.estimators import get_estimator

from .partition import DistributedError

if TYPE_CHECKING:  # pragma: no cover
    from coordinator.hybrid import HybridSimulation

__all__ = ["PartitionedReplay", "replay_day"]

_RUN, _RELEASE = 1.0, 2.0


class PartitionedReplay:
    """This rank's part of the synthetic replay (build it on every rank, right after the
    partitioned ``HybridSimulation``, before its first step: it keeps the initial state)."""

    def __init__(self, model: Any, sim: HybridSimulation, seed: int, estimator: str,
                 beta_devices: float, *, attach: bool = True) -> None:
        st = sim._stepper
        if st is None:
            raise DistributedError("PartitionedReplay needs HybridSimulation(procs_group=...)")
        if sim.day != 0:
            raise DistributedError("build the replay before the run's first day")
        self.model, self.st, self.seed = model, st, int(seed)
        self.estimator = get_estimator(estimator)
        self.beta_devices = float(beta_devices)
        self.rank, self.size, self.group = st.rank, st.size, st.group
        self.initial = {k: v.detach().clone() for k, v in sim.state.items()}
        self.phys = st.phys_local if self.rank == 0 else st.phys_local[:0]
        for v in self.initial.values():
            v[self.phys] = 0.0  # never a physical agent's state
        self.attributes = st.attributes
        # rank 0 records the boundary rows of every rank (E without the physical agents)
        self._rows_all = torch.cat(st.boundary_ids) if self.rank == 0 else torch.zeros(0)
        self._split = [int(b.numel()) for b in st.boundary_ids]
        self.sums: list[torch.Tensor] = []  # rank 0: per day [Σ boundary, 2] float64
        self.local: list[torch.Tensor] = []  # this rank's boundary rows per day [b_r, 2]
        self.serving = False
        if attach:
            st.replay = self

    @property
    def days(self) -> int:
        return len(self.sums)

    def record(self, day_index: int, cross_sums: torch.Tensor,
               cross_dsums: torch.Tensor) -> None:
        """Rank 0: keep day ``day_index``'s decoded cross sums (length n, as the 1-rank
        replay takes them); they reach the other ranks with the next :meth:`run`."""
        if self.rank != 0:
            raise DistributedError("the devices' cross sums are recorded on rank 0")
        if day_index != len(self.sums):
            raise ValueError(f"replay records day {len(self.sums)} next, got {day_index}")
        v = torch.nan_to_num(torch.as_tensor(cross_sums, dtype=torch.float64), nan=0.0)
        dv = torch.nan_to_num(torch.as_tensor(cross_dsums, dtype=torch.float64), nan=0.0)
        rows = self._rows_all
        self.sums.append(torch.stack([v[rows], dv[rows]], 1))

    # ------------------------------------------------------------------ control flow
    def _command(self, head: torch.Tensor | None) -> torch.Tensor:
        msg = head if head is not None else torch.zeros(4, dtype=torch.float64)
        if self.size > 1:
            dist.broadcast(msg, 0, group=self.group)
        return msg

    def release(self) -> None:
        """Rank 0: the calibrator is done for now; the serving ranks return."""
        if self.rank == 0 and self.size > 1:
            self._command(torch.tensor([_RELEASE, 0, 0, 0], dtype=torch.float64))

    def serve(self) -> None:
        """Ranks 1..P−1: answer rank 0's :meth:`run` calls until it releases them."""
        if self.rank == 0:
            raise DistributedError("rank 0 calls run() and release(), not serve()")
        while True:
            head = self._command(None)
            if float(head[0]) == _RELEASE:
                return
            t_days, k_dirs, recorded = int(head[1]), int(head[2]), int(head[3])
            self._run(t_days, k_dirs, recorded, None, None)

    def run(self, beta_days: torch.Tensor, seeds: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rank 0 (collective with the serving ranks): synthetic new infections per day
        (float64 [T]) and their tangents [K, T] for the K directions ``seeds`` ([K, T])."""
        if self.rank != 0:
            raise DistributedError("the calibrator runs the replay on rank 0")
        t_days, k_dirs = int(beta_days.numel()), int(seeds.shape[0])
        if t_days > self.days:
            raise ValueError(f"{t_days} days asked, {self.days} recorded")
        self._command(torch.tensor([_RUN, t_days, k_dirs, self.days], dtype=torch.float64))
        return self._run(t_days, k_dirs, self.days, beta_days, seeds)

    def _run(self, t_days: int, k_dirs: int, recorded: int, beta_days: torch.Tensor | None,
             seeds: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        params = torch.zeros(t_days * (k_dirs + 1), dtype=torch.float64)
        if self.rank == 0:
            assert beta_days is not None and seeds is not None
            params = torch.cat([beta_days.double().flatten(), seeds.double().flatten()])
        if self.size > 1:
            dist.broadcast(params, 0, group=self.group)
        beta = params[:t_days]
        dirs = params[t_days:].view(k_dirs, t_days)
        self._sync_days(recorded)
        totals = torch.zeros(k_dirs + 1, t_days, dtype=torch.float64)
        for k in range(k_dirs):
            c, dc = self._pass(beta.to(torch.float32), dirs[k].to(torch.float32))
            totals[0], totals[k + 1] = c, dc
        if self.size > 1:
            dist.all_reduce(totals, group=self.group)
        return totals[0].clone(), totals[1:].clone()

    def _sync_days(self, recorded: int) -> None:
        """Every rank's boundary rows of the days recorded since the last call (rank 0
        scatters; 16 B per boundary agent and day)."""
        new = range(len(self.local), recorded)
        if not new:
            return
        st, mine = self.st, self._split[self.rank]
        if self.rank == 0:
            for t in new:
                self.local.append(self.sums[t][:mine].clone())
        if self.size == 1:
            return
        width = 2 * len(new)
        send = [width * self._split[q] if (self.rank == 0 and q) else 0
                for q in range(self.size)]
        recv = [width * mine if (q == 0 and self.rank) else 0 for q in range(self.size)]
        if self.rank == 0:
            bounds = torch.tensor(self._split).cumsum(0).tolist()
            pieces = [torch.stack([self.sums[t][bounds[q - 1]:bounds[q]] for t in new], 0)
                      .flatten() for q in range(1, self.size)]
            out = torch.cat(pieces)
        else:
            out = torch.zeros(0, dtype=torch.float64)
        got = st._a2a(out, send, recv)
        if self.rank:
            days = got.view(len(new), mine, 2)
            self.local.extend(days[i].clone() for i in range(len(new)))

    def _pass(self, beta_days: torch.Tensor, seed: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward-mode pass from day 0 over this rank's agents (per-rank totals), the
        same operations as ``SyntheticReplay._pass`` on the owned rows."""
        st = self.st
        t_days = int(beta_days.numel())
        counts = torch.zeros(t_days, dtype=torch.float64)
        dcounts = torch.zeros(t_days, dtype=torch.float64)
        state = {k: v.clone() for k, v in self.initial.items()}
        tangent = {k: torch.zeros_like(v) for k, v in state.items()}
        n_local = int(st.owned.numel())
        cross = torch.zeros(n_local, dtype=torch.float32)
        dcross = torch.zeros(n_local, dtype=torch.float32)
        rows = st.boundary_local
        for t in range(t_days):
            shift = float(beta_days[t]) - self.beta_devices
            v, dv = self.local[t][:, 0], self.local[t][:, 1]
            cross.zero_()
            dcross.zero_()
            cross[rows] = (v + dv * shift).clamp(min=0.0).to(torch.float32)
            dcross[rows] = (dv * float(seed[t])).to(torch.float32)

            def neighbour_sum(infected: torch.Tensor) -> torch.Tensor:
                primal, tan = fwad.unpack_dual(infected)
                if tan is None:
                    val = st.op.dual(primal.detach(), torch.zeros_like(primal))[0] + cross
                    return fwad.make_dual(val, dcross.clone())
                val, dval = st.op.dual(primal.detach(), tan.detach())
                return fwad.make_dual(val + cross, dval + dcross)

            state, tangent = replay_day(
                self.model, state, tangent, t, agent_uniforms(self.seed, t, st.owned, st.n),
                neighbour_sum=neighbour_sum, degree=st.degree, attributes=self.attributes,
                estimator=self.estimator, beta_days=beta_days, seed=seed, physical=self.phys)
            counts[t] = state["new_infections"].double().sum()
            dcounts[t] = tangent["new_infections"].double().sum()
        return counts, dcounts


def replay_day(model: Any, state: dict[str, torch.Tensor], tangent: dict[str, torch.Tensor],
               t: int, uniforms: torch.Tensor, *, neighbour_sum: Any, degree: torch.Tensor,
               attributes: Any, estimator: Any, beta_days: torch.Tensor, seed: torch.Tensor,
               physical: Any) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Day ``t`` of a synthetic replay under dual numbers: β_t = ``beta_days`` with tangent
    ``seed[t]`` on day t, the state carrying ``tangent``; returns the next (state, tangent),
    the ``physical`` rows zeroed (the replay holds synthetic agents only). Shared by
    :class:`coordinator.calibration_path.SyntheticReplay` (one process) and
    :class:`PartitionedReplay` (this rank's agents)."""
    with torch.no_grad(), fwad.dual_level():
        beta_t = fwad.make_dual(beta_days, torch.zeros_like(beta_days).index_fill_(
            0, torch.tensor([t]), float(seed[t])))
        dual = {k: fwad.make_dual(x, tangent[k]) for k, x in state.items()}
        out = step_day(model, dual, t, uniforms, neighbour_sum=neighbour_sum, degree=degree,
                       attributes=attributes, estimator=estimator, extras={"beta_t": beta_t})
        torch.set_num_threads(1)  # the numba kernel may have changed torch's threads
        unpacked = {k: fwad.unpack_dual(x) for k, x in out.items()}
    state = {k: u.primal.clone() for k, u in unpacked.items()}
    tangent = {k: torch.zeros_like(u.primal) if u.tangent is None else u.tangent.clone()
               for k, u in unpacked.items()}
    for d in (state, tangent):
        for x in d.values():
            x[physical] = 0.0
    return state, tangent

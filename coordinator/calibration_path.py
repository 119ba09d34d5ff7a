"""Full-path model of the online calibrator (run config ``tangents``): the synthetic agents
replayed from day 0 at θ, with exact forward-mode tangents, plus the devices' full-path
terms.

With tangents every device carries ∂state/∂β over the whole run and reports Σ ∂new_i/∂β
(SecAgg'd), and the neighbourhood protocol sums the devices' tangents beside their values
for the synthetic agents they touch (the decoded cross sums ``cross_sums``/``cross_dsums``
that :meth:`coordinator.hybrid.HybridSimulation.step` takes). The coordinator keeps those
cross sums per day. Day t's model count at θ is then

    ŷ_t(θ) = Σ_{i synthetic} new_i(θ)  +  N^phys_t + D^phys_t (θ_{s(t)} − β_dev),

where the synthetic part comes from replaying the synthetic agents from day 0 with β_t =
θ_{s(t)} (the public seed's uniforms, the run's estimator) and their physical contacts'
sums taken as v_t + dv_t (θ_{s(t)} − β_dev) (the recorded device sums, moved to first order
by the devices' own tangents), and N^phys_t, D^phys_t are the devices' SecAgg'd counts and
full-path tangents at the β their own dynamics ran at (β_dev, the enrolment's). ∂ŷ_t/∂θ_s
is exact for the synthetic agents (one forward-mode pass per segment s: the tangent seed is
1 on the segment's days) and first order for the devices; the devices carry one tangent
direction (a common shift of every day's β), so with β_t by segment their terms are
attributed to the day's own segment (what is dropped: ∂(device terms of day t)/∂θ_s for
earlier segments s; the devices are a small share of the population).

The replay holds the synthetic agents only: the physical rows of its state and tangent are
zero after every step, as in the run itself.
"""

from __future__ import annotations

import torch
import torch.autograd.forward_ad as fwad

from coordinator.hybrid import GraphSplit
from simulation.distributed.replay import replay_day
from simulation.engine import step_uniforms
from simulation.estimators import get_estimator
from simulation.kernels import NeighbourSum
from simulation.models import SIR
from simulation.substeps import State

__all__ = ["SyntheticReplay"]


class SyntheticReplay:
    """Replays the synthetic agents of a remote-mode hybrid run at any per-day β."""

    def __init__(self, model: SIR, split: GraphSplit, initial: State, seed: int,
                 estimator: str, beta_devices: float) -> None:
        self.model = model
        self.split = split
        self.seed = int(seed)
        self.estimator = get_estimator(estimator)
        self.beta_devices = float(beta_devices)
        self.initial = {k: v.detach().clone() for k, v in initial.items()}
        for v in self.initial.values():
            v[split.physical] = 0.0  # never a physical agent's state
        self._central = NeighbourSum(split.central, "cpu")
        ip = split.cross.indptr
        # synthetic agents with physical contacts: the rows whose cross sums are kept
        rows = torch.nonzero(ip[1:] > ip[:-1]).flatten()
        self.rows = rows[~split.is_physical[rows]]
        self.sums: list[torch.Tensor] = []  # per day: v_t on self.rows (float64)
        self.dsums: list[torch.Tensor] = []  # per day: dv_t on self.rows
        self.attributes = {"age_band": torch.zeros(split.n, dtype=torch.int8)}

    @property
    def days(self) -> int:
        return len(self.sums)

    def record(self, day_index: int, cross_sums: torch.Tensor,
               cross_dsums: torch.Tensor) -> None:
        """Keep day ``day_index``'s decoded cross sums of the devices' values and tangents."""
        if day_index != len(self.sums):
            raise ValueError(f"replay records day {len(self.sums)} next, got {day_index}")
        v = torch.nan_to_num(torch.as_tensor(cross_sums, dtype=torch.float64), nan=0.0)
        dv = torch.nan_to_num(torch.as_tensor(cross_dsums, dtype=torch.float64), nan=0.0)
        self.sums.append(v[self.rows].clone())
        self.dsums.append(dv[self.rows].clone())

    def run(self, beta_days: torch.Tensor, seeds: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor]:
        """Synthetic new infections per day (float64 [T]) and their tangents [K, T] for the
        K tangent directions ``seeds`` ([K, T], ∂β_t per direction). T = ``beta_days``'s
        length ≤ the days recorded."""
        t_days = int(beta_days.numel())
        if t_days > self.days:
            raise ValueError(f"{t_days} days asked, {self.days} recorded")
        k_dirs = int(seeds.shape[0])
        counts = torch.zeros(t_days, dtype=torch.float64)
        dcounts = torch.zeros(k_dirs, t_days, dtype=torch.float64)
        for k in range(k_dirs):
            c, dc = self._pass(beta_days.to(torch.float32), seeds[k].to(torch.float32))
            counts, dcounts[k] = c, dc
        return counts, dcounts

    def _pass(self, beta_days: torch.Tensor, seed: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
        n, phys = self.split.n, self.split.physical
        t_days = int(beta_days.numel())
        counts = torch.zeros(t_days, dtype=torch.float64)
        dcounts = torch.zeros(t_days, dtype=torch.float64)
        state = {k: v.clone() for k, v in self.initial.items()}
        tangent = {k: torch.zeros_like(v) for k, v in state.items()}
        cross = torch.zeros(n, dtype=torch.float32)
        dcross = torch.zeros(n, dtype=torch.float32)
        for t in range(t_days):
            shift = float(beta_days[t]) - self.beta_devices
            v = (self.sums[t] + self.dsums[t] * shift).clamp(min=0.0)
            cross.zero_()
            dcross.zero_()
            cross[self.rows] = v.to(torch.float32)
            dcross[self.rows] = (self.dsums[t] * float(seed[t])).to(torch.float32)

            def neighbour_sum(infected: torch.Tensor) -> torch.Tensor:
                primal, tan = fwad.unpack_dual(infected)
                val = self._central(primal.detach()) + cross
                dval = dcross.clone() if tan is None else self._central(tan.detach()) + dcross
                return fwad.make_dual(val, dval)

            state, tangent = replay_day(
                self.model, state, tangent, t, step_uniforms(self.seed, t, n),
                neighbour_sum=neighbour_sum, degree=self.split.degree, attributes=self.attributes,
                estimator=self.estimator, beta_days=beta_days, seed=seed, physical=phys)
            counts[t] = float(state["new_infections"].double().sum())
            dcounts[t] = float(tangent["new_infections"].double().sum())
        return counts, dcounts

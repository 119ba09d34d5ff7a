"""Hybrid population ("dual agents", LPM paper §6): K physical agents, the rest synthetic.

The contact graph is split in two: edges between two synthetic agents (summed centrally by
the coordinator's CSR kernel) and *cross* edges, those with at least one physical endpoint.
Cross edges are summed by the secure neighbourhood protocol: a physical agent's whole
neighbour sum and a synthetic agent's sum over its physical contacts. In fleet mode (a
simulated fleet) that is :class:`protocols.neighbourhood.FleetNeighbourhoodSum`; with real
devices (Flower) the ServerApp passes the protocol's sums in ``step(cross_sums=...)``.
Randomness is the central run's (``simulation.engine.step_uniforms``), so a hybrid run equals
the centralised run with the same seed.

Documented limit: a synthetic agent run by the coordinator learns its sum over its physical
contacts (that is the coupling); with one physical contact that sum is the contact's status.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from protocols.neighbourhood import FleetNeighbourhoodSum, NeighbourhoodPolicy
from protocols.ring import FixedPointRing
from simulation.engine import step_day, step_uniforms
from simulation.estimators import get_estimator
from simulation.kernels import NeighbourSum
from simulation.models import SIR, infection_probability, infection_probability_dbeta
from simulation.population import ContactGraph, CSRLayer, Population
from simulation.substeps import State

__all__ = ["HybridError", "GraphSplit", "split_graph", "HybridSimulation", "agent_name",
           "area_prevalence"]


TANGENT_BOUND = 1024.0  # public bound on |∂I_j/∂β| sent through the neighbourhood sum


class HybridError(ValueError):
    """Invalid hybrid-population settings."""


def agent_name(i: int) -> str:
    """Protocol identifier of agent ``i`` (pseudonymous handle used on the wire)."""
    return f"a{int(i)}"


@dataclass
class GraphSplit:
    """The merged graph split into central (synthetic–synthetic) and cross edges."""

    n: int
    physical: torch.Tensor  # int64 [K], sorted
    is_physical: torch.Tensor  # bool [n]
    central: CSRLayer
    cross: CSRLayer
    degree: torch.Tensor  # float32 [n], merged degree n_i

    def cross_contacts(self) -> dict[str, list[tuple[str, float]]]:
        """``{target: [(contact, w_target,contact)]}`` over cross edges (non-empty rows)."""
        out: dict[str, list[tuple[str, float]]] = {}
        ip, ix = self.cross.indptr, self.cross.indices
        w = self.cross.weights
        for t in torch.nonzero(ip[1:] > ip[:-1]).flatten().tolist():
            a, b = int(ip[t]), int(ip[t + 1])
            out[agent_name(t)] = [(agent_name(int(ix[k])), 1.0 if w is None else float(w[k]))
                                  for k in range(a, b)]
        return out


def _sub_csr(layer: CSRLayer, keep: torch.Tensor) -> CSRLayer:
    n = layer.n
    rows = torch.repeat_interleave(torch.arange(n), layer.indptr[1:] - layer.indptr[:-1])
    counts = torch.bincount(rows[keep], minlength=n)
    indptr = torch.zeros(n + 1, dtype=torch.int64)
    indptr[1:] = torch.cumsum(counts, 0)
    weights = None if layer.weights is None else layer.weights[keep].contiguous()
    return CSRLayer(indptr, layer.indices[keep].contiguous(), weights)


def split_graph(graph: Population | ContactGraph, physical: torch.Tensor) -> GraphSplit:
    """Split ``graph``'s merged layer around the ``physical`` agent indices."""
    merged = (graph.graph if isinstance(graph, Population) else graph).merged()
    n = merged.n
    phys = torch.unique(torch.as_tensor(physical, dtype=torch.int64))
    if phys.numel() == 0 or int(phys.min()) < 0 or int(phys.max()) >= n:
        raise HybridError(f"physical agents must be 1..{n} distinct indices in [0, {n})")
    is_phys = torch.zeros(n, dtype=torch.bool)
    is_phys[phys] = True
    rows = torch.repeat_interleave(torch.arange(n), merged.indptr[1:] - merged.indptr[:-1])
    cross = is_phys[rows] | is_phys[merged.indices.long()]
    return GraphSplit(n, phys, is_phys, _sub_csr(merged, ~cross), _sub_csr(merged, cross),
                      merged.degree().float())


def area_prevalence(infected: torch.Tensor, area: torch.Tensor | None) -> dict[str, float]:
    """Public exposure: prevalence per area (``{"all": ...}`` without areas)."""
    if area is None:
        return {"all": float(infected.float().mean())}
    a = area.long()
    num = torch.bincount(a, weights=infected.double())
    den = torch.bincount(a).clamp(min=1)
    return {str(k): float(v) for k, v in enumerate((num / den).tolist())}


class HybridSimulation:
    """Day-by-day SIR over a hybrid population (physical agents in fleet or remote mode).

    ``remote=False`` (fleet mode): the coordinator simulates the physical agents too (a
    simulated fleet) and sums cross edges with :class:`FleetNeighbourhoodSum`.
    ``remote=True``: physical agents live on devices; their rows here stay zero, the caller
    passes the protocol's cross sums to :meth:`step` and adds the devices' counts.
    """

    def __init__(
        self,
        model: SIR,
        population: Population | ContactGraph,
        physical: torch.Tensor,
        seed: int = 0,
        *,
        variant: str = "assisted",
        policy: NeighbourhoodPolicy | None = None,
        remote: bool = False,
        secret: bytes | None = None,
        estimator: str = "straight_through",
        tangents: bool = False,
        frac_bits: int | None = None,
        procs_group: Any = None,
    ) -> None:
        if not isinstance(model, SIR):
            raise HybridError("hybrid mode supports the SIR model")
        self.model = model
        self.seed = int(seed)
        self.remote = remote
        self.split = split_graph(population, physical)
        self.area = population.attributes.get("area") if isinstance(population, Population) \
            else None
        n = self.split.n
        self._central = NeighbourSum(self.split.central, "cpu")
        self._fleet = None if remote else FleetNeighbourhoodSum(
            self.split.cross.indptr, self.split.cross.indices, self.split.cross.weights,
            variant=variant, policy=policy, run_id="hybrid", secret=secret,
            ring=None if frac_bits is None else FixedPointRing(frac_bits))
        gen = torch.Generator().manual_seed(self.seed)
        with torch.no_grad():
            self.state: State = model.initial_state(n, gen, torch.device("cpu"))
        self._initial_physical = {k: v[self.split.physical].clone() for k, v in self.state.items()}
        if remote:
            self._zero_physical()
        self.day = 0  # next day to simulate
        self.last_synthetic_hazard = torch.zeros(0, dtype=torch.float64)
        # the same agents' S_i before the day (fractional with the expected estimator): the
        # calibration's expected count is Σ S_i (1 − exp(−β h_i / S_i))
        self.last_synthetic_susceptible = torch.zeros(0, dtype=torch.float64)
        self._estimator = get_estimator(estimator)
        self.tangents = tangents
        # ∂state/∂β, carried forward in time (forward mode): every agent keeps its own
        self.tangent: State = {k: torch.zeros_like(v) for k, v in self.state.items()}
        cw = self.split.cross
        rows = torch.repeat_interleave(torch.arange(n), cw.indptr[1:] - cw.indptr[:-1])
        w = torch.ones(cw.nnz, dtype=torch.float64) if cw.weights is None else \
            cw.weights.double()
        self._cross_wsum = torch.zeros(n, dtype=torch.float64).index_add_(0, rows, w)
        self.attributes = {"age_band": torch.zeros(n, dtype=torch.int8)}
        # partitioned synthetic part (simulation.distributed.hybrid_stepper): every rank of
        # an initialised process group runs this same loop; procs_group=None keeps 1 rank
        self._stepper = None
        if procs_group is not None:  # from here on self.state (and self.tangent) hold this
            # rank's agents only
            from simulation.distributed.hybrid_stepper import HybridStepper
            self._stepper = HybridStepper(self, group=None if procs_group is True
                                          else procs_group)

    def cross_infected(self) -> torch.Tensor:
        """The ``I`` the cross-edge protocol reads (exact at every cross endpoint); with
        ``procs_group`` rank 0's view, gathered from the ranks' cross boundary each day."""
        return self.state["I"] if self._stepper is None else self._stepper.cross_infected()

    def cross_tangent(self) -> torch.Tensor:
        """The ∂I/∂β the protocol's tangent round reads (``tangents=True``), exact at every
        cross endpoint; with ``procs_group`` rank 0's view, gathered beside ``I``."""
        return self.tangent["I"] if self._stepper is None else self._stepper.cross_tangent()

    def _zero_physical(self) -> None:
        for v in self.state.values():
            v[self.split.physical] = 0.0

    @property
    def physical_initial_state(self) -> dict[str, torch.Tensor]:
        """Initial S/I/R of the physical agents (what each simulated device starts from)."""
        return self._initial_physical

    def counts(self) -> dict[str, float]:
        if self._stepper is not None:
            raise HybridError("with procs_group this rank holds its own agents only: use the "
                              "aggregates step() returns")
        # float64 sums (exact for 0/1 states; the ``expected`` estimator's fractional states
        # then round once, not per float32 partial sum)
        return {c: float(self.state[c].double().sum()) for c in (*self.model.compartments,
                                                                  "new_infections")}

    def step(self, cross_sums: torch.Tensor | None = None,
             cross_dsums: torch.Tensor | None = None) -> dict[str, object]:
        """Simulate day ``self.day``; returns the day's aggregates (counts, risk, ∂p/∂β).
        With ``tangents`` in remote mode, ``cross_dsums`` are the protocol's decoded cross
        sums of the neighbours' tangents Σ_j w_ij ∂I_j/∂β."""
        if self.tangents:
            return self._step_tangent(cross_sums, cross_dsums)
        if self._stepper is not None:  # partitioned: rank 0 alone passes the cross sums
            return self._stepper.day(self, cross_sums)
        n = self.split.n
        if self.remote and cross_sums is None:
            raise HybridError("remote mode needs the protocol's cross sums")
        day = self.day
        captured: dict[str, torch.Tensor] = {}

        def neighbour_sum(infected: torch.Tensor) -> torch.Tensor:
            central = self._central(infected)
            if cross_sums is not None:
                cross = torch.as_tensor(cross_sums, dtype=torch.float64)
            else:
                cross = self._fleet_sum().step(infected, round=day).sums
            cross = torch.nan_to_num(cross, nan=0.0).to(central.dtype)
            total = central + cross
            captured["sums"] = total
            return total

        with torch.no_grad():
            susceptible = self.state["S"].clone()
            self.state = step_day(self.model, self.state, day, step_uniforms(self.seed, day, n),
                                  neighbour_sum=neighbour_sum, degree=self.split.degree,
                                  attributes=self.attributes, estimator=self._estimator)
            torch.set_num_threads(1)  # the numba kernel may have changed torch's threads
            if self.remote:
                self._zero_physical()
            phys = self.split.physical
            h = susceptible / self.split.degree.clamp(min=1.0) * captured["sums"]
            h[phys] = 0.0
            # synthetic agents' hazard base S_i/n_i Σ_j w_ij I_j of this day (calibration)
            self.last_synthetic_hazard = h[h > 0].double()
            self.last_synthetic_susceptible = susceptible[h > 0].double()
            beta = self.model.beta.detach()
            sums_p = captured["sums"][phys]
            p = infection_probability(sums_p, susceptible[phys], self.split.degree[phys], beta)
            dp = infection_probability_dbeta(sums_p, susceptible[phys], self.split.degree[phys],
                                             beta)
        self.day += 1
        agg: dict[str, object] = {**self.counts(),
                                  "exposure": area_prevalence(self.state["I"], self.area)}
        if not self.remote:
            agg.update({
                "physical_I": float(self.state["I"][phys].sum()),
                "physical_new_infections": float(self.state["new_infections"][phys].sum()),
                "physical_expected_new": float(p.sum()),
                "physical_dp_dbeta": float(dp.sum()),
            })
        return agg

    def _step_tangent(self, cross_sums: torch.Tensor | None = None,
                      cross_dsums: torch.Tensor | None = None) -> dict[str, object]:
        """One day with forward-mode tangents ∂state/∂β (exact decentralised gradients).

        Every agent carries its own tangent; the neighbour sum is linear, so the secure
        protocol sums the neighbours' tangents Σ_j w_ij ∂I_j/∂β in a second round beside
        their values, and each agent's own step is differentiated locally (torch forward
        AD through the same SIR model). Σ_i ∂new_i/∂β is then the full-path derivative of
        the day's expected new infections, not Eq. 11's one-step one (neighbours fixed).
        In remote mode (Flower devices) the cross sums of values and tangents come from the
        protocol (``cross_sums``, ``cross_dsums``) and the physical rows stay zero: each
        device steps its own tangent (``edge_agent.client_app``).
        """
        if self._stepper is not None:  # partitioned: rank 0 alone passes the cross sums
            return self._stepper.day(self, cross_sums, cross_dsums)
        if self.remote and (cross_sums is None or cross_dsums is None):
            raise HybridError("remote mode with tangents needs the protocol's cross sums of "
                              "values and tangents")
        import torch.autograd.forward_ad as fwad

        n, day = self.split.n, self.day
        beta = float(self.model.beta.detach())
        captured: dict[str, torch.Tensor] = {}

        def secure(x: torch.Tensor, rnd: int, bound: float = 0.0) -> torch.Tensor:
            """Cross-edge sum by the protocol. Contributions must lie in [0, 1], so a tangent
            t (|t| ≤ bound, public) is sent as (t + bound) / (2 bound) and decoded with the
            target's public cross weight sum."""
            if self.remote:  # the devices' protocol already ran (decoded sums)
                given = cross_dsums if bound else cross_sums
                return torch.nan_to_num(torch.as_tensor(given, dtype=torch.float64),
                                        nan=0.0).to(torch.float32)
            x = x.detach().double()
            if bound:
                if float(x.abs().max()) > bound:
                    raise HybridError(f"a tangent exceeds the public bound {bound}")
                x = (x + bound) / (2 * bound)
            cross = torch.nan_to_num(self._fleet_sum().step(x, round=rnd).sums, nan=0.0).double()
            if bound:
                cross = 2 * bound * cross - bound * self._cross_wsum
            return cross.to(torch.float32)

        def neighbour_sum(infected: torch.Tensor) -> torch.Tensor:
            primal, tangent = fwad.unpack_dual(infected)
            val = self._central(primal.detach()) + secure(primal, 2 * day)
            tan = self._central(tangent.detach()) + secure(tangent, 2 * day + 1, TANGENT_BOUND)
            captured["sums"], captured["dsums"] = val, tan
            return fwad.make_dual(val, tan)

        with torch.no_grad(), fwad.dual_level():
            beta_t = fwad.make_dual(torch.full((day + 1,), beta), torch.ones(day + 1))
            state = {k: fwad.make_dual(v, self.tangent[k]) for k, v in self.state.items()}
            s_before = self.state["S"].clone()
            out = step_day(self.model, state, day, step_uniforms(self.seed, day, n),
                           neighbour_sum=neighbour_sum, degree=self.split.degree,
                           attributes=self.attributes, estimator=self._estimator,
                           extras={"beta_t": beta_t})
            torch.set_num_threads(1)
            unpacked = {k: fwad.unpack_dual(v) for k, v in out.items()}
        self.state = {k: u.primal.clone() for k, u in unpacked.items()}
        self.tangent = {k: (torch.zeros_like(u.primal) if u.tangent is None else u.tangent.clone())
                        for k, u in unpacked.items()}
        if self.remote:
            self._zero_physical()
            for v in self.tangent.values():
                v[self.split.physical] = 0.0
        self.day += 1
        phys = self.split.physical
        one_step = infection_probability_dbeta(captured["sums"], s_before, self.split.degree, beta)
        h = s_before / self.split.degree.clamp(min=1.0) * captured["sums"]
        h[phys] = 0.0
        self.last_synthetic_hazard = h[h > 0].double()  # as in step() (calibration)
        self.last_synthetic_susceptible = s_before[h > 0].double()
        d_new = self.tangent["new_infections"]
        return {**self.counts(),
                "d_new_dbeta": float(d_new.double().sum()),
                "d_new_dbeta_physical": float(d_new[phys].double().sum()),
                "d_new_dbeta_synthetic": float(d_new.double().sum() - d_new[phys].double().sum()),
                "one_step_dbeta": float(one_step.double().sum())}

    def _fleet_sum(self) -> FleetNeighbourhoodSum:
        """The simulated fleet's cross-edge sum (fleet mode only; remote mode gets the sums)."""
        if self._fleet is None:
            raise HybridError("no simulated fleet in remote mode: pass the protocol's cross sums")
        return self._fleet

    # ------------------------------------------------------------------ checkpoints
    def state_bytes(self) -> bytes:
        """The state (and next day) as compressed bytes for the store's checkpoint. With
        ``procs_group`` a collective (every rank calls it): rank 0 gets the whole state's
        bytes, the other ranks b""."""
        state = self.state if self._stepper is None else self._stepper.full_state(self.state)
        if state is None:
            return b""
        buf = io.BytesIO()
        # 0/1 states as bytes; fractional ones (the ``expected`` estimator) kept exactly
        arrays: dict[str, Any] = {k: v.numpy().astype(np.uint8) if bool((v == v.round()).all())
                                  and bool(((v >= 0) & (v <= 255)).all()) else v.numpy().copy()
                                  for k, v in state.items()}
        np.savez_compressed(buf, day=np.array(self.day), **arrays)
        return buf.getvalue()

    def load_state(self, blob: bytes) -> None:
        """Restore a checkpoint written by :meth:`state_bytes`."""
        with np.load(io.BytesIO(blob)) as z:
            self.day = int(z["day"])
            self.state = {k: torch.from_numpy(z[k].astype(np.float32)) for k in self.state}
        if self._stepper is not None:  # every rank loads the same blob and keeps its rows
            self._stepper.restore(self)

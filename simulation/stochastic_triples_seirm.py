"""The 'triples' estimator for SEIRM: unbiased derivatives w.r.t. β, latent_days and
infectious_days from sampled exact coupled alternative paths (see ``stochastic_triples``).

The primal path is the engine's own run (``simulation.engine.step_day``, the hard forward),
kept one day at a time: each agent's stage (S E I R M, one byte), its isolation level and
the day's infection pressure (float32 each). Events and their flip weights:

- β: a susceptible that was not infected, w = hazard/β (q = 1 − exp(−hazard), flip up);
- latent_days L: an onset E → I that happened, w = 1/L (p = Δt/L decreases in L: flip down);
- infectious_days D: an exit from I that happened, w = 1/D (flip down; a suppressed exit
  also suppresses that day's death draw);
- isolation efficacy e (a behaviour parameter: how much a positive cuts its contacts): it
  moves every isolation level continuously (∂iso/∂e along the path) and so every hazard,
  always down; an infection that happened flips down with w = (1 − q)|∂hazard/∂e| / q.

An alternative path is simulated by difference: the set D of agents whose stage or isolation
differs from the primal path, and their neighbours, are re-evaluated each day. An agent whose
inputs (own state, isolation, pressure) equal the primal ones takes the primal outcome, so a
path diverges only through the flipped event. Plain SEIRM substeps only (testing, isolation,
vaccination, infection, progression); other parameters (susceptibility, IFR, test rate) get no
gradient from this estimator.
"""

# ruff: noqa: E741  (S, I are the epidemiological names)
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numba
import numpy as np
import torch

from simulation.population import CSRLayer
from simulation.rng import _uniform, day_key
from simulation.stochastic_triples import (
    DEFAULT_FLIPS,
    StochasticTripleError,
    _allocate,
    _candidates,
    _next_diff,
)

__all__ = ["SEIRM_PARAMS", "SeirmPath", "seirm_path", "seirm_triples_jacobian", "simulate_seirm_triples",
           "supports_seirm_triples", "undifferentiated"]

SEIRM_PARAMS = ("beta", "latent_days", "infectious_days", "efficacy")
_BETA, _LATENT, _INFECTIOUS, _EFFICACY = 0, 1, 2, 3
STAGES = ("S", "E", "I", "R", "M")
_S, _E, _I, _R, _M = 0, 1, 2, 3, 4
#: daily series the Jacobian covers: the five compartments, new infections, new deaths
SERIES = (*STAGES, "new_infections")


_DIFFERENTIATED = {"substeps.infection.beta", "substeps.progression.latent_days",
                   "substeps.progression.infectious_days", "substeps.isolation.efficacy"}


def supports_seirm_triples(model) -> bool:
    """True for the plain SEIRM model (its five substeps, nothing added)."""
    from simulation.models.seirm import SEIRM

    return type(model) is SEIRM and list(model.substeps) == [
        "testing", "isolation", "vaccination", "infection", "progression"] and not model.extra_streams


def undifferentiated(model) -> list[str]:
    """Parameters that require a gradient this estimator does not give."""
    return sorted(k for k, p in model.named_parameters() if p.requires_grad and k not in _DIFFERENTIATED)


@dataclass
class SeirmPath:
    """One primal SEIRM run kept for alternative paths (by day: start-of-day stage and
    isolation [days + 1, n]; the day's pressure and vaccination [days, n])."""

    indptr: np.ndarray
    indices: np.ndarray
    weights: np.ndarray  # float32 per edge (1 for unit graphs)
    deg: np.ndarray  # float32 n_i clamped at 1
    sus: np.ndarray  # float32 susceptibility per agent
    ifr: np.ndarray  # float32 fatality per agent
    consts: np.ndarray  # float32: β, p_test, keep, efficacy, vaccine efficacy, p_latent, p_exit, Δt
    keys: np.ndarray  # uint64 day keys
    stage: np.ndarray  # [days + 1, n] uint8
    iso: np.ndarray  # [days + 1, n] float32 (isolation after the previous day's update)
    pressure: np.ndarray  # [days, n] float32
    vac: np.ndarray  # [days, n] float32
    weights_by_day: np.ndarray  # [4, days] Σ w per parameter
    efficacy_w: np.ndarray  # [days, n] float32 flip weights for the isolation efficacy
    values: tuple[float, float, float]  # β, latent_days, infectious_days
    seconds: float
    final_state: dict[str, torch.Tensor]

    @property
    def days(self) -> int:
        return self.keys.size

    def series(self) -> np.ndarray:
        """[days + 1, 6]: S, E, I, R, M totals and new infections (entry 0: I at the start)."""
        counts = np.stack([(self.stage == s).sum(1) for s in range(5)], 1).astype(np.float64)
        new = np.concatenate([[counts[0, _I]], counts[:-1, _S] - counts[1:, _S]])
        return np.concatenate([counts, new[:, None]], 1)

    def day_weights(self, param: int, d: int) -> np.ndarray:
        """Per-agent flip weights of day d for one parameter (0 where nothing can flip)."""
        s0, s1 = self.stage[d], self.stage[d + 1]
        beta, latent, infectious = self.values
        if param == _BETA:
            protect = (1 - self.iso[d + 1].astype(np.float64)) * (1 - float(self.consts[4]) * self.vac[d])
            k = self.sus * protect * float(self.consts[7]) * self.pressure[d] / self.deg
            return np.where((s0 == _S) & (s1 == _S), k, 0.0)
        if param == _EFFICACY:
            return self.efficacy_w[d].astype(np.float64)
        if param == _LATENT:
            return np.where((s0 == _E) & (s1 == _I), 1.0 / latent if self.consts[5] < 1 else 0.0, 0.0)
        return np.where((s0 == _I) & (s1 >= _R), 1.0 / infectious if self.consts[6] < 1 else 0.0, 0.0)

    def sample(self, param: int, flips: int, rng: np.random.Generator):
        """(days, agents, scale) of ``flips`` events drawn ∝ w, stratified by day."""
        alloc = _allocate(self.weights_by_day[param], flips)
        days, agents, scale = [], [], []
        for d in np.flatnonzero(alloc):
            w = self.day_weights(param, int(d))
            agents.append(rng.choice(w.size, size=int(alloc[d]), p=w / w.sum()))
            days.append(np.full(alloc[d], d, np.int64))
            scale.append(np.full(alloc[d], self.weights_by_day[param, d] / alloc[d]))
        if not days:
            return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
        return np.concatenate(days), np.concatenate(agents).astype(np.int64), np.concatenate(scale)

    def coupled_effects(self, days: np.ndarray, agents: np.ndarray, param: int) -> np.ndarray:
        """[events, days + 1, 6]: differences of the series of the coupled path in which each
        event flips (every uniform kept)."""
        out = np.zeros((len(days), self.days + 1, 6))
        if len(days):
            _alternatives(self.indptr, self.indices, self.weights, self.deg, self.sus, self.ifr, self.consts,
                          self.keys, self.stage, self.iso, self.pressure, self.vac, np.asarray(days, np.int64),
                          np.asarray(agents, np.int64), param, max(1, min(numba.get_num_threads(), len(days))), out)
        return out


@numba.njit(cache=True)
def _alternative(indptr, indices, wts, deg, sus, ifr, consts, keys, stage, iso, pressure, vac, day0, agent0,
                 kind, tag, alt_stage, alt_iso, alt_inf, in_diff, stamp, cand, nxt, n_stage, n_iso,
                 out):  # pragma: no cover - compiled
    """One coupled alternative path by difference; writes out[day + 1] = Δ(S, E, I, R, M, new)."""
    n = deg.size
    days = keys.size
    beta, p_test, keep, eff, ve, p_lat, p_exit, dt = (consts[0], consts[1], consts[2], consts[3], consts[4],
                                                        consts[5], consts[6], consts[7])
    one = np.float32(1.0)
    nd = 0
    for day in range(day0, days):
        key = keys[day]
        # today's infectiousness of the difference set (its own stage, test and isolation)
        for k in range(nd):
            a = nxt[k]
            st = alt_stage[a]
            tp = np.float32(1.0) if st == _I and _uniform(key, 4 * n + a + 1) < p_test else np.float32(0.0)
            iso_new = max(alt_iso[a] * keep, tp * eff)
            alt_iso[a] = iso_new  # from here on: today's isolation (used by its neighbours' pressure)
            alt_inf[a] = (one - iso_new) if st == _I else np.float32(0.0)
        nc = _candidates(indptr, indices, nxt, nd, agent0 if day == day0 else -1, stamp, tag + day, cand)
        if nc == 0:
            break
        nn = 0
        dnew = 0.0
        for k in range(nc):
            m = cand[k]
            sP = stage[day, m]
            mine = in_diff[m] == 1
            if mine:
                s = alt_stage[m]
                iso_today = alt_iso[m]
            else:
                s = sP
                iso_today = iso[day + 1, m]
            forced = day == day0 and m == agent0
            nxt_stage = s
            if s == _S:
                delta = 0.0
                for e in range(indptr[m], indptr[m + 1]):
                    b = indices[e]
                    if in_diff[b] == 1:
                        prim_inf = (one - iso[day + 1, b]) if stage[day, b] == _I else np.float32(0.0)
                        delta += wts[e] * (alt_inf[b] - prim_inf)
                if not mine and delta == 0.0:
                    infected = stage[day + 1, m] == _E
                else:
                    protect = (one - iso_today) * (one - ve * vac[day, m])
                    hz = beta * sus[m] * protect * dt * np.float32(pressure[day, m] + delta) / deg[m]
                    infected = _uniform(key, m + 1) < -math.expm1(-hz)
                if kind == _BETA and forced:
                    infected = True
                if kind == _EFFICACY and forced:
                    infected = False
                if infected:
                    nxt_stage = _E
                    dnew += 1.0
                if sP == _S and stage[day + 1, m] == _E:
                    dnew -= 1.0
            elif s == _E:
                onset = _uniform(key, n + m + 1) < p_lat
                if kind == _LATENT and forced:
                    onset = False
                if onset:
                    nxt_stage = _I
            elif s == _I:
                leave = _uniform(key, 2 * n + m + 1) < p_exit
                if kind == _INFECTIOUS and forced:
                    leave = False
                if leave:
                    nxt_stage = _M if _uniform(key, 3 * n + m + 1) < ifr[m] else _R
            if s != _S and sP == _S and stage[day + 1, m] == _E:
                dnew -= 1.0  # infected in the primal path, not susceptible in this one
            if nxt_stage != stage[day + 1, m] or iso_today != iso[day + 1, m]:
                n_stage[nn] = nxt_stage
                n_iso[nn] = iso_today
                cand[k] = -1 - m
                nn += 1
        nd = _next_diff(cand, nc, nxt, nd, in_diff)  # D moves on only after every candidate read it
        for k in range(nd):
            m = nxt[k]
            alt_stage[m] = n_stage[k]
            alt_iso[m] = n_iso[k]
            out[day + 1, n_stage[k]] += 1.0
            out[day + 1, stage[day + 1, m]] -= 1.0
        out[day + 1, 5] = dnew
    for k in range(nd):
        in_diff[nxt[k]] = 0


@numba.njit(parallel=True, cache=True)
def _alternatives(indptr, indices, wts, deg, sus, ifr, consts, keys, stage, iso, pressure, vac, fday, fagent, kind,
                  chunks, out):  # pragma: no cover - compiled
    n = deg.size
    span = keys.size + 1
    for c in numba.prange(chunks):
        alt_stage = np.zeros(n, np.uint8)
        alt_iso = np.zeros(n, np.float32)
        alt_inf = np.zeros(n, np.float32)
        in_diff = np.zeros(n, np.uint8)
        stamp = np.full(n, -1, np.int64)
        cand = np.empty(n, np.int64)
        nxt = np.empty(n, np.int64)
        n_stage = np.empty(n, np.uint8)
        n_iso = np.empty(n, np.float32)
        for k in range(c, fday.size, chunks):
            _alternative(indptr, indices, wts, deg, sus, ifr, consts, keys, stage, iso, pressure, vac, fday[k],
                         fagent[k], kind, k * span, alt_stage, alt_iso, alt_inf, in_diff, stamp, cand, nxt,
                         n_stage, n_iso, out[k])


def _stage_of(state) -> np.ndarray:
    code = np.zeros(state["S"].numel(), np.uint8)
    for s, name in enumerate(STAGES):
        code[state[name].numpy() == 1] = s
    return code


def _efficacy_weights(state, s0: np.ndarray, s1: np.ndarray, i_start: torch.Tensor, diso: torch.Tensor,
                      pressure: np.ndarray, base: torch.Tensor, neighbour_sum) -> np.ndarray:
    """One primal day's flip weights for the isolation efficacy e: the hazard base · (1 − iso) ·
    pressure falls with e through the agent's own isolation and its infectious contacts'
    (∂iso/∂e = ``diso``); an infection that happened (s0 = S, s1 = E) flips down with
    w = (1 − q)|∂hazard/∂e| / q."""
    dpress = -neighbour_sum(i_start * diso)  # ∂ pressure / ∂ efficacy
    iso_now = state["isolated"]
    press = torch.from_numpy(pressure)
    hz = base * (1 - iso_now) * press
    dhz = base * (-diso * press + (1 - iso_now) * dpress)
    q = -torch.expm1(-hz.double())
    infected = torch.from_numpy((s0 == _S) & (s1 == _E))
    return torch.where(infected & (q > 0), (1 - q) * dhz.double().abs() / q.clamp(min=1e-300), 0.0).float().numpy()


def seirm_path(model, layer: CSRLayer, attributes, days: int, seed: int, neighbour_sum, degree: torch.Tensor,
               dt: float = 1.0, progress=None, efficacy: bool = True) -> SeirmPath:
    """Run the engine's SEIRM days (hard forward, no gradient) and keep the path; with
    ``efficacy`` also the isolation efficacy's flip weights (one more neighbour sum a day)."""
    from simulation.engine import step_day, step_uniforms
    from simulation.estimators import smoothed

    if not supports_seirm_triples(model):
        raise StochasticTripleError("the SEIRM triples estimator runs the plain SEIRM model (no added substeps)")
    subs = model.substeps
    n = layer.n
    age = attributes["age_band"].long()
    t0 = time.perf_counter()
    with torch.no_grad():
        state = model.initial_state(n, torch.Generator().manual_seed(int(seed)), torch.device("cpu"))
        if float(state["behaviour"].abs().sum()) or float(state["vaccinated"].abs().sum()):
            raise StochasticTripleError("the SEIRM triples estimator starts from the model's own initial state")
        stage = np.zeros((days + 1, n), np.uint8)
        iso = np.zeros((days + 1, n), np.float32)
        pressure = np.zeros((days, n), np.float32)
        vac = np.zeros((days, n), np.float32)
        stage[0], iso[0] = _stage_of(state), state["isolated"].numpy()
        tr, pg, testing, isolation = subs["infection"], subs["progression"], subs["testing"], subs["isolation"]
        keep = torch.exp(torch.tensor(-dt / isolation.mean_duration))
        eff = isolation.efficacy.detach()
        # hazard per unit of pressure and of the contact protection (β · susceptibility · Δt / n_i)
        base = tr.beta.detach() * torch.exp(tr.log_susceptibility.detach())[age] * dt / degree.clamp(min=1)
        diso = torch.zeros(n)  # ∂ isolation / ∂ efficacy along the path
        efficacy_w = np.zeros((days, n), np.float32)
        for day in range(days):
            iso_before = state["isolated"].clone()
            state = step_day(model, state, day, step_uniforms(seed, day, n, "cpu", model.n_uniform_streams()),
                             neighbour_sum=neighbour_sum, degree=degree, attributes=attributes, estimator=smoothed,
                             dt=dt)
            stage[day + 1], iso[day + 1] = _stage_of(state), state["isolated"].numpy()
            # the transmission substep saw today's isolation and today's vaccinations
            i_start = torch.from_numpy((stage[day] == _I).astype(np.float32))
            pressure[day] = neighbour_sum(i_start * (1 - state["isolated"])).numpy()
            vac[day] = state["vaccinated"].numpy()
            if efficacy:
                diso = torch.where(state["tested_positive"] * eff >= iso_before * keep, state["tested_positive"],
                                   keep * diso)
                efficacy_w[day] = _efficacy_weights(state, stage[day], stage[day + 1], i_start, diso, pressure[day],
                                                    base * (1 - tr.vaccine_efficacy * state["vaccinated"]),
                                                    neighbour_sum)
            if progress is not None:
                progress(day)
        consts = np.array([
            float(tr.beta), float(testing.daily_test_rate * testing.sensitivity),
            float(keep), float(isolation.efficacy),
            tr.vaccine_efficacy, float((dt / pg.latent_days).clamp(max=1.0)),
            float((dt / pg.infectious_days).clamp(max=1.0)), dt], np.float32)
        sus = torch.exp(tr.log_susceptibility)[age].numpy().astype(np.float32)
        ifr = torch.sigmoid(pg.logit_ifr)[age].numpy().astype(np.float32)
    wts = (layer.weights.numpy() if layer.weights is not None else np.ones(layer.nnz, np.float32))
    path = SeirmPath(layer.indptr.numpy(), layer.indices.numpy(), wts,
                     degree.clamp(min=1).numpy().astype(np.float32), sus, ifr, consts,
                     np.array([day_key(seed, d) for d in range(days)], np.uint64), stage, iso, pressure, vac,
                     np.zeros((4, days)), efficacy_w,
                     (float(tr.beta.detach()), float(pg.latent_days.detach()), float(pg.infectious_days.detach())),
                     0.0, state)
    for p in range(4):
        for d in range(days):
            path.weights_by_day[p, d] = path.day_weights(p, d).sum()
    path.seconds = time.perf_counter() - t0
    return path


def seirm_triples_jacobian(path: SeirmPath, flips: int, rng: np.random.Generator,
                           wrt: tuple[str, ...] = SEIRM_PARAMS) -> np.ndarray:
    """[days + 1, 6, 4]: unbiased Jacobian of the series (S, E, I, R, M, new infections)
    w.r.t. (β, latent_days, infectious_days, efficacy); columns not in ``wrt`` are zero."""
    if flips < 1:
        raise StochasticTripleError("flips must be >= 1")
    jac = np.zeros((path.days + 1, 6, 4))
    for name in wrt:
        p = SEIRM_PARAMS.index(name)
        days, agents, scale = path.sample(p, flips, rng)
        effects = path.coupled_effects(days, agents, p)
        jac[:, :, p] = np.einsum("k,kdc->dc", scale, effects)
    return jac


class _TriplesSEIRM(torch.autograd.Function):
    """Daily series [days + 1, 6] as a function of (β, latent_days, infectious_days, efficacy)."""

    @staticmethod
    def forward(ctx, beta, latent, infectious, efficacy, path, flips, rng):  # type: ignore[override]
        wrt = tuple(name for name, need in zip(SEIRM_PARAMS, ctx.needs_input_grad[:4], strict=True) if need)
        ctx.save_for_backward(torch.from_numpy(seirm_triples_jacobian(path, flips, rng, wrt)).float())
        return torch.from_numpy(path.series()).float()

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        (jac,) = ctx.saved_tensors
        g = (grad.unsqueeze(-1) * jac).sum((0, 1))
        return g[0], g[1], g[2], g[3], None, None, None


def simulate_seirm_triples(model, layer: CSRLayer, attributes, days: int, seed: int, neighbour_sum,
                           degree: torch.Tensor, flips: int = DEFAULT_FLIPS, progress=None):
    """The plain SEIRM model with unbiased flip gradients of its daily series w.r.t. β,
    latent_days, infectious_days and the isolation efficacy; returns (series dict, final state)."""
    missing = undifferentiated(model)
    if missing:
        raise StochasticTripleError(f"the triples estimator differentiates {sorted(_DIFFERENTIATED)} only; "
                                    f"freeze {missing} (requires_grad_(False)) or use 'smoothed'")
    path = seirm_path(model, layer, attributes, days, seed, neighbour_sum, degree, progress=progress,
                      efficacy=model.substeps["isolation"].efficacy.requires_grad)
    tr, pg = model.substeps["infection"], model.substeps["progression"]
    rng = np.random.default_rng([int(seed), 0x5E])  # which events are drawn: statistics, not a secret
    series = _TriplesSEIRM.apply(tr.beta, pg.latent_days, pg.infectious_days, model.substeps["isolation"].efficacy,
                                 path, flips, rng)
    named = dict(zip(SERIES, series.unbind(1), strict=True))
    return named, path.final_state

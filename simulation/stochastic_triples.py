"""Unbiased stochastic derivatives of the plain SIR run by sampled coupled alternative paths.

Arya, Schauer, Schäfer & Rackauckas (NeurIPS 2022, "stochastic triples") write the derivative
of E[f] for a program with Bernoulli events x = 1[u < q(θ)] as

    dE[f]/dθ = E[ Σ_e w_e (f(Y_e) − f(X)) ],   w_e = (∂q_e/∂θ) / (1 − q_e)  for x_e = 0,

where X is the primal path and Y_e the *coupled* alternative path in which event e happens
and every uniform is kept. For the SIR day of ``simulation.fused_sir`` the weights are plain:
an uninfected susceptible with c infected neighbours has w = Δt·c/deg for β, and an infected
agent that did not recover has w = Δt for γ (r = 1 − exp(−γΔt)).

StochasticAD prunes to one alternative path per run; its variance is far too large at city
scale (Σ w ≈ 80,000 for β at 50k agents). Here one primal run is kept (daily snapshots of
S and I, one byte each per agent-day) and ``flips`` events are drawn from it, stratified by
day (each day with weight gets ≥ 1 flip, the rest in proportion to its weight); every drawn
alternative path is simulated *exactly*, by difference: only agents whose state differs
from the primal path, and their neighbours, are re-evaluated, so a flip costs
O(|difference| × degree) per day instead of a whole run. The estimate
Σ_d W_d · mean_d(Δ total) is unbiased for d E[total infections]/dθ for any number of flips;
more flips lower its variance only. Unit-weight contact graphs (the fused SIR case) only.
"""

# ruff: noqa: E741  (S, I are the epidemiological names)
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numba
import numpy as np
import torch
import torch.autograd.forward_ad as fwAD

from simulation.fused_sir import _push, count_dtype, named_series, simulate_sir_fused
from simulation.numba_threads import follow_torch_threads
from simulation.population import CSRLayer
from simulation.rng import _uniform, day_key

__all__ = ["DEFAULT_FLIPS", "FlipGradient", "PrimalPath", "StochasticTripleError", "primal_path", "run_sir_triples",
           "simulate_sir_triples", "triples_serves"]

_BETA, _GAMMA = 0, 1
PARAMS = ("beta", "gamma")
#: alternative paths per parameter and run: ~6 % relative sd of d total/dθ at any population size
DEFAULT_FLIPS = 2000


class StochasticTripleError(ValueError):
    """Settings the flip estimator cannot serve (weighted graph, no flips, bad horizon)."""


@dataclass(frozen=True)
class FlipGradient:
    """One run's unbiased estimate of d total/dθ and what it cost."""

    value: float  # Σ_d W_d · mean_d(Δ total)
    weight: float  # W = Σ_e w_e over the primal path
    flips: int  # alternative paths simulated
    effect_sd: float  # sd of Δ total over the drawn flips
    seconds: float  # flips only (the primal run is ``primal_seconds``)
    primal_seconds: float


@numba.njit(inline="always")
def _infect_prob(beta, dt, c, deg):  # pragma: no cover - compiled
    return 1.0 - math.exp(-beta * dt * c / deg)


@numba.njit(parallel=True, cache=True)
def _primal_day(S, I, cnt, deg, beta, r, dt, key, chg):  # pragma: no cover - compiled
    """One fused SIR day (same uniforms and formulas as ``fused_sir._day_counts``); returns
    the day's flip weights for β and γ (Σ w over events that did not happen)."""
    n = S.size
    wb = 0.0
    wg = 0.0
    for m in numba.prange(n):
        s = S[m]
        i = I[m]
        d = 0
        if s != 0 or i != 0:
            x = 0
            if s == 1:
                c = cnt[m]
                if c > 0:
                    if _uniform(key, m + 1) < _infect_prob(beta, dt, c, deg[m]):
                        x = 1
                    else:
                        wb += dt * c / deg[m]
            y = 0
            if i != 0:
                if _uniform(key, n + m + 1) < r:
                    y = 1
                else:
                    wg += dt
            i2 = i + x - i * y
            S[m] = s - x
            I[m] = i2
            d = i2 - i
        chg[m] = d
    return wb, wg


def _primal(indptr, indices, S, I, cnt, deg, beta, r, dt, keys, Ssnap, Isnap, Csnap, wb, wg, progress=None) -> None:
    """Every day of the primal run, keeping S, I and the infected-neighbour counts at the
    start of each day (one byte each, two for counts above 127) and the days' total flip
    weights for β and γ."""
    chg = np.zeros(S.size, np.int8)
    for day, key in enumerate(keys):
        Ssnap[day] = S
        Isnap[day] = I
        Csnap[day] = cnt
        wb[day], wg[day] = _primal_day(S, I, cnt, deg, beta, r, dt, key, chg)
        _push(indptr, indices, chg, cnt)
        if progress is not None:
            progress(day)
    Ssnap[len(keys)] = S
    Isnap[len(keys)] = I


@numba.njit(cache=True)
def _candidates(indptr, indices, nxt, nd, first, stamp, mark, cand):  # pragma: no cover - compiled
    """Fill ``cand`` with the agents to re-evaluate on a day of an alternative path: ``first``
    (the flipped agent, if ≥ 0), the difference set D = nxt[:nd] and D's neighbours, each
    once (``stamp`` == ``mark`` marks the taken ones). Returns how many."""
    nc = 0
    if first >= 0:
        cand[0] = first
        stamp[first] = mark
        nc = 1
    for k in range(nd):
        a = nxt[k]
        if stamp[a] != mark:
            stamp[a] = mark
            cand[nc] = a
            nc += 1
        for e in range(indptr[a], indptr[a + 1]):
            b = indices[e]
            if stamp[b] != mark:
                stamp[b] = mark
                cand[nc] = b
                nc += 1
    return nc


@numba.njit(cache=True)
def _next_diff(cand, nc, nxt, nd, in_diff):  # pragma: no cover - compiled
    """Move D to the next day: the candidates marked −1 − m (their state differs from the
    primal path after today) become nxt[:returned], in the order they were marked, and
    ``in_diff`` follows. Called only after every candidate has read today's D."""
    for k in range(nd):
        in_diff[nxt[k]] = 0
    nd = 0
    for k in range(nc):
        if cand[k] < 0:
            m = -1 - cand[k]
            nxt[nd] = m
            in_diff[m] = 1
            nd += 1
    return nd


@numba.njit(cache=True)
def _alternative(indptr, indices, deg, beta, r, dt, keys, Ssnap, Isnap, day0, agent0, kind,
                 tag, altS, altI, in_diff, stamp, cand, nxt, nS, nI, out):  # pragma: no cover
    """The coupled path in which event (day0, agent0, kind) happens, by difference: writes
    out[day + 1] = (ΔS, ΔI, Δ new infections) against the primal path.

    Scratch arrays have length n; ``stamp`` values below ``tag`` are free and ``in_diff`` is
    0 on entry and on return. Each day only the difference set D (agents whose state differs
    from the primal path) and its neighbours are evaluated."""
    n = deg.size
    days = keys.size
    nd = 0  # D = nxt[:nd] from the previous day
    for day in range(day0, days):
        key = keys[day]
        nc = _candidates(indptr, indices, nxt, nd, agent0 if day == day0 else -1, stamp, tag + day, cand)
        if nc == 0:
            break
        nn = 0
        dnew = 0.0
        for k in range(nc):
            m = cand[k]
            sP = Ssnap[day, m]
            iP = Isnap[day, m]
            if in_diff[m]:
                s = altS[m]
                i = altI[m]
            else:
                s = sP
                i = iP
            x = 0
            if s == 1:
                c = 0
                for e in range(indptr[m], indptr[m + 1]):
                    b = indices[e]
                    c += altI[b] if in_diff[b] else Isnap[day, b]
                if c > 0:
                    if _uniform(key, m + 1) < _infect_prob(beta, dt, c, deg[m]):
                        x = 1
                if kind == _BETA and day == day0 and m == agent0:
                    x = 1
            y = 0
            if i != 0:
                if _uniform(key, n + m + 1) < r:
                    y = 1
                if kind == _GAMMA and day == day0 and m == agent0:
                    y = 1
            s2 = s - x
            i2 = i + x - i * y
            dnew += x - (sP - Ssnap[day + 1, m])
            if s2 != Ssnap[day + 1, m] or i2 != Isnap[day + 1, m]:
                nS[nn] = s2
                nI[nn] = i2
                cand[k] = -1 - m  # keep m for the next day's D (cand is rebuilt from nxt)
                nn += 1
        nd = _next_diff(cand, nc, nxt, nd, in_diff)  # D moves on only after every candidate read it
        dS = 0.0
        dI = 0.0
        for k in range(nd):
            m = nxt[k]
            altS[m] = nS[k]
            altI[m] = nI[k]
            dS += nS[k] - np.float64(Ssnap[day + 1, m])
            dI += nI[k] - np.float64(Isnap[day + 1, m])
        out[day + 1, 0] = dS
        out[day + 1, 1] = dI
        out[day + 1, 2] = dnew
    for k in range(nd):
        in_diff[nxt[k]] = 0


@numba.njit(parallel=True, cache=True)
def _alternatives(indptr, indices, deg, beta, r, dt, keys, Ssnap, Isnap, fday, fagent, kind, chunks,
                  out):  # pragma: no cover - compiled
    """Every drawn flip's alternative path; ``chunks`` scratch sets of length n (one per
    thread), not one per flip, so a flip costs what its difference set costs."""
    n = deg.size
    flips = fday.size
    span = keys.size + 1
    for c in numba.prange(chunks):
        altS = np.zeros(n, np.uint8)
        altI = np.zeros(n, np.uint8)
        in_diff = np.zeros(n, np.uint8)
        stamp = np.full(n, -1, np.int64)
        cand = np.empty(n, np.int64)
        nxt = np.empty(n, np.int64)
        nS = np.empty(n, np.uint8)
        nI = np.empty(n, np.uint8)
        for k in range(c, flips, chunks):
            _alternative(indptr, indices, deg, beta, r, dt, keys, Ssnap, Isnap, fday[k], fagent[k],
                         kind, k * span, altS, altI, in_diff, stamp, cand, nxt, nS, nI, out[k])


@numba.njit(inline="always")
def _flip_weight(s, i, s1, i1, c, deg, dt, kind):  # pragma: no cover - compiled
    """w of an agent's event on a primal day from its state that day (s, i) and the next
    (s1, i1): an uninfected susceptible with c > 0 for β, an unrecovered infected for γ."""
    if kind == _BETA:
        if s == 1 and s1 == 1 and c > 0:
            return dt * c / deg
    elif i == 1 and i1 == 1:
        return dt
    return 0.0


@numba.njit(cache=True)
def _sample_day(deg, dt, S, I, S1, I1, C, kind, u0, agents):  # pragma: no cover - compiled
    """Systematic sample of len(agents) events of one primal day with probability ∝ w:
    positions (j + u0)/k of the day's cumulative weight (each one uniform on its own)."""
    n = deg.size
    k = agents.size
    w = np.empty(n)
    total = 0.0
    for m in range(n):
        w[m] = _flip_weight(S[m], I[m], S1[m], I1[m], C[m], deg[m], dt, kind)
        total += w[m]
    acc = 0.0
    j = 0
    last = -1
    for m in range(n):
        if w[m] == 0.0:
            continue
        last = m
        acc += w[m]
        while j < k and (j + u0) / k * total < acc:
            agents[j] = m
            j += 1
    while j < k:  # rounding at the top end
        agents[j] = last
        j += 1


def _allocate(weights: np.ndarray, flips: int) -> np.ndarray:
    """Flips per day: ≥ 1 on every day with weight, the rest in proportion (largest remainder)."""
    live = weights > 0
    alloc = live.astype(np.int64)
    spare = flips - int(alloc.sum())
    if spare > 0 and live.any():
        share = spare * weights / weights.sum()
        alloc += np.floor(share).astype(np.int64)
        rest = spare - int(np.floor(share).sum())
        alloc[np.argsort(-(share - np.floor(share)), kind="stable")[:rest]] += 1
    return alloc


@dataclass
class PrimalPath:
    """One primal SIR run kept for alternative paths: S, I (and infected-neighbour counts) at
    the start of every day, one byte per agent-day each, and the days' flip weights."""

    indptr: np.ndarray
    indices: np.ndarray
    deg: np.ndarray
    beta: float
    recover: float  # r = 1 − exp(−γ Δt)
    dt: float
    keys: np.ndarray  # uint64 day keys of the run's counter-based uniforms
    S: np.ndarray  # [days + 1, n] uint8
    I: np.ndarray  # [days + 1, n] uint8
    C: np.ndarray  # [days, n] infected-neighbour counts
    weights: np.ndarray  # [2, days] Σ w of the events that did not happen (β, γ)
    seconds: float

    @property
    def days(self) -> int:
        return self.keys.size

    def series(self) -> np.ndarray:
        """[days + 1, 4] S, I, R, new infections (entry 0 of new = I at the start)."""
        s_tot = self.S.sum(1, dtype=np.float64)
        i_tot = self.I.sum(1, dtype=np.float64)
        new = np.concatenate([[i_tot[0]], s_tot[:-1] - s_tot[1:]])
        return np.stack([s_tot, i_tot, self.S.shape[1] - s_tot - i_tot, new], 1)

    def coupled_effects(self, days: np.ndarray, agents: np.ndarray, param: str) -> np.ndarray:
        """[events, days + 1, 3]: (ΔS, ΔI, Δ new infections) per day of the exact coupled
        path in which each event happens (``beta``: the agent is infected on that day;
        ``gamma``: it recovers), every uniform kept."""
        kind = PARAMS.index(param)
        days = np.asarray(days, np.int64)
        agents = np.asarray(agents, np.int64)
        out = np.zeros((days.size, self.days + 1, 3))
        if days.size:
            _alternatives(self.indptr, self.indices, self.deg, self.beta, self.recover, self.dt, self.keys,
                          self.S, self.I, days, agents, kind, max(1, min(numba.get_num_threads(), days.size)),
                          out)
        return out

    def sample(self, param: str, flips: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(days, agents, scale) of ``flips`` events drawn ∝ w, stratified by day; Σ scale ·
        effect is the unbiased estimate."""
        kind = PARAMS.index(param)
        day_w = self.weights[kind]
        alloc = _allocate(day_w, flips)
        agents = np.zeros(int(alloc.sum()), np.int64)
        days = np.repeat(np.arange(self.days), alloc)
        scale = np.repeat(np.divide(day_w, alloc, out=np.zeros_like(day_w), where=alloc > 0), alloc)
        start = 0
        for d in np.flatnonzero(alloc):
            _sample_day(self.deg, self.dt, self.S[d], self.I[d], self.S[d + 1], self.I[d + 1], self.C[d], kind,
                        rng.random(), agents[start:start + alloc[d]])
            start += alloc[d]
        return days, agents, scale


def primal_path(layer: CSRLayer, S0: torch.Tensor, I0: torch.Tensor, beta: float, gamma: float, days: int,
                seed: int, dt: float = 1.0, progress=None) -> PrimalPath:
    """Run the fused SIR model's events (same uniforms and formulas) and keep the path."""
    if layer.weights is not None:
        raise StochasticTripleError("the triples estimator runs unit-weight contact graphs only")
    if days < 0:
        raise StochasticTripleError("days must be >= 0")
    n = layer.n
    indptr, indices = layer.indptr.numpy(), layer.indices.numpy()
    deg = np.maximum(layer.degree().numpy().astype(np.float64), 1.0)
    S = (S0.detach().numpy() == 1).astype(np.uint8)
    I = (I0.detach().numpy() == 1).astype(np.uint8)
    cnt: np.ndarray = np.zeros(n, count_dtype(layer))
    _push(indptr, indices, I.astype(np.int8), cnt)
    keys = np.array([day_key(seed, d) for d in range(days)], np.uint64)
    r = -math.expm1(-gamma * dt)
    Ssnap = np.zeros((days + 1, n), np.uint8)
    Isnap = np.zeros((days + 1, n), np.uint8)
    Csnap = np.zeros((days, n), cnt.dtype)
    weights = np.zeros((2, days))
    t0 = time.perf_counter()
    _primal(indptr, indices, S, I, cnt, deg, beta, r, dt, keys, Ssnap, Isnap, Csnap, weights[0], weights[1],
            progress)
    return PrimalPath(indptr, indices, deg, beta, r, dt, keys, Ssnap, Isnap, Csnap, weights,
                      time.perf_counter() - t0)


def run_sir_triples(
    layer: CSRLayer, S0: torch.Tensor, I0: torch.Tensor, beta: float, gamma: float, days: int,
    seed: int, flips: int = DEFAULT_FLIPS, wrt: tuple[str, ...] = PARAMS, dt: float = 1.0,
    sample_seed: int | None = None, progress=None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, FlipGradient]]:
    """Primal SIR run (the fused engine's events) and unbiased derivatives of its daily series
    for the names in ``wrt`` from ``flips`` exact alternative paths per parameter.

    Returns (series [days+1, 4] of S, I, R, new infections; jacobian [days+1, 4, 2]; final S;
    final I; last day's new infections; per-parameter statistics of d total/dθ), shaped like
    ``fused_sir.run_sir_nonbacktracking``. ``sample_seed`` seeds which events are drawn (a
    statistical choice, not a secret; default: ``seed``)."""
    if flips < 1:
        raise StochasticTripleError("flips must be >= 1")
    unknown = set(wrt) - set(PARAMS)
    if unknown:
        raise StochasticTripleError(f"unknown parameters {sorted(unknown)}; choose from {PARAMS}")
    threads = follow_torch_threads()
    path = primal_path(layer, S0, I0, beta, gamma, days, seed, dt, progress)
    jac = np.zeros((days + 1, 4, 2))
    stats: dict[str, FlipGradient] = {}
    rng = np.random.default_rng([int(seed if sample_seed is None else sample_seed), 0x57])
    for name in wrt:
        kind = PARAMS.index(name)
        t0 = time.perf_counter()
        fday, fagent, scale = path.sample(name, flips, rng)
        effects = path.coupled_effects(fday, fagent, name)
        dS, dI, dnew = np.einsum("k,kdc->cd", scale, effects)
        jac[:, :, kind] = np.stack([dS, dI, -dS - dI, dnew], 1)
        total = effects[:, :, 2].sum(1)
        stats[name] = FlipGradient(float(dnew.sum()), float(path.weights[kind].sum()), int(total.size),
                                   float(total.std(ddof=1)) if total.size > 1 else 0.0,
                                   time.perf_counter() - t0, path.seconds)
    torch.set_num_threads(threads)
    last_new = (path.S[-2] - path.S[-1]) if days else path.I[0]
    return path.series(), jac, path.S[-1].copy(), path.I[-1].copy(), last_new.astype(np.float32), stats


def triples_serves(model, layer: CSRLayer) -> bool:
    """True where "auto" runs this estimator: a unit-weight graph and no forward-mode tangent
    on β or γ (the flips give a reverse-mode Jacobian)."""
    return layer.weights is None and all(fwAD.unpack_dual(p).tangent is None for p in (model.beta, model.gamma))


class _TriplesSIR(torch.autograd.Function):
    """Daily series [days + 1, 4] (S, I, R, new) as a function of (β, γ); backward is Jᵀ g
    with J the flip estimate of the series' Jacobian."""

    @staticmethod
    def forward(ctx, beta, gamma, layer, s0, i0, days, seed, flips, progress, out):  # type: ignore[override]
        wrt = tuple(name for name, need in zip(PARAMS, ctx.needs_input_grad[:2], strict=True) if need)
        series, jac, s, i, new, _ = run_sir_triples(layer, s0, i0, float(beta), float(gamma), days, seed,
                                                    flips=flips, wrt=wrt, progress=progress)
        ctx.save_for_backward(torch.from_numpy(jac).float())
        out.update(S=torch.from_numpy(s.astype(np.float32)), I=torch.from_numpy(i.astype(np.float32)),
                   new=torch.from_numpy(new))
        return torch.from_numpy(series).float()

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        (jac,) = ctx.saved_tensors
        g = (grad.unsqueeze(-1) * jac).sum((0, 1))
        return g[0], g[1], None, None, None, None, None, None, None, None


def simulate_sir_triples(model, layer: CSRLayer, days: int, seed: int, flips: int = DEFAULT_FLIPS,
                         progress=None):
    """The plain SIR model with unbiased flip gradients of its daily series w.r.t. β and γ
    (reverse mode); without a gradient to compute it is the fused forward run."""
    grad = torch.is_grad_enabled() and (model.beta.requires_grad or model.gamma.requires_grad)
    if not grad:
        return simulate_sir_fused(model, layer, days, seed, progress)
    if any(fwAD.unpack_dual(p).tangent is not None for p in (model.beta, model.gamma)):
        raise StochasticTripleError("the triples estimator is reverse mode (loss.backward()); "
                                    "forward-mode tangents need 'nonbacktracking'")
    state = model.initial_state(layer.n, torch.Generator().manual_seed(int(seed)), torch.device("cpu"))
    out: dict[str, torch.Tensor] = {}
    series = _TriplesSIR.apply(model.beta, model.gamma, layer, state["S"], state["I"], days, seed,
                               flips, progress, out)
    return named_series(series, out)

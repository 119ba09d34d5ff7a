"""Fused SIR run with a non-backtracking stochastic-derivative gradient (forward mode).

Why: the smoothed stochastic derivative (``simulation.estimators.smoothed``) propagates each
flipped event as a linear tangent. On a contact graph that linear cascade also walks back
along the edge it came from: an agent infected "in the alternative path" by neighbour m
re-infects m, which in the alternative is no longer susceptible. Those ping-pong walks grow
with every generation (measured: a flip on day 0–5 of a 20k-agent SIR run is predicted to
cause 66 extra infections where the exact coupled alternative path gives 11; see
docs/simulation.md). Here every agent's tangent is split by the neighbour that caused it
(one component per directed edge, as in non-backtracking / dynamic message passing), and
the message k → m leaves out what k received from m.

Forward mode: the primal day and the tangent days for the scalar parameters (β, γ) run in one
numba pass per day; nothing is taped, so memory does not grow with the horizon. An autograd
function exposes the daily series with their Jacobian, so ``loss.backward()`` works as usual.
"""

# ruff: noqa: E741  (S, I, R are the epidemiological names)
from __future__ import annotations

import math

import numba
import numpy as np
import torch
import torch.autograd.forward_ad as fwAD

from simulation.numba_threads import follow_torch_threads
from simulation.population import CSRLayer
from simulation.rng import _uniform, counter_uniforms, day_key

__all__ = ["count_dtype", "reverse_edges", "run_sir_nonbacktracking", "simulate_sir_fused", "supports_fused_sir"]


@numba.njit(cache=True)
def _reverse_edges(indptr, indices, rev):  # pragma: no cover - compiled
    """Transpose walk: visiting rows m in ascending order meets each row k's entries (k, m)
    in ascending order too (rows are sorted), so a cursor per row finds every reverse edge
    with one gather. Returns False if the graph is not symmetric."""
    n = indptr.size - 1
    cursor = indptr[:-1].copy()
    ok = True
    for m in range(n):
        for e in range(indptr[m], indptr[m + 1]):
            k = indices[e]
            p = cursor[k]
            if p < indptr[k + 1] and indices[p] == m:
                rev[e] = p
                cursor[k] = p + 1
            else:
                rev[e] = -1
                ok = False
    for k in range(n):
        if cursor[k] != indptr[k + 1]:
            ok = False
    return ok


def count_dtype(layer: CSRLayer) -> type:
    """Smallest signed integer type that holds any agent's neighbour count: the count
    update is a random read-modify-write per edge, and int8 counts (1 MB per million
    agents) stay in the L2 cache where int32 counts do not (measured 1.5x faster)."""
    top = int(layer.degree().max()) if layer.n else 0
    for t in (np.int8, np.int16):
        if top <= np.iinfo(t).max:
            return t
    return np.int32


def reverse_edges(layer: CSRLayer) -> np.ndarray:
    """rev[e] = position of the edge (k, m) for e = (m, k) (int32 when it fits); raises
    ValueError if the graph is not symmetric."""
    rev = np.empty(layer.nnz, dtype=np.int32 if layer.nnz < 2**31 else np.int64)
    if not _reverse_edges(layer.indptr.numpy(), layer.indices.numpy(), rev):
        raise ValueError("the contact graph is not symmetric")
    return rev


@numba.njit(parallel=True, fastmath=True, cache=True)
def _events(indptr, indices, weights, S, I, u0, u1, deg, beta, r, dt, h, x, y):  # pragma: no cover
    """Phase A (weighted graphs): primal neighbour sums (susceptibles only) and the day's
    event indicators."""
    n = indptr.size - 1
    for m in numba.prange(n):
        x[m] = 0.0
        y[m] = 0.0
        if S[m] == 0 and I[m] == 0:
            continue
        y[m] = 1.0 if u1[m] < r else 0.0
        if S[m] == 1:
            acc = 0.0
            for e in range(indptr[m], indptr[m + 1]):
                acc += weights[e] * I[indices[e]]
            h[m] = acc
            q = 1.0 - math.exp(-beta * dt * acc / deg[m])
            x[m] = 1.0 if u0[m] < q else 0.0


@numba.njit(parallel=True, cache=True)
def _count_infected(indptr, indices, I, cnt):  # pragma: no cover - compiled
    """cnt[m] = number of neighbours with I == 1 (unit weights: the neighbour sum)."""
    n = indptr.size - 1
    for m in numba.prange(n):
        c = 0
        for e in range(indptr[m], indptr[m + 1]):
            if I[indices[e]] == 1.0:
                c += 1
        cnt[m] = c


@numba.njit(cache=True)
def _push(indptr, indices, chg, cnt):  # pragma: no cover - compiled
    """Keep the infected-neighbour counts: an agent whose I flag changed today (chg = ±1)
    adds chg to each neighbour's count. Each agent changes at most twice in a run, so this
    costs O(edges) over the whole run instead of a neighbour sum per susceptible per day."""
    n = indptr.size - 1
    for m in range(n):
        d = chg[m]
        if d != 0:
            for e in range(indptr[m], indptr[m + 1]):
                cnt[indices[e]] += d


@numba.njit(parallel=True, fastmath=True, cache=True)
def _day_counts(S, I, cnt, deg, beta, r, dt, key, out_new, chg):  # pragma: no cover
    """Whole primal day for unit weights without tangents: events from the kept counts,
    uniforms drawn inline (the same counter values as ``counter_uniforms``) and only where
    they decide something, state update, and the day's totals."""
    n = S.size
    s_tot = 0.0
    i_tot = 0.0
    new_tot = 0.0
    for m in numba.prange(n):
        s = S[m]
        i = I[m]
        new = np.float32(0.0)
        d = 0
        if s != 0 or i != 0:
            x = np.float32(0.0)
            if s == 1:
                c = cnt[m]
                if c > 0:
                    q = 1.0 - math.exp(-beta * dt * c / deg[m])
                    if _uniform(key, m + 1) < q:
                        x = np.float32(1.0)
            y = np.float32(0.0)
            if i != 0 and _uniform(key, n + m + 1) < r:
                y = np.float32(1.0)
            new = s * x
            s2 = s - new
            i2 = i + new - i * y
            S[m] = s2
            I[m] = i2
            d = (1 if i2 == 1 else 0) - (1 if i == 1 else 0)
            s_tot += s2
            i_tot += i2
            new_tot += new
        out_new[m] = new
        chg[m] = d
    return s_tot, i_tot, new_tot


@numba.njit(parallel=True, fastmath=True, cache=True)
def _events_cnt(S, I, cnt, deg, beta, r, dt, key, h, x, y):  # pragma: no cover
    """Phase A for unit weights: events from the kept infected-neighbour counts, inline uniforms."""
    n = S.size
    for m in numba.prange(n):
        x[m] = 0.0
        y[m] = 0.0
        if S[m] == 0 and I[m] == 0:
            continue
        y[m] = 1.0 if _uniform(key, n + m + 1) < r else 0.0
        if S[m] == 1:
            c = cnt[m]
            h[m] = c
            if c > 0:
                q = 1.0 - math.exp(-beta * dt * c / deg[m])
                x[m] = 1.0 if _uniform(key, m + 1) < q else 0.0


@numba.njit(parallel=True, fastmath=True, cache=True)
def _advance(indptr, S, I, x_arr, y_arr, h, deg, beta, r, dr, dt, inj_beta, inj_gamma, msg, J, inbox,
             cS, cI, sumI, ag, oS, oI, out_new, chg, sus):  # pragma: no cover - compiled
    """Phase B: primal update, the non-backtracking inflow of every susceptible's incoming
    edges, and the tangent components of every agent; returns the day's totals (S, I, new)
    and the tangent totals (dS, dI, dnew) for parameters 0 and 1.

    Inflow into susceptible m along edge e = (m ← k): msg_e = w (dI_k − part of dI_k that
    came from m), written by k at the end of the previous day (``_send``); of that extra
    infectious mass, J_e has already infected m in the alternative path and cannot infect it
    again: inflow = (1 − x_m) β Δt / n_m · (msg_e − J_e), J_e += inflow (k's ``_send``
    zeroes J_e when k recovers or the primal path infects k: J follows k's mass).

    Per component (own, or per incoming edge): d new = cS·x + inflow, d rec = cI·y (+ the γ
    injection on the own component), cS −= d new, cI += d new − d rec. The own component of
    a susceptible not infected today gets (1 − x) Δt h / n for β (the smoothed right
    stochastic derivative); an infectious agent not recovering gets (1 − y)/(1 − r) ∂r/∂γ.

    An agent that is not susceptible has no inflow and cS = 0, so its edge components stay
    as they were (y = 0) or all vanish (y = 1): the row is not walked, its sum is kept in
    sumI (set on the day the agent leaves S) and zeroed at recovery. Recovered agents are
    skipped. A susceptible's row is walked only if it holds edge state or its inbox flag is
    set (some message or J of the row is non-zero); otherwise it would add zeros.

    ag[m] = (dI_m per parameter, flag); flag bit 1: dI_m ≠ 0, bit 2: some edge component of
    m is non-zero, bit 4: keep_m = 0 today (m recovers or is infected), bit 8: bit 1 or 2
    was set at the start of the day (``_send`` then still has to send)."""
    n = indptr.size - 1
    P = cS.shape[1]
    s_tot = 0.0
    i_tot = 0.0
    new_tot = 0.0
    dS0 = 0.0
    dS1 = 0.0
    dI0 = 0.0
    dI1 = 0.0
    dn0 = 0.0
    dn1 = 0.0
    for m in numba.prange(n):
        s = S[m]
        i = I[m]
        out_new[m] = 0.0
        chg[m] = 0
        if s == 0 and i == 0:
            continue
        x = x_arr[m]
        y = y_arr[m]
        fl = int(ag[m, 3]) if P else 0
        walk = s == 1 and ((fl & 2) != 0 or inbox[m] != 0)
        rate = (1.0 - x) * beta * dt / deg[m]
        any_edge = 0
        any_tot = 0
        any_j = 0
        for p in range(P):
            inj_new = 0.0
            inj_rec = 0.0
            if s == 1 and inj_beta[p] != 0.0:
                inj_new = inj_beta[p] * (1.0 - x) * dt * h[m] / deg[m]
            if i == 1 and inj_gamma[p] != 0.0:
                inj_rec = inj_gamma[p] * (1.0 - y) * dr / (1.0 - r)
            dnew = oS[m, p] * x + inj_new
            drec = oI[m, p] * y + inj_rec
            oS[m, p] -= dnew
            oI[m, p] += dnew - drec
            tot_new = dnew
            tot_S = oS[m, p]
            tot_I = oI[m, p]
            if walk:
                row_I = 0.0
                for e in range(indptr[m], indptr[m + 1]):
                    j = J[e, p]
                    f64 = rate * (msg[e, p] - j)
                    if j != 0.0 or f64 != 0.0:
                        J[e, p] = j + f64
                        if J[e, p] != 0.0:
                            any_j = 1
                    f = np.float32(f64)
                    cs = cS[e, p]
                    ci = cI[e, p]
                    if cs == 0.0 and ci == 0.0 and f == 0.0:
                        continue
                    dn = cs * x + f
                    dc = ci * y
                    cS[e, p] = cs - dn
                    cI[e, p] = ci + dn - dc
                    tot_new += dn
                    tot_S += cs - dn
                    tot_I += ci + dn - dc
                    row_I += cI[e, p]
                    if cS[e, p] != 0.0 or cI[e, p] != 0.0:
                        any_edge = 1
                sumI[m, p] = row_I
            elif s != 1 and (fl & 2) != 0:
                if y != 0:  # every component recovers: the row is zeroed once
                    for e in range(indptr[m], indptr[m + 1]):
                        cI[e, p] = 0.0
                    sumI[m, p] = 0.0
                else:
                    tot_I += sumI[m, p]
                    any_edge = 1
            if tot_I != 0.0:
                any_tot = 1
            ag[m, p] = tot_I
            if p == 0:
                dS0 += tot_S
                dI0 += tot_I
                dn0 += tot_new
            else:
                dS1 += tot_S
                dI1 += tot_I
                dn1 += tot_new
        if P:
            drop = 4 if (y == 1 or (s == 1 and x == 1)) else 0
            was = 8 if (fl & 3) != 0 else 0
            ag[m, 3] = any_tot | (2 * any_edge) | drop | was
            if walk:
                inbox[m] = any_j
        new = s * x
        i2 = i + new - i * y
        if new != 0.0:
            sus[m] = 0
        out_new[m] = new
        S[m] = s - new
        I[m] = i2
        chg[m] = (1 if i2 == 1 else 0) - (1 if i == 1 else 0)
        s_tot += s - new
        i_tot += i2
        new_tot += new
    return s_tot, i_tot, new_tot, dS0, dS1, dI0, dI1, dn0, dn1


@numba.njit(parallel=True, fastmath=True, cache=True)
def _send(indptr, indices, weights, unit, rev, sus, ag, cI, msg, J, inbox):  # pragma: no cover - compiled
    """Phase C: every agent k with a tangent (or that had one this morning) writes its
    non-backtracking message to each neighbour m into m's row: msg at e = (m ← k) is
    w (dI_k − cI_k at (k ← m)), i.e. k's extra infectious mass less what came from m; k reads
    its own row in order and each slot has one writer (no races). An agent whose keep is 0
    today (it recovered, or the primal path infected it) zeroes J on its outgoing slots.
    Sets inbox[m] when a non-zero message reaches m. Only susceptible neighbours (S == 1 after
    today's update) are written: the others never read their rows again (``sus``: one byte
    per agent, 1 while S == 1, so this random read touches a quarter of the lines of S)."""
    n = indptr.size - 1
    P = cI.shape[1]
    for k in numba.prange(n):
        fl = int(ag[k, 3])
        send = (fl & 11) != 0
        drop = (fl & 4) != 0
        if not send and not drop:
            continue
        for r in range(indptr[k], indptr[k + 1]):
            m = indices[r]
            if sus[m] == 0:  # m is no longer susceptible: it never reads its row again
                continue
            t = rev[r]
            if drop:
                for p in range(P):
                    J[t, p] = 0.0
            if send:
                w = np.float32(1.0) if unit else weights[t]
                nz = 0
                for p in range(P):
                    v = w * (ag[k, p] - cI[r, p])
                    msg[t, p] = v
                    if v != 0.0:
                        nz = 1
                if nz:
                    inbox[m] = 1
        ag[k, 3] = fl & 3


_PARAMS = ("beta", "gamma")


def run_sir_nonbacktracking(
    layer: CSRLayer, S0: torch.Tensor, I0: torch.Tensor, beta: float, gamma: float, days: int,
    seed: int, dt: float = 1.0, progress=None, tangents: bool = True, wrt=None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Primal SIR run and (``tangents``) forward-mode tangents for (β, γ), or for the names in
    ``wrt`` only (a subset of ("beta", "gamma"); the other Jacobian column is zero).

    Returns (series [days+1, 4] of S, I, R, new infections; jacobian [days+1, 4, 2];
    final S; final I; last day's new infections). Same events as the substep path of
    ``simulate`` (same uniforms, same formulas, float32 probabilities)."""
    n = layer.n
    wrt = tuple(_PARAMS if wrt is None else wrt) if tangents else ()
    cols = [_PARAMS.index(w) for w in wrt]
    P = len(cols)
    indptr, indices = layer.indptr.numpy(), layer.indices.numpy()
    unit = layer.weights is None
    weights = (layer.weights.numpy() if layer.weights is not None else np.ones(layer.nnz, np.float32))
    rev = reverse_edges(layer) if P else np.zeros(0, np.int32)
    deg = np.maximum(layer.degree().numpy().astype(np.float64), 1.0)
    S = S0.detach().numpy().astype(np.float32).copy()
    I = I0.detach().numpy().astype(np.float32).copy()
    nnz = layer.nnz if P else 0
    cS = np.zeros((nnz, P), np.float32)  # edge-major: one cache line per edge for all parameters
    cI = np.zeros((nnz, P), np.float32)
    msg = np.zeros((nnz, P), np.float32)  # message into each edge's row (written by its source)
    J = np.zeros((nnz, P), np.float32)
    xa = np.zeros(n, np.float32)
    ya = np.zeros(n, np.float32)
    oS = np.zeros((n, P), np.float64)
    oI = np.zeros((n, P), np.float64)
    ag = np.zeros((n if P else 0, 4), np.float32)  # per agent: dI for each parameter, flag
    sumI = np.zeros((n, P), np.float64)
    inbox = np.zeros(n, np.uint8)
    sus = (S == 1).astype(np.uint8)  # 1 while the agent is susceptible (read by _send)
    chg = np.zeros(n, np.int8)
    h = np.zeros(n, np.float64)
    out_new = np.zeros(n, np.float32)
    inj_beta = np.array([1.0 if c == 0 else 0.0 for c in cols])
    inj_gamma = np.array([1.0 if c == 1 else 0.0 for c in cols])
    r = -math.expm1(-gamma * dt)
    dr = dt * math.exp(-gamma * dt)
    series = np.zeros((days + 1, 4))
    jac = np.zeros((days + 1, 4, 2))
    series[0] = (S.sum(dtype=np.float64), I.sum(dtype=np.float64), n - S.sum(dtype=np.float64)
                 - I.sum(dtype=np.float64), I.sum(dtype=np.float64))
    out_new[:] = I
    threads = follow_torch_threads()
    cnt: np.ndarray = np.zeros(n, count_dtype(layer))
    if unit:
        _count_infected(indptr, indices, I, cnt)
    for day in range(days):
        key = np.uint64(day_key(seed, day))
        follow_torch_threads()
        if unit and not P:
            s_tot, i_tot, new_tot = _day_counts(S, I, cnt, deg, beta, r, dt, key, out_new, chg)
            _push(indptr, indices, chg, cnt)
        else:
            if unit:
                _events_cnt(S, I, cnt, deg, beta, r, dt, key, h, xa, ya)
            else:
                u = counter_uniforms(seed, day, n, torch.device("cpu"), 2).numpy()
                follow_torch_threads()
                _events(indptr, indices, weights, S, I, u[0], u[1], deg, beta, r, dt, h, xa, ya)
            s_tot, i_tot, new_tot, *tot = _advance(
                indptr, S, I, xa, ya, h, deg, beta, r, dr, dt, inj_beta, inj_gamma, msg, J, inbox,
                cS, cI, sumI, ag, oS, oI, out_new, chg, sus)
            if P:
                _send(indptr, indices, weights, unit, rev, sus, ag, cI, msg, J, inbox)
            if unit:
                _push(indptr, indices, chg, cnt)
            for slot, c in enumerate(cols):
                dS, dI, dnew = tot[slot], tot[2 + slot], tot[4 + slot]
                jac[day + 1, :, c] = (dS, dI, -dS - dI, dnew)
        series[day + 1] = (s_tot, i_tot, n - s_tot - i_tot, new_tot)
        if progress is not None:
            progress(day)
    torch.set_num_threads(threads)
    return series, jac, S, I, out_new


def supports_fused_sir(model, device: torch.device, hooks: bool) -> bool:
    """True for the plain SIR model (substeps infection, recovery) on CPU without hooks."""
    from simulation.models.sir import SIR, Infection, Recovery

    subs = list(model.substeps.items())
    return (type(model) is SIR and not hooks and device.type == "cpu"
            and [k for k, _ in subs] == ["infection", "recovery"]
            and type(subs[0][1]) is Infection and type(subs[1][1]) is Recovery)


class _FusedSIR(torch.autograd.Function):
    """Daily series [days + 1, 4] (S, I, R, new) as a function of (β, γ); backward is Jᵀ g."""

    @staticmethod
    def forward(ctx, beta, gamma, layer, s0, i0, days, seed, progress, out):  # type: ignore[override]
        series, jac, s, i, new = run_sir_nonbacktracking(
            layer, s0, i0, float(beta), float(gamma), days, seed, progress=progress,
            wrt=[name for name, need in zip(_PARAMS, ctx.needs_input_grad[:2], strict=True) if need])
        ctx.save_for_backward(torch.from_numpy(jac).float())
        out.update(S=torch.from_numpy(s), I=torch.from_numpy(i), new=torch.from_numpy(new))
        return torch.from_numpy(series).float()

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        (jac,) = ctx.saved_tensors
        g = (grad.unsqueeze(-1) * jac).sum((0, 1))
        return g[0], g[1], None, None, None, None, None, None, None


def simulate_sir_fused(model, layer: CSRLayer, days: int, seed: int, progress=None):
    """Run the plain SIR model fused; returns (series dict, final state dict). Gradients
    of the series w.r.t. β and γ use the non-backtracking stochastic derivative; the final
    state carries no gradient."""
    n = layer.n
    gen = torch.Generator().manual_seed(int(seed))
    state = model.initial_state(n, gen, torch.device("cpu"))
    out: dict[str, torch.Tensor] = {}
    tangents = [fwAD.unpack_dual(p).tangent for p in (model.beta, model.gamma)]
    if any(t is not None for t in tangents):  # forward-mode AD (dual numbers): J · tangent
        series_np, jac, s, i, new = run_sir_nonbacktracking(
            layer, state["S"], state["I"], float(fwAD.unpack_dual(model.beta).primal),
            float(fwAD.unpack_dual(model.gamma).primal), days, seed, progress=progress,
            wrt=[name for name, t in zip(_PARAMS, tangents, strict=True) if t is not None])
        tan = sum(torch.from_numpy(jac[..., j]).float() * t.float() for j, t in enumerate(tangents) if t is not None)
        series = fwAD.make_dual(torch.from_numpy(series_np).float(), tan)
        out.update(S=torch.from_numpy(s), I=torch.from_numpy(i), new=torch.from_numpy(new))
        return named_series(series, out)
    grad = torch.is_grad_enabled() and (model.beta.requires_grad or model.gamma.requires_grad)
    beta, gamma = (model.beta, model.gamma) if grad else (model.beta.detach(), model.gamma.detach())
    series = _FusedSIR.apply(beta, gamma, layer, state["S"], state["I"], days, seed, progress, out)
    return named_series(series, out)


def named_series(series: torch.Tensor, out: dict[str, torch.Tensor]):
    cols = series.unbind(1)
    named = {"S": cols[0], "I": cols[1], "R": cols[2], "new_infections": cols[3]}
    final = {"S": out["S"], "I": out["I"], "R": 1.0 - out["S"] - out["I"], "new_infections": out["new"]}
    return named, final

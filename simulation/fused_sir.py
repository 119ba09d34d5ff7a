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


# Flags per agent for the day (AR[m, 3]): bit 1 susceptible this morning, bit 2 infectious this
# morning, bit 4 the infection coin x = 1, bit 8 the recovery coin y = 1.
_FS, _FI, _FX, _FY = 1, 2, 4, 8


@numba.njit(parallel=True, fastmath=True, cache=True)
def _pack(S, I, x_arr, y_arr, deg, beta, dt, AR):  # pragma: no cover - compiled
    """Per agent for the edge pass: the inflow rate (1 − x) β Δt / n of a susceptible (0
    otherwise) and the day's flags, one 32-byte record per agent (one cache line per gather)."""
    for m in numba.prange(S.size):
        s = S[m]
        x = x_arr[m]
        fl = (_FS if s == 1 else 0) | (_FI if I[m] == 1 else 0)
        fl |= (_FX if x == 1 else 0) | (_FY if y_arr[m] == 1 else 0)
        AR[m, 0] = (1.0 - x) * beta * dt / deg[m] if s == 1 else 0.0
        AR[m, 3] = fl


@numba.njit(fastmath=True, cache=True)
def _draw(m, n, s, i, cnt, deg, beta, r, dt, key, h, x, y, AR):  # pragma: no cover - compiled
    """Agent m's coins for the day from the kept counts (as ``_events_cnt``: the same counter
    uniforms, drawn only where they decide something), its record for the edge pass (inflow
    rate and flags) and the change of its I flag (returned, for ``_push``)."""
    xm = np.float32(0.0)
    ym = np.float32(0.0)
    rate = 0.0
    fl = 0
    if s != 0 or i != 0:
        fl = (_FS if s == 1 else 0) | (_FI if i == 1 else 0)
        if _uniform(key, n + m + 1) < r:
            ym = np.float32(1.0)
            fl |= _FY
        if s == 1:
            c = cnt[m]
            h[m] = c
            if c > 0:
                q = 1.0 - math.exp(-beta * dt * c / deg[m])
                if _uniform(key, m + 1) < q:
                    xm = np.float32(1.0)
                    fl |= _FX
            rate = (1.0 - xm) * beta * dt / deg[m]
    x[m] = xm
    y[m] = ym
    AR[m, 0] = rate
    AR[m, 3] = fl
    i2 = i + s * xm - i * ym
    return (1 if i2 == 1 else 0) - (1 if i == 1 else 0)


@numba.njit(parallel=True, fastmath=True, cache=True)
def _events_pack(S, I, cnt, deg, beta, r, dt, key, h, x, y, AR, chg):  # pragma: no cover
    """``_events_cnt`` and ``_pack`` in one pass (unit weights), and the day's I-flag changes."""
    n = S.size
    for m in numba.prange(n):
        chg[m] = _draw(m, n, S[m], I[m], cnt, deg, beta, r, dt, key, h, x, y, AR)


@numba.njit(cache=True)
def _undirected(indptr, indices, rev, S, I, EA, EB, fwd, bwd):  # pragma: no cover - compiled
    """The live undirected edges (a ≤ b, one record per pair of directed edges e = (a ← b),
    rev[e] = (b ← a)): at least one end susceptible and neither recovered. Returns their count."""
    L = 0
    for a in range(indptr.size - 1):
        for e in range(indptr[a], indptr[a + 1]):
            b = indices[e]
            if b < a:
                continue
            ra = S[a] == 0 and I[a] == 0
            rb = S[b] == 0 and I[b] == 0
            if (S[a] == 1 or S[b] == 1) and not ra and not rb:
                EA[L] = a
                EB[L] = b
                fwd[L] = e
                bwd[L] = rev[e]
                L += 1
    return L


@numba.njit(inline="always")
def _edge_side(w, far_dI, far_C, rate, J, cS, C, keep, x, y):  # pragma: no cover - compiled
    """One direction of an edge's tangent update (the message from the far end, less what
    this end sent it and what already infected it): (next J, Δ new, next cS, next C)."""
    msg = w * (np.float32(far_dI) - far_C)
    f64 = rate * (msg - J)
    nJ = np.float32(J + f64) * keep
    dn = cS * x + np.float32(f64)
    return nJ, dn, cS - dn, C + dn - C * y


@numba.njit(fastmath=True, cache=True)
def _edge_chunk(EA, EB, W, unit, E, lo, ln, AR, acc, fold, glob, c, P):  # pragma: no cover - compiled
    """One chunk of ``_edges`` (a plain compiled loop: inside a parallel loop numba optimises
    the body less well, measured 1.4x slower). Gathers the far ends' records a block at a
    time and scatters their sums after the block, so the random reads overlap."""
    B = 1024
    wp = lo[c]
    gN = np.zeros(P)
    gS = np.zeros(P)
    gb = np.empty((B, 4))
    sc = np.empty((B, 2))
    bb = np.empty(B, np.int64)
    end = lo[c] + ln[c]
    for r0 in range(lo[c], end, B):
        nb = min(B, end - r0)
        for j in range(nb):
            b = EB[r0 + j]
            bb[j] = b
            gb[j, 0] = AR[b, 0]
            gb[j, 1] = AR[b, 1]
            gb[j, 2] = AR[b, 2]
            gb[j, 3] = AR[b, 3]
        for j in range(nb):
            r = r0 + j
            a = EA[r]
            b = EB[r]
            fa = int(AR[a, 3])
            fb = int(gb[j, 3])
            rate_b = gb[j, 0]
            sa = (fa & _FS) != 0
            sb = (fb & _FS) != 0
            xa = np.float32(1.0) if (fa & _FX) != 0 else np.float32(0.0)
            ya = np.float32(1.0) if (fa & _FY) != 0 else np.float32(0.0)
            xb = np.float32(1.0) if (fb & _FX) != 0 else np.float32(0.0)
            yb = np.float32(1.0) if (fb & _FY) != 0 else np.float32(0.0)
            drop_a = (fa & _FY) != 0 or (sa and (fa & _FX) != 0)
            drop_b = (fb & _FY) != 0 or (sb and (fb & _FX) != 0)
            stay_a = sa and (fa & _FX) == 0
            stay_b = sb and (fb & _FX) == 0
            rec_a = (fa & (_FS | _FI)) == 0 or ((fa & _FI) != 0 and (fa & _FY) != 0)
            rec_b = (fb & (_FS | _FI)) == 0 or ((fb & _FI) != 0 and (fb & _FY) != 0)
            live = (stay_a or stay_b) and not rec_a and not rec_b
            if b == a:  # a self-loop is one directed edge: side a only (side b adds zeros)
                rate_b = 0.0
                stay_b = False
            if unit:
                wab = np.float32(1.0)
                wba = np.float32(1.0)
            else:
                wab = W[r, 0]
                wba = W[r, 1]
            rate_a = AR[a, 0]
            ka = np.float32(0.0) if drop_b else np.float32(1.0)
            kb = np.float32(0.0) if drop_a else np.float32(1.0)
            for p in range(P):
                o = 6 * p
                Ja = E[r, o]
                cSa = E[r, o + 1]
                Ca = E[r, o + 2]
                Jb = E[r, o + 3]
                cSb = E[r, o + 4]
                Cb = E[r, o + 5] if b != a else Ca
                nJa, dn, cs, ci = _edge_side(wab, gb[j, 1 + p], Cb, rate_a, Ja, cSa, Ca, ka, xa, ya)
                nJb, dn2, cs2, ci2 = _edge_side(wba, AR[a, 1 + p], Ca, rate_b, Jb, cSb, Cb, kb, xb, yb)
                gN[p] += dn + dn2
                gS[p] += cs + cs2
                acc[c, a, p] += ci
                sc[j, p] = ci2 if b != a else np.float32(0.0)
                if not live:
                    if stay_a:
                        fold[c, a, p] += cs
                        fold[c, a, P + p] += ci
                    if stay_b:
                        fold[c, b, p] += cs2
                        fold[c, b, P + p] += ci2
                E[wp, o] = nJa
                E[wp, o + 1] = cs
                E[wp, o + 2] = ci
                E[wp, o + 3] = nJb
                E[wp, o + 4] = cs2
                E[wp, o + 5] = ci2
            EA[wp] = a
            EB[wp] = b
            if not unit:
                W[wp, 0] = wab
                W[wp, 1] = wba
            if live:
                wp += 1
        for j in range(nb):
            b = bb[j]
            for p in range(P):
                acc[c, b, p] += sc[j, p]
    ln[c] = wp - lo[c]
    for p in range(P):
        glob[c, p] = gS[p]
        glob[c, P + p] = gN[p]


@numba.njit(parallel=True, cache=True)
def _edges(EA, EB, W, unit, E, lo, ln, AR, acc, fold, glob, nP):  # pragma: no cover - compiled
    """Edge pass: the non-backtracking inflow of both directions of every live undirected edge
    {a, b}, from yesterday's state (so one visit serves both rows, with no message array).

    Direction a ← b (a susceptible this morning), per parameter: msg = w_ab (dI_b − C_ba),
    f = rate_a (msg − J_ab), J_ab += f; dn = cS_ab x_a + f, cS_ab −= dn, C_ab += dn − C_ab y_a;
    J_ab = 0 if b drops today (recovers, or the primal path infects it). Record E[r, 6p:6p+6] =
    (J_ab, cS_ab, C_ab, J_ba, cS_ba, C_ba). An infectious end's components are frozen (their
    row sum is the agent's sumI). Σ C_ab goes to acc[chunk, a] (a's dI), Σ cS and Σ dn to
    glob. An edge dies when no end stays susceptible or an end recovers: a susceptible end
    then has no inflow left on it and its components evolve like its own, so they are folded
    into ``fold`` (added to oS, oI by ``_agents``). Each chunk c of the list [lo[c], lo[c] +
    ln[c]) compacts itself in place; its scatters go to its own acc/fold slices (no races)."""
    P = numba.literally(nP)  # compiled per parameter count: the inner loops unroll
    for c in numba.prange(lo.size):
        _edge_chunk(EA, EB, W, unit, E, lo, ln, AR, acc, fold, glob, c, P)


@numba.njit(parallel=True, fastmath=True, cache=True)
def _agents(S, I, x_arr, y_arr, h, deg, r, dr, dt, inj_beta, inj_gamma, sumI, AR, acc, fold, oS, oI,
            out_new, chg, cnt, beta, key, nxt):  # pragma: no cover - compiled
    """Per agent after the edge pass: the own tangent component (d new = oS·x + the β
    injection (1 − x) Δt h / n of a susceptible; d rec = oI·y + the γ injection (1 − y)/(1 − r)
    ∂r/∂γ of an infectious agent; oS −= d new, oI += d new − d rec), the agent's dI (own +
    its edge components: today's acc for a susceptible, kept in sumI from its infection day
    to its recovery), components folded from dead edges, and the primal update. Returns the
    day's totals (S, I, new) and the own parts of the tangent totals (dS, dI, dnew) for
    parameters 0 and 1. With ``nxt`` (unit weights; ``cnt`` already holds tomorrow's counts,
    ``key`` is tomorrow's) the agent then draws tomorrow's coins in the same pass (``_draw``):
    chg is then tomorrow's change, else today's."""
    n = S.size
    T = acc.shape[0]
    P = acc.shape[2]
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
            tot_S = oS[m, p]
            tot_I = oI[m, p]
            if s == 1:
                row = 0.0
                fs = 0.0
                fi = 0.0
                for c in range(T):
                    row += acc[c, m, p]
                    acc[c, m, p] = 0.0
                    fs += fold[c, m, p]
                    fi += fold[c, m, P + p]
                    fold[c, m, p] = 0.0
                    fold[c, m, P + p] = 0.0
                tot_I += row
                if x == 1:
                    sumI[m, p] = row
                oS[m, p] += fs
                oI[m, p] += fi
            elif y != 0:
                sumI[m, p] = 0.0
            else:
                tot_I += sumI[m, p]
            AR[m, 1 + p] = np.float32(tot_I)
            if p == 0:
                dS0 += tot_S
                dI0 += tot_I
                dn0 += dnew
            else:
                dS1 += tot_S
                dI1 += tot_I
                dn1 += dnew
        new = s * x
        i2 = i + new - i * y
        out_new[m] = new
        S[m] = s - new
        I[m] = i2
        if nxt:
            chg[m] = _draw(m, n, s - new, i2, cnt, deg, beta, r, dt, key, h, x_arr, y_arr, AR)
        else:
            chg[m] = (1 if i2 == 1 else 0) - (1 if i == 1 else 0)
        s_tot += s - new
        i_tot += i2
        new_tot += new
    return s_tot, i_tot, new_tot, dS0, dS1, dI0, dI1, dn0, dn1


_PARAMS = ("beta", "gamma")


def _aligned(shape: tuple[int, int], align: int) -> np.ndarray:
    """Zeroed float64 array whose rows start on ``align``-byte boundaries (a 32-byte agent
    record then never straddles two cache lines)."""
    count = shape[0] * shape[1]
    raw = np.zeros(count + align // 8, np.float64)
    skip = (-raw.ctypes.data % align) // 8
    return raw[skip:skip + count].reshape(shape)


def _live_edges(layer: CSRLayer, S: np.ndarray, I: np.ndarray, P: int, T: int):
    """The live undirected edge list for ``_edges`` split into T chunks: (EA, EB, W, E, lo, ln).
    W holds the weights of both directions (empty for unit weights), E the 6·P float32
    components per edge."""
    if not P:
        z = np.zeros(0, np.int32)
        return z, z, np.zeros((0, 2), np.float32), np.zeros((0, 0), np.float32), np.zeros(1, np.int64), \
            np.zeros(1, np.int64)
    rev = reverse_edges(layer)
    indptr, indices = layer.indptr.numpy(), layer.indices.numpy()
    m = int(np.count_nonzero(indices >= np.repeat(np.arange(layer.n), np.diff(indptr))))
    EA = np.empty(m, np.int32)
    EB = np.empty(m, np.int32)
    fwd = np.empty(m, np.int64)
    bwd = np.empty(m, np.int64)
    L = _undirected(indptr, indices, rev, S, I, EA, EB, fwd, bwd)
    EA, EB, fwd, bwd = EA[:L].copy(), EB[:L].copy(), fwd[:L], bwd[:L]
    if layer.weights is None:
        W = np.zeros((0, 2), np.float32)
    else:
        w = layer.weights.numpy()
        W = np.stack([w[fwd], w[bwd]], axis=1).astype(np.float32)
    E = np.zeros((L, 6 * P), np.float32)
    lo = np.array([L * c // T for c in range(T)], np.int64)
    ln = np.diff(np.append(lo, L)).astype(np.int64)
    return EA, EB, W, E, lo, ln


def run_sir_nonbacktracking(
    layer: CSRLayer, S0: torch.Tensor, I0: torch.Tensor, beta: float, gamma: float, days: int,
    seed: int, dt: float = 1.0, progress=None, tangents: bool = True, wrt=None, chunks: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Primal SIR run and (``tangents``) forward-mode tangents for (β, γ), or for the names in
    ``wrt`` only (a subset of ("beta", "gamma"); the other Jacobian column is zero).

    Returns (series [days+1, 4] of S, I, R, new infections; jacobian [days+1, 4, 2];
    final S; final I; last day's new infections). Same events as the substep path of
    ``simulate`` (same uniforms, same formulas, float32 probabilities). ``chunks``: how many
    parts the edge list is cut into for the parallel edge pass (default: numba's thread
    count); it changes only the order of floating-point sums."""
    n = layer.n
    wrt = tuple(_PARAMS if wrt is None else wrt) if tangents else ()
    cols = [_PARAMS.index(w) for w in wrt]
    P = len(cols)
    indptr, indices = layer.indptr.numpy(), layer.indices.numpy()
    unit = layer.weights is None
    weights = (layer.weights.numpy() if layer.weights is not None else np.ones(layer.nnz, np.float32))
    deg = np.maximum(layer.degree().numpy().astype(np.float64), 1.0)
    S = S0.detach().numpy().astype(np.float32).copy()
    I = I0.detach().numpy().astype(np.float32).copy()
    threads = follow_torch_threads()
    T = (chunks or numba.get_num_threads()) if P else 1  # edge-list chunks, one per thread
    EA, EB, W, E, lo, ln = _live_edges(layer, S, I, P, T)
    xa = np.zeros(n, np.float32)
    ya = np.zeros(n, np.float32)
    oS = np.zeros((n, P), np.float64)
    oI = np.zeros((n, P), np.float64)
    sumI = np.zeros((n, P), np.float64)
    AR = _aligned((n, 4), 32)  # per agent: inflow rate, dI per parameter, flags
    acc = np.zeros((T, n if P else 0, P), np.float64)
    fold = np.zeros((T, n if P else 0, 2 * P), np.float64)
    glob = np.zeros((T, 2 * P), np.float64)
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
                if day == 0:
                    _events_pack(S, I, cnt, deg, beta, r, dt, key, h, xa, ya, AR, chg)
                _push(indptr, indices, chg, cnt)  # the counts after today (today's coins are drawn)
            else:
                u = counter_uniforms(seed, day, n, torch.device("cpu"), 2).numpy()
                follow_torch_threads()
                _events(indptr, indices, weights, S, I, u[0], u[1], deg, beta, r, dt, h, xa, ya)
                _pack(S, I, xa, ya, deg, beta, dt, AR)
            if P:
                _edges(EA, EB, W, unit, E, lo, ln, AR, acc, fold, glob, P)
            nkey = np.uint64(day_key(seed, day + 1))  # unit weights: tomorrow's coins in the same pass
            s_tot, i_tot, new_tot, *tot = _agents(
                S, I, xa, ya, h, deg, r, dr, dt, inj_beta, inj_gamma, sumI, AR, acc, fold, oS, oI, out_new, chg,
                cnt, beta, nkey, unit)
            edge = glob.sum(0)
            for slot, c in enumerate(cols):
                dS, dI, dnew = tot[slot] + edge[slot], tot[2 + slot], tot[4 + slot] + edge[P + slot]
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

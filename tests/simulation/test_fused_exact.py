"""Exactness guard for the fused SIR run (``simulation.fused_sir``): a frozen copy of the
tangent kernels and driver of 5a69498 (daily message re-send, int32 infected-neighbour
counts) is the reference. Any rewrite of the kernels for speed must give the same Jacobian
of the daily series within 1e-6 (relative to each column's largest entry) and a
bit-identical forward series and final state, on small unit and weighted graphs, several
seeds and points."""

# ruff: noqa: E741
from __future__ import annotations

import math

import numba
import numpy as np
import pytest
import torch

from simulation import fused_sir
from simulation.fused_sir import _count_infected, _events, _events_cnt, _push, reverse_edges
from simulation.models import SIR
from simulation.population import CSRLayer, random_contact_graph
from simulation.rng import counter_uniforms, day_key

# --- reference: the daily re-send kernels of 5a69498 (simulation/fused_sir.py), verbatim ---

@numba.njit(parallel=True, fastmath=True, cache=True)
def _advance_ref(indptr, S, I, x_arr, y_arr, h, deg, beta, r, dr, dt, inj_beta, inj_gamma, msg, J, inbox,
             cS, cI, sumI, ag, oS, oI, out_new, chg):  # pragma: no cover - compiled
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
        out_new[m] = new
        S[m] = s - new
        I[m] = i2
        chg[m] = (1 if i2 == 1 else 0) - (1 if i == 1 else 0)
        s_tot += s - new
        i_tot += i2
        new_tot += new
    return s_tot, i_tot, new_tot, dS0, dS1, dI0, dI1, dn0, dn1


@numba.njit(parallel=True, fastmath=True, cache=True)
def _send_ref(indptr, indices, weights, unit, rev, S, ag, cI, msg, J, inbox):  # pragma: no cover - compiled
    """Phase C: every agent k with a tangent (or that had one this morning) writes its
    non-backtracking message to each neighbour m into m's row: msg at e = (m ← k) is
    w (dI_k − cI_k at (k ← m)), i.e. k's extra infectious mass less what came from m; k reads
    its own row in order and each slot has one writer (no races). An agent whose keep is 0
    today (it recovered, or the primal path infected it) zeroes J on its outgoing slots.
    Sets inbox[m] when a non-zero message reaches m. Only susceptible neighbours (S == 1 after
    today's update) are written: the others never read their rows again."""
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
            if S[m] != 1:  # m is no longer susceptible: it never reads its row again
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



# --- end of the reference copy ---


def _reference_run(layer: CSRLayer, S0, I0, beta, gamma, days, seed, wrt=("beta", "gamma")):
    """The run_sir_nonbacktracking driver of 5a69498 on the reference kernels."""
    n = layer.n
    cols = [("beta", "gamma").index(w) for w in wrt]
    P = len(cols)
    indptr, indices = layer.indptr.numpy(), layer.indices.numpy()
    unit = layer.weights is None
    weights = layer.weights.numpy() if layer.weights is not None else np.ones(layer.nnz, np.float32)
    rev = reverse_edges(layer)
    deg = np.maximum(layer.degree().numpy().astype(np.float64), 1.0)
    S = S0.numpy().astype(np.float32).copy()
    I = I0.numpy().astype(np.float32).copy()
    nnz = layer.nnz
    cS, cI, msg, J = (np.zeros((nnz, P), np.float32) for _ in range(4))
    xa, ya, out_new = (np.zeros(n, np.float32) for _ in range(3))
    oS, oI, sumI = (np.zeros((n, P), np.float64) for _ in range(3))
    ag = np.zeros((n, 4), np.float32)
    inbox = np.zeros(n, np.uint8)
    chg = np.zeros(n, np.int8)
    h = np.zeros(n, np.float64)
    inj_beta = np.array([1.0 if c == 0 else 0.0 for c in cols])
    inj_gamma = np.array([1.0 if c == 1 else 0.0 for c in cols])
    r = -math.expm1(-gamma)
    dr = math.exp(-gamma)
    series = np.zeros((days + 1, 4))
    jac = np.zeros((days + 1, 4, 2))
    series[0] = (S.sum(dtype=np.float64), I.sum(dtype=np.float64), n - S.sum(dtype=np.float64)
                 - I.sum(dtype=np.float64), I.sum(dtype=np.float64))
    cnt = np.zeros(n, np.int32)
    if unit:
        _count_infected(indptr, indices, I, cnt)
    for day in range(days):
        key = np.uint64(day_key(seed, day))
        if unit:
            _events_cnt(S, I, cnt, deg, beta, r, 1.0, key, h, xa, ya)
        else:
            u = counter_uniforms(seed, day, n, torch.device("cpu"), 2).numpy()
            _events(indptr, indices, weights, S, I, u[0], u[1], deg, beta, r, 1.0, h, xa, ya)
        s_tot, i_tot, new_tot, *tot = _advance_ref(
            indptr, S, I, xa, ya, h, deg, beta, r, dr, 1.0, inj_beta, inj_gamma, msg, J, inbox,
            cS, cI, sumI, ag, oS, oI, out_new, chg)
        _send_ref(indptr, indices, weights, unit, rev, S, ag, cI, msg, J, inbox)
        if unit:
            _push(indptr, indices, chg, cnt)
        for slot, c in enumerate(cols):
            dS, dI, dnew = tot[slot], tot[2 + slot], tot[4 + slot]
            jac[day + 1, :, c] = (dS, dI, -dS - dI, dnew)
        series[day + 1] = (s_tot, i_tot, n - s_tot - i_tot, new_tot)
    return series, jac, S, I


def _weighted(layer: CSRLayer, seed: int) -> CSRLayer:
    """The same symmetric graph with symmetric random weights in [0.2, 1.2)."""
    indptr, indices = layer.indptr.numpy(), layer.indices.numpy()
    rows = np.repeat(np.arange(layer.n), np.diff(indptr))
    lo, hi = np.minimum(rows, indices), np.maximum(rows, indices)
    w = (0.2 + (np.sin(lo * 12.9898 + hi * 78.233 + seed) * 43758.5453) % 1.0).astype(np.float32)
    return CSRLayer(indptr=layer.indptr, indices=layer.indices, weights=torch.from_numpy(w))


def _assert_close(jac, ref):
    scale = np.abs(ref).max(axis=0, keepdims=True) + 1e-12
    err = np.abs(jac - ref) / scale
    assert err.max() <= 1e-6, f"max relative error {err.max():.3g}"


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize(("beta", "gamma"), [(0.3, 0.15), (0.6, 0.1)])
def test_jacobian_equals_the_reference_kernels(seed, weighted, beta, gamma):
    layer = random_contact_graph(3000, 8, seed=seed).merged()
    if weighted:
        layer = _weighted(layer, seed)
    st = SIR(beta, gamma, 0.02).initial_state(layer.n, torch.Generator().manual_seed(seed), torch.device("cpu"))
    ref = _reference_run(layer, st["S"], st["I"], beta, gamma, 40, seed)
    new = fused_sir.run_sir_nonbacktracking(layer, st["S"], st["I"], beta, gamma, 40, seed)
    assert np.array_equal(new[0], ref[0])  # forward series bit for bit
    assert np.array_equal(new[2], ref[2]) and np.array_equal(new[3], ref[3])
    assert np.abs(ref[1]).max() > 0
    _assert_close(new[1], ref[1])


@pytest.mark.parametrize("wrt", [("beta",), ("gamma",)])
def test_jacobian_for_one_parameter_equals_the_reference(wrt):
    layer = random_contact_graph(2000, 6, seed=5).merged()
    st = SIR(0.4, 0.12, 0.02).initial_state(layer.n, torch.Generator().manual_seed(5), torch.device("cpu"))
    ref = _reference_run(layer, st["S"], st["I"], 0.4, 0.12, 30, 5, wrt=wrt)
    new = fused_sir.run_sir_nonbacktracking(layer, st["S"], st["I"], 0.4, 0.12, 30, 5, wrt=wrt)
    assert np.array_equal(new[0], ref[0])
    _assert_close(new[1], ref[1])


def test_forward_without_tangents_is_bit_identical():
    layer = random_contact_graph(5000, 10, seed=7).merged()
    st = SIR(0.5, 0.1, 0.01).initial_state(layer.n, torch.Generator().manual_seed(7), torch.device("cpu"))
    ref = _reference_run(layer, st["S"], st["I"], 0.5, 0.1, 50, 7)
    fwd = fused_sir.run_sir_nonbacktracking(layer, st["S"], st["I"], 0.5, 0.1, 50, 7, tangents=False)
    assert np.array_equal(fwd[0], ref[0])
    assert np.array_equal(fwd[2], ref[2]) and np.array_equal(fwd[3], ref[3])



def _star_plus_ring(n: int, hub_degree: int) -> CSRLayer:
    """A ring with one hub joined to ``hub_degree`` agents (a count beyond int8 for 200)."""
    src = np.concatenate([np.arange(n), np.zeros(hub_degree, np.int64)])
    dst = np.concatenate([(np.arange(n) + 1) % n, np.arange(2, 2 + hub_degree)])
    return CSRLayer.from_edges(n, src, dst)


@pytest.mark.parametrize(("hub", "dtype"), [(100, np.int8), (200, np.int16)])
def test_small_count_type_keeps_the_forward_bit_identical(hub, dtype):
    """The infected-neighbour counts use the smallest integer type that holds the largest
    degree; the forward series and the final state equal the int32 reference bit for bit."""
    layer = _star_plus_ring(3000, hub)
    assert fused_sir.count_dtype(layer) is dtype
    st = SIR(0.9, 0.1, 0.05).initial_state(layer.n, torch.Generator().manual_seed(2), torch.device("cpu"))
    st["I"][1:hub + 2] = 1.0  # the hub sees more than 127 infectious neighbours in the int16 case
    st["S"][1:hub + 2] = 0.0
    ref = _reference_run(layer, st["S"], st["I"], 0.9, 0.1, 30, 2)
    fwd = fused_sir.run_sir_nonbacktracking(layer, st["S"], st["I"], 0.9, 0.1, 30, 2, tangents=False)
    tan = fused_sir.run_sir_nonbacktracking(layer, st["S"], st["I"], 0.9, 0.1, 30, 2)
    assert np.array_equal(fwd[0], ref[0]) and np.array_equal(tan[0], ref[0])
    assert np.array_equal(fwd[2], ref[2]) and np.array_equal(fwd[3], ref[3])
    _assert_close(tan[1], ref[1])


def _with_self_loops(layer: CSRLayer, every: int) -> CSRLayer:
    """The same graph with a self-loop (m, m) added to every ``every``-th agent's row."""
    ip, ix = layer.indptr.numpy(), layer.indices.numpy()
    rows = [sorted([*ix[ip[m]:ip[m + 1]], *([m] if m % every == 0 else [])]) for m in range(layer.n)]
    indptr = np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(ip.dtype)
    indices = np.concatenate(rows).astype(ix.dtype)
    return CSRLayer(indptr=torch.from_numpy(indptr), indices=torch.from_numpy(indices), weights=None)


@pytest.mark.parametrize("weighted", [False, True])
def test_self_loops_equal_the_reference(weighted):
    """A self-loop is one directed edge that is its own reverse: the undirected edge pass
    reads it from one side only."""
    layer = _with_self_loops(random_contact_graph(2000, 6, seed=3).merged(), 3)
    if weighted:
        layer = _weighted(layer, 3)
    st = SIR(0.5, 0.1, 0.02).initial_state(layer.n, torch.Generator().manual_seed(3), torch.device("cpu"))
    ref = _reference_run(layer, st["S"], st["I"], 0.5, 0.1, 40, 3)
    new = fused_sir.run_sir_nonbacktracking(layer, st["S"], st["I"], 0.5, 0.1, 40, 3)
    assert np.array_equal(new[0], ref[0])
    _assert_close(new[1], ref[1])


@pytest.mark.parametrize("chunks", [2, 3])
def test_edge_list_chunks_equal_the_reference(chunks):
    """The edge pass cut into several chunks (as with several threads: each chunk scatters
    into its own sums) gives the same Jacobian."""
    layer = random_contact_graph(3000, 8, seed=4).merged()
    st = SIR(0.6, 0.1, 0.02).initial_state(layer.n, torch.Generator().manual_seed(4), torch.device("cpu"))
    ref = _reference_run(layer, st["S"], st["I"], 0.6, 0.1, 40, 4)
    new = fused_sir.run_sir_nonbacktracking(layer, st["S"], st["I"], 0.6, 0.1, 40, 4, chunks=chunks)
    assert np.array_equal(new[0], ref[0])
    _assert_close(new[1], ref[1])

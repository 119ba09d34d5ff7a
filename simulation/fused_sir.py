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
from simulation.rng import counter_uniforms

__all__ = ["reverse_edges", "run_sir_nonbacktracking", "simulate_sir_fused", "supports_fused_sir"]


@numba.njit(cache=True)
def _reverse_edges(indptr, indices, rev):  # pragma: no cover - compiled
    n = indptr.size - 1
    for m in range(n):
        for e in range(indptr[m], indptr[m + 1]):
            k = indices[e]
            lo, hi = indptr[k], indptr[k + 1]
            while lo < hi:  # rows are sorted: binary search for m in k's contacts
                mid = (lo + hi) // 2
                if indices[mid] < m:
                    lo = mid + 1
                else:
                    hi = mid
            rev[e] = lo if lo < indptr[k + 1] and indices[lo] == m else -1


def reverse_edges(layer: CSRLayer) -> np.ndarray:
    """rev[e] = position of the edge (k, m) for e = (m, k); -1 if the graph is not symmetric."""
    rev = np.empty(layer.nnz, dtype=np.int64)
    _reverse_edges(layer.indptr.numpy(), layer.indices.numpy(), rev)
    return rev


@numba.njit(parallel=True, fastmath=True, cache=True)
def _events(indptr, indices, weights, S, I, u0, u1, deg, beta, r, dt, h, x, y):  # pragma: no cover
    """Phase A: primal neighbour sums (susceptibles only) and the day's event indicators."""
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


@numba.njit(parallel=True, fastmath=True, cache=True)
def _events_bits(indptr, indices, bits, S, I, u0, u1, deg, beta, r, dt, h, x, y):  # pragma: no cover
    """Phase A for unit weights: the infected flags are bit-packed (a 32× smaller gather)."""
    n = indptr.size - 1
    for m in numba.prange(n):
        x[m] = 0.0
        y[m] = 0.0
        if S[m] == 0 and I[m] == 0:
            continue
        y[m] = 1.0 if u1[m] < r else 0.0
        if S[m] == 1:
            acc = 0
            for e in range(indptr[m], indptr[m + 1]):
                k = indices[e]
                acc += (bits[k >> 6] >> np.uint64(k & 63)) & np.uint64(1)
            h[m] = acc
            q = 1.0 - math.exp(-beta * dt * acc / deg[m])
            x[m] = 1.0 if u0[m] < q else 0.0


@numba.njit(parallel=True, cache=True)
def _pack(I, bits):  # pragma: no cover - compiled
    n = I.size
    for w in numba.prange(bits.size):
        word = np.uint64(0)
        for b in range(64):
            i = w * 64 + b
            if i < n and I[i] == 1.0:
                word |= np.uint64(1) << np.uint64(b)
        bits[w] = word


@numba.njit(parallel=True, fastmath=True, cache=True)
def _messages(indptr, indices, weights, rev, S, x, y, deg, beta, dt, dIt, cI, J, inflow):  # pragma: no cover
    """Phase B: per-edge inflow into susceptible m from neighbour k (non-backtracking).

    msg = w (dI_k − part of dI_k that came from m); of that extra infectious mass, J has
    already infected m in the alternative path and cannot infect it again: the inflow is
    (1 − x_m) β Δt / n_m · (msg − J). J then follows k's mass: it recovers with k (y_k) and
    vanishes when the primal path infects k too (x_k)."""
    n = indptr.size - 1
    P = dIt.shape[1]
    for m in numba.prange(n):
        if S[m] == 0:
            continue
        rate = (1.0 - x[m]) * beta * dt / deg[m]
        for e in range(indptr[m], indptr[m + 1]):
            k = indices[e]
            keep = (1.0 - y[k]) * (1.0 - S[k] * x[k])
            r = rev[e]
            for p in range(P):
                mv = weights[e] * (dIt[k, p] - cI[r, p])
                f = rate * (mv - J[e, p])
                inflow[e, p] = f
                J[e, p] = (J[e, p] + f) * keep


@numba.njit(parallel=True, fastmath=True, cache=True)
def _advance(indptr, S, I, x_arr, y_arr, h, deg, r, dr, dt, inj_beta, inj_gamma,
             inflow, cS, cI, oS, oI, dIt, out_new, out_dS, out_dI, out_dnew):  # pragma: no cover
    """Phase C: primal update and the tangent components of every agent.

    Per component (own, or per incoming edge): d new = cS·x + inflow, d rec = cI·y (+ the γ
    injection on the own component), cS −= d new, cI += d new − d rec. The own component of
    a susceptible not infected today gets (1 − x) Δt h / n for β (the smoothed right
    stochastic derivative); an infectious agent not recovering gets (1 − y)/(1 − r) ∂r/∂γ."""
    n = indptr.size - 1
    P = cS.shape[1]
    for m in numba.prange(n):
        s = S[m]
        i = I[m]
        out_new[m] = 0.0
        if s == 0 and i == 0:
            for p in range(P):
                dIt[m, p] = 0.0
                out_dnew[m, p] = 0.0
                out_dS[m, p] = 0.0
                out_dI[m, p] = 0.0
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
            tot_new = dnew
            tot_S = oS[m, p]
            tot_I = oI[m, p]
            for e in range(indptr[m], indptr[m + 1]):
                cs = cS[e, p]
                ci = cI[e, p]
                f = inflow[e, p] if s == 1 else 0.0
                if cs == 0.0 and ci == 0.0 and f == 0.0:
                    continue
                dn = cs * x + f
                dc = ci * y
                cS[e, p] = cs - dn
                cI[e, p] = ci + dn - dc
                tot_new += dn
                tot_S += cs - dn
                tot_I += ci + dn - dc
            dIt[m, p] = tot_I
            out_dnew[m, p] = tot_new
            out_dS[m, p] = tot_S
            out_dI[m, p] = tot_I
        new = s * x
        rec = i * y
        out_new[m] = new
        S[m] = s - new
        I[m] = i + new - rec


def run_sir_nonbacktracking(
    layer: CSRLayer, S0: torch.Tensor, I0: torch.Tensor, beta: float, gamma: float, days: int,
    seed: int, dt: float = 1.0, progress=None, tangents: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Primal SIR run and (``tangents``) forward-mode tangents for (β, γ).

    Returns (series [days+1, 4] of S, I, R, new infections; jacobian [days+1, 4, 2];
    final S; final I; last day's new infections). Same events as the substep path of
    ``simulate`` (same uniforms, same formulas, float32 probabilities)."""
    n = layer.n
    indptr, indices = layer.indptr.numpy(), layer.indices.numpy()
    unit = layer.weights is None
    weights = (layer.weights.numpy() if layer.weights is not None else np.ones(layer.nnz, np.float32))
    bits = np.zeros((layer.n + 63) // 64, dtype=np.uint64)
    rev = reverse_edges(layer)
    if (rev < 0).any():
        raise ValueError("the contact graph is not symmetric")
    deg = np.maximum(layer.degree().numpy().astype(np.float64), 1.0)
    S = S0.detach().numpy().astype(np.float32).copy()
    I = I0.detach().numpy().astype(np.float32).copy()
    P = 2 if tangents else 0
    nnz = layer.nnz
    cS = np.zeros((nnz, P), np.float32)  # edge-major: one cache line per edge for all parameters
    cI = np.zeros((nnz, P), np.float32)
    inflow = np.zeros((nnz, P), np.float32)
    J = np.zeros((nnz, P), np.float32)
    xa = np.zeros(n, np.float32)
    ya = np.zeros(n, np.float32)
    oS = np.zeros((n, P), np.float64)
    oI = np.zeros((n, P), np.float64)
    dIt = np.zeros((n, P), np.float32)
    h = np.zeros(n, np.float64)
    out_new = np.zeros(n, np.float32)
    out_dS = np.zeros((n, P), np.float64)
    out_dI = np.zeros((n, P), np.float64)
    out_dnew = np.zeros((n, P), np.float64)
    inj_beta = np.array([1.0, 0.0])[:P]
    inj_gamma = np.array([0.0, 1.0])[:P]
    r = -math.expm1(-gamma * dt)
    dr = dt * math.exp(-gamma * dt)
    series = np.zeros((days + 1, 4))
    jac = np.zeros((days + 1, 4, 2))
    series[0] = (S.sum(dtype=np.float64), I.sum(dtype=np.float64), n - S.sum(dtype=np.float64)
                 - I.sum(dtype=np.float64), I.sum(dtype=np.float64))
    out_new[:] = I
    threads = follow_torch_threads()
    for day in range(days):
        u = counter_uniforms(seed, day, n, torch.device("cpu"), 2).numpy()
        follow_torch_threads()
        if unit:
            _pack(I, bits)
            _events_bits(indptr, indices, bits, S, I, u[0], u[1], deg, beta, r, dt, h, xa, ya)
        else:
            _events(indptr, indices, weights, S, I, u[0], u[1], deg, beta, r, dt, h, xa, ya)
        if P:
            _messages(indptr, indices, weights, rev, S, xa, ya, deg, beta, dt, dIt, cI, J, inflow)
        _advance(indptr, S, I, xa, ya, h, deg, r, dr, dt, inj_beta, inj_gamma,
                 inflow, cS, cI, oS, oI, dIt, out_new, out_dS, out_dI, out_dnew)
        s_tot, i_tot = float(S.sum(dtype=np.float64)), float(I.sum(dtype=np.float64))
        series[day + 1] = (s_tot, i_tot, n - s_tot - i_tot, float(out_new.sum(dtype=np.float64)))
        if P:
            dS, dI = out_dS.sum(0), out_dI.sum(0)
            jac[day + 1, 0], jac[day + 1, 1], jac[day + 1, 2] = dS, dI, -dS - dI
            jac[day + 1, 3] = out_dnew.sum(0)
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
            tangents=beta.requires_grad or gamma.requires_grad)
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
            float(fwAD.unpack_dual(model.gamma).primal), days, seed, progress=progress)
        tan = sum(torch.from_numpy(jac[..., j]).float() * t.float() for j, t in enumerate(tangents) if t is not None)
        series = fwAD.make_dual(torch.from_numpy(series_np).float(), tan)
        out.update(S=torch.from_numpy(s), I=torch.from_numpy(i), new=torch.from_numpy(new))
        return _named(series, out)
    grad = torch.is_grad_enabled() and (model.beta.requires_grad or model.gamma.requires_grad)
    beta, gamma = (model.beta, model.gamma) if grad else (model.beta.detach(), model.gamma.detach())
    series = _FusedSIR.apply(beta, gamma, layer, state["S"], state["I"], days, seed, progress, out)
    return _named(series, out)


def _named(series: torch.Tensor, out: dict[str, torch.Tensor]):
    cols = series.unbind(1)
    named = {"S": cols[0], "I": cols[1], "R": cols[2], "new_infections": cols[3]}
    final = {"S": out["S"], "I": out["I"], "R": 1.0 - out["S"] - out["I"], "new_infections": out["new"]}
    return named, final

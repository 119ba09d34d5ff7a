"""Fused CPU kernels for the archetype step (numba): one pass to group agents, one to sample.

``observe_kernel`` computes each agent's archetype id and the (archetype, area) membership
counts and per-area infectious counts in a single sweep; ``sample_kernel`` draws the three
actions per agent from ONE uniform by conditional (sequential inverse-CDF) sampling:
a = 1[u < p]; the leftover u/p or (u − p)/(1 − p) is again uniform and independent of a,
so it samples the next action. The torch path in ``policy`` does the same arithmetic and is
used on CUDA and for estimators other than straight-through.
"""

from __future__ import annotations

import numba
import numpy as np

__all__ = ["observe_kernel", "sample_kernel"]


@numba.njit(cache=True, fastmath=False)
def observe_kernel(static, area, s, e, i, n_areas, ids, pair, area_inf):  # pragma: no cover - compiled
    """ids[j] = static[j] + status; pair[k * n_areas + area] += 1; area_inf[area] += I."""
    pair[:] = 0.0
    area_inf[:] = 0.0
    for j in range(static.size):
        status = round(3.0 - 3.0 * s[j] - 2.0 * e[j] - i[j])
        status = min(max(status, 0), 3)
        k = static[j] + status
        ids[j] = k
        a = area[j]
        pair[k * n_areas + a] += 1.0
        area_inf[a] += i[j]


@numba.njit(cache=True, fastmath=False)
def sample_kernel(ids, table, inv_p, inv_q, u, iso_effect, mask_effect, sensitivity,
                  infectious, tested, reduction, test, positive, fuse_positive):  # pragma: no cover
    """Per agent: isolate, mask, test ~ Bernoulli(table[k]) from one uniform; writes the
    contact reduction 1 − (1 − iso_effect·iso)(1 − mask_effect·mask), and either the test
    flag (``fuse_positive`` False) or max(tested, infectious·test·sensitivity) (True).

    Branch-free (arithmetic select) with reciprocal tables inv_p = 1/p, inv_q = 1/(1 − p)
    (float32, clamped), so it matches ``policy.conditional_draws`` bit for bit."""
    one = np.float32(1.0)
    ie = np.float32(iso_effect)
    me = np.float32(mask_effect)
    sens = np.float32(sensitivity)
    for j in range(ids.size):
        k = ids[j]
        p, rp, rq = table[k], inv_p[k], inv_q[k]
        x = u[j]
        h0 = np.float32(x < p[0])
        x = h0 * (x * rp[0]) + (one - h0) * ((x - p[0]) * rq[0])
        h1 = np.float32(x < p[1])
        x = h1 * (x * rp[1]) + (one - h1) * ((x - p[1]) * rq[1])
        h2 = np.float32(x < p[2])
        reduction[j] = one - (one - ie * h0) * (one - me * h1)
        if fuse_positive:
            positive[j] = max(tested[j], infectious[j] * h2 * sens)
        else:
            test[j] = h2

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


@numba.njit(cache=True, inline="always")
def _draw(p, x):  # pragma: no cover - compiled
    """One Bernoulli(p) from uniform x, and the leftover uniform."""
    if x < p:
        return 1.0, x / p
    if p < 1.0:
        return 0.0, (x - p) / (1.0 - p)
    return 0.0, 0.0


@numba.njit(parallel=True, cache=True, fastmath=False)
def sample_kernel(ids, table, u, iso_effect, mask_effect, reduction, test):  # pragma: no cover
    """Per agent: isolate, mask, test ~ Bernoulli(table[k]) from one uniform; writes the
    contact reduction 1 − (1 − iso_effect·iso)(1 − mask_effect·mask) and the test flag."""
    for j in numba.prange(ids.size):
        k = ids[j]
        x = u[j]
        iso, x = _draw(table[k, 0], x)
        mask, x = _draw(table[k, 1], x)
        tst, x = _draw(table[k, 2], x)
        reduction[j] = 1.0 - (1.0 - iso_effect * iso) * (1.0 - mask_effect * mask)
        test[j] = tst

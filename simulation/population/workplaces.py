"""Who works with whom: workers assigned to workplaces so the work matrix's contacts fit.

Work contacts are drawn per band pair (a, b) from the reciprocal work matrix and placed in
workplaces in proportion to the a–b pairs each holds (:func:`contacts.matrix_edges`). When a
band's workers are few and scattered at random, its pairs are too few for the contacts the
matrix asks of it: the same pair is drawn again and again and the duplicates collapse. Oxford
(UK matrix) lost 56 % of its 15–19 × 15–19 work contacts that way (1.6 % of its workers are
15–19 year-olds, 2,320 such pairs for 4,527 wanted edges), which alone put the work layer 14 %
from the reciprocal matrix.

:func:`refine_workplaces` swaps workers of different bands between workplaces (greedy, like
the household refinement), accepting a swap when it lowers the expected number of drawn
contacts lost to duplicates, Σ_ab [m_ab − P_ab (1 − e^{−m_ab / P_ab})] (m_ab wanted edges,
P_ab pairs available; a pair count of zero loses all m_ab). Every workplace keeps its size and
every worker stays employed, so no marginal changes; the optimum spreads the pair capacity in
proportion to the wanted contacts (P ∝ m: age-assortative workplaces, as the matrix says).
"""

from __future__ import annotations

import numba
import numpy as np

from simulation.population.contacts import CONTACT_BANDS, reciprocal_totals

__all__ = ["expected_lost_edges", "refine_workplaces", "wanted_edges"]


def wanted_edges(matrix: np.ndarray, band_population: np.ndarray) -> np.ndarray:
    """Symmetric [16, 16]: mean undirected edges :func:`contacts.matrix_edges` draws per band
    pair (the reciprocal totals, halved on the diagonal)."""
    x = reciprocal_totals(matrix, band_population)
    out = x.copy()
    np.fill_diagonal(out, np.diag(x) / 2.0)
    return out


def _pair_counts(group: np.ndarray, band: np.ndarray, n_groups: int) -> tuple[np.ndarray, np.ndarray]:
    nb = CONTACT_BANDS
    cnt = np.zeros((n_groups, nb), np.int64)
    np.add.at(cnt, (group, band), 1)
    c = cnt.astype(np.float64)
    pairs = c.T @ c
    np.fill_diagonal(pairs, (np.diag(pairs) - c.sum(axis=0)) / 2.0)
    return cnt, pairs


def expected_lost_edges(group: np.ndarray, band: np.ndarray, want: np.ndarray) -> tuple[float, float]:
    """(expected edges lost to duplicate draws, edges wanted) for members in ``group`` with
    five-year ``band`` and wanted edges ``want`` (:func:`wanted_edges`)."""
    if group.size == 0:
        return 0.0, 0.0
    _, pairs = _pair_counts(group, band, int(group.max()) + 1)
    iu = np.triu_indices(CONTACT_BANDS)
    m, p = want[iu], pairs[iu]
    with np.errstate(divide="ignore", invalid="ignore"):
        kept = np.where(p > 0, p * -np.expm1(-m / np.where(p > 0, p, 1.0)), 0.0)
    return float((m - kept).sum()), float(m.sum())


@numba.njit(cache=True, inline="always")
def _lost(m, p):  # pragma: no cover - compiled
    if m <= 0.0:
        return 0.0
    if p <= 0.0:
        return m
    return m + p * np.expm1(-m / p)


@numba.njit(cache=True)
def _refine(group, band, cnt, pairs, want, steps, seed):  # pragma: no cover - compiled
    """Greedy swaps of two workers (different bands, different workplaces); ``group``,
    ``cnt`` and ``pairs`` are updated in place. Returns the number of accepted swaps."""
    np.random.seed(seed)
    nb = want.shape[0]
    n = group.size
    d = np.zeros(nb)
    accepted = 0
    for _ in range(steps):
        p = np.random.randint(n)
        q = np.random.randint(n)
        g, h = group[p], group[q]
        a, b = band[p], band[q]
        if g == h or a == b:
            continue
        # pair-count changes: row a gets d[k] = c_hk − c_gk, row b gets −d[k] (k ∉ {a, b})
        for k in range(nb):
            d[k] = cnt[h, k] - cnt[g, k]
        d_ab = (cnt[g, a] - cnt[g, b] - 1) + (cnt[h, b] - cnt[h, a] - 1)
        d_aa = cnt[h, a] - cnt[g, a] + 1
        d_bb = cnt[g, b] - cnt[h, b] + 1
        delta = 0.0
        for k in range(nb):
            if k == a or k == b:
                continue
            delta += _lost(want[a, k], pairs[a, k] + d[k]) - _lost(want[a, k], pairs[a, k])
            delta += _lost(want[b, k], pairs[b, k] - d[k]) - _lost(want[b, k], pairs[b, k])
        delta += _lost(want[a, b], pairs[a, b] + d_ab) - _lost(want[a, b], pairs[a, b])
        delta += _lost(want[a, a], pairs[a, a] + d_aa) - _lost(want[a, a], pairs[a, a])
        delta += _lost(want[b, b], pairs[b, b] + d_bb) - _lost(want[b, b], pairs[b, b])
        if delta >= -1e-9:
            continue
        for k in range(nb):
            if k == a or k == b:
                continue
            pairs[a, k] += d[k]
            pairs[k, a] += d[k]
            pairs[b, k] -= d[k]
            pairs[k, b] -= d[k]
        pairs[a, b] += d_ab
        pairs[b, a] += d_ab
        pairs[a, a] += d_aa
        pairs[b, b] += d_bb
        cnt[g, a] -= 1
        cnt[g, b] += 1
        cnt[h, b] -= 1
        cnt[h, a] += 1
        group[p], group[q] = h, g
        accepted += 1
    return accepted


def refine_workplaces(
    rng: np.random.Generator, group: np.ndarray, band: np.ndarray, want: np.ndarray, steps_per_worker: float
) -> np.ndarray:
    """Workplace per worker after ``steps_per_worker`` swap proposals per worker that lower
    the expected contacts lost to duplicate draws (module docstring); sizes are kept."""
    out = np.ascontiguousarray(group, dtype=np.int64).copy()
    if out.size < 2 or steps_per_worker <= 0:
        return out
    cnt, pairs = _pair_counts(out, np.asarray(band, np.int64), int(out.max()) + 1)
    _refine(out, np.ascontiguousarray(band, dtype=np.int64), cnt, pairs, np.ascontiguousarray(want, np.float64),
            int(steps_per_worker * out.size), int(rng.integers(2**31)))
    return out

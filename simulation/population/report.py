"""How well a built population reproduces its marginals and the published contact matrices."""

from __future__ import annotations

import numpy as np

from simulation.population.build import AreaPopulation
from simulation.population.contacts import (
    ContactMatrices,
    age_mixing,
    contact_band,
    reciprocal_totals,
    relative_frobenius,
)
from simulation.population.households import grandparent_share, three_generation_share
from simulation.population.marginals import AgeBand, AreaMarginals

__all__ = ["area_report", "city_report", "household_bound", "mixing_report", "tvd"]


def tvd(p: np.ndarray, q: np.ndarray) -> float:
    """Total variation distance ½ Σ |p − q| between two distributions (normalised here)."""
    p, q = np.asarray(p, float).ravel(), np.asarray(q, float).ravel()
    return 0.5 * float(np.abs(p / p.sum() - q / q.sum()).sum())


def _band_index(age: np.ndarray, bands: tuple[AgeBand, ...]) -> np.ndarray:
    edges = np.array([b.lo for b in bands[1:]])
    return np.searchsorted(edges, age, side="right")


def area_report(m: AreaMarginals, bands: tuple[AgeBand, ...], ap: AreaPopulation) -> dict[str, object]:
    """TVD of every marginal the area was built from (rates as per-band Bernoulli TVD, max)."""
    a = ap.attributes
    age = a["age"].astype(np.int64)
    bi = _band_index(age, bands)
    nb = len(bands)
    got = np.bincount(bi * 2 + a["sex"], minlength=nb * 2).reshape(nb, 2)
    hh_sizes = np.bincount(np.bincount(a["household"]))[1:]
    k = m.household_share.size
    hh = np.zeros(k)
    hh[: min(k, hh_sizes.size)] = hh_sizes[:k]
    per_band = np.maximum(np.bincount(bi, minlength=nb), 1)
    emp = np.bincount(bi, weights=a["employed"], minlength=nb) / per_band
    enr = np.bincount(bi, weights=a["enrolled"], minlength=nb) / per_band
    wp = np.bincount(a["workplace"][a["workplace"] >= 0])
    sc = np.bincount(a["school"][a["school"] >= 0])

    def bracket_counts(sizes: np.ndarray, brackets: np.ndarray) -> np.ndarray:
        idx = np.clip(np.searchsorted(brackets[:, 1], sizes, side="left"), 0, len(brackets) - 1)
        return np.bincount(idx, minlength=len(brackets)).astype(np.float64)

    def bracket_tvd(sizes: np.ndarray, brackets: np.ndarray) -> float:
        return tvd(bracket_counts(sizes, brackets), brackets[:, 2]) if sizes.size else 0.0

    return {
        "area": m.code,
        "n": ap.n,
        "households": int(hh_sizes.sum()),
        "tvd": {
            "age_sex": tvd(got, m.age_sex),
            "household_size": tvd(hh, m.household_share),
            "employment": float(np.max(np.abs(emp - m.employment))),
            "enrolment": float(np.max(np.abs(enr - m.enrolment))),
            "workplace_size": bracket_tvd(wp[wp > 0], m.workplace_sizes),
            "school_size": bracket_tvd(sc[sc > 0], m.school_sizes),
        },
        "ipf": {"iterations": ap.ipf.iterations, "max_error": ap.ipf.max_error},
        # multigenerational and grandparent-and-grandchild households by age (households.py)
        # vs the published shares the household refinement holds them near (None: not given)
        "multigenerational": {"share": three_generation_share(age, a["household"]), "published": m.multigenerational},
        "grandparent": {"share": grandparent_share(age, a["household"]), "published": m.grandparent},
        "groups": {
            "workplace_size": bracket_counts(wp[wp > 0], m.workplace_sizes).tolist(),
            "school_size": bracket_counts(sc[sc > 0], m.school_sizes).tolist(),
        },
    }


def city_report(areas: list[AreaMarginals], reports: list[dict[str, object]]) -> dict[str, float]:
    """TVD of the workplace and school size brackets pooled over all areas (each area's
    target shares weighted by its number of groups): group counts per area are small, so
    per-area TVD is bounded below by rounding."""
    out = {}
    for key, attr in (("workplace_size", "workplace_sizes"), ("school_size", "school_sizes")):
        got, want = None, None
        for m, r in zip(areas, reports, strict=True):
            counts = np.asarray(r["groups"][key])  # type: ignore[index]
            share = getattr(m, attr)[:, 2] / getattr(m, attr)[:, 2].sum()
            if got is None or got.shape != counts.shape:
                if got is not None:  # areas with different bracket tables: not poolable
                    return {}
                got, want = np.zeros_like(counts), np.zeros_like(counts)
            got += counts
            want += share * counts.sum()
        if got is not None and want is not None and got.sum() > 0:
            out[key] = tvd(got, want)
    return out


def mixing_report(
    layers: dict[str, tuple[np.ndarray, np.ndarray]], age: np.ndarray, matrices: ContactMatrices
) -> dict[str, dict[str, float]]:
    """Per layer: relative Frobenius error of its age-mixing matrix against the published one
    (raw; after the best layer-weight scale), the floor no undirected graph can beat (the
    closest reciprocal matrix's own error), the error against that reciprocal matrix, and
    mean contacts per person."""
    band = contact_band(np.asarray(age, np.int64))
    pop = np.bincount(band, minlength=16).astype(float)
    out = {}
    for name, (indptr, indices) in layers.items():
        c = age_mixing(indptr, indices, band)
        raw, _ = relative_frobenius(c, matrices[name])
        recip = reciprocal_totals(matrices[name], pop) / np.maximum(pop, 1.0)[:, None]
        floor, _ = relative_frobenius(recip, matrices[name])
        vs_recip, _ = relative_frobenius(c, recip)
        vs_recip_scaled, scale_r = relative_frobenius(c, recip, fit_scale=True)
        shape, scale = relative_frobenius(c, matrices[name], fit_scale=True)
        out[name] = {
            "rel_frobenius": raw,
            "reciprocity_floor": floor,
            "rel_frobenius_reciprocal": vs_recip,
            "rel_frobenius_reciprocal_scaled": vs_recip_scaled,
            "rel_frobenius_scaled": shape,
            "best_layer_weight": scale,
            "mean_contacts": float(indices.size / max(band.size, 1)),
            "published_mean_contacts": float(
                (matrices[name].sum(axis=1) * np.bincount(band, minlength=16)).sum() / max(band.size, 1)
            ),
        }
    return out


def household_bound(
    band_population: np.ndarray, persons_per_size: np.ndarray, target: np.ndarray, scale_free: bool = False,
    penalty: float = 300.0,
) -> tuple[float, float]:
    """Lower bound on ‖s·C − target‖_F / ‖target‖_F for the household layer of *any*
    assignment of people (five-year bands ``band_population``) to cliques of the census
    household sizes (``persons_per_size[h-1]`` people in households of size h), with s = 1
    or (``scale_free``) the best s. It solves a relaxation: a joint J[a, h] with both margins, per-size
    symmetric directed contact totals T^h with row sums (h − 1)·J[a, h], children (< 15)
    never alone and each with at least one contact aged 15+, one 15+ person per household.
    Bounded least squares (scipy ``lsq_linear``) with the equalities as rows weighted by
    ``penalty``. Returns (bound, s)."""
    from scipy.optimize import lsq_linear

    nb, k = target.shape[0], len(persons_per_size)
    pop = np.asarray(band_population, float)
    share = pop / pop.sum()
    ph = np.asarray(persons_per_size, float) / float(np.sum(persons_per_size))
    upper = {(a, b): i for i, (a, b) in enumerate((a, b) for a in range(nb) for b in range(a, nb))}
    n_t = len(upper)
    t_off = {h: (h - 2) * n_t for h in range(2, k + 1)}
    j_off = (k - 1) * n_t
    sa_off = j_off + nb * k
    sc_off = sa_off + k
    s_idx = sc_off + 3 * k
    nv = s_idx + 1
    rows: list[np.ndarray] = []
    rhs: list[float] = []

    def add(coefs: list[tuple[int, float]], r: float, w: float) -> None:
        row = np.zeros(nv)
        for i, c in coefs:
            row[i] += c
        rows.append(row * w)
        rhs.append(r * w)

    def t(h: int, a: int, b: int) -> int:
        return t_off[h] + upper[(min(a, b), max(a, b))]

    def j(a: int, h: int) -> int:
        return j_off + a * k + h - 1

    live = [a for a in range(nb) if share[a] > 0]
    for a in live:  # objective: D_ab = Σ_h T^h_ab / N_a against the target
        for b in range(nb):
            add([(t(h, a, b), 1.0 / share[a]) for h in range(2, k + 1)], float(target[a, b]), 1.0)
    n_obj = len(rows)
    for h in range(2, k + 1):
        for a in range(nb):
            add([(t(h, a, b), 1.0) for b in range(nb)] + [(j(a, h), -(h - 1.0))], 0.0, penalty)
        for a in range(3):  # every child has a contact aged 15+
            add([(t(h, a, b), 1.0) for b in range(3, nb)] + [(sc_off + a * k + h - 1, -1.0), (j(a, h), -1.0)],
                0.0, penalty)
    for a in range(nb):
        add([(j(a, h), 1.0) for h in range(1, k + 1)] + [(s_idx, -share[a])], 0.0, penalty)
    for h in range(1, k + 1):
        add([(j(a, h), 1.0) for a in range(nb)] + [(s_idx, -ph[h - 1])], 0.0, penalty)
        add([(j(a, h), 1.0) for a in range(3, nb)] + [(sa_off + h - 1, -1.0), (s_idx, -ph[h - 1] / h)], 0.0, penalty)
    lb, ub = np.zeros(nv), np.full(nv, np.inf)
    for a in range(3):  # children never live alone
        ub[j(a, 1)] = 1e-12
    if not scale_free:
        lb[s_idx], ub[s_idx] = 1.0, 1.0 + 1e-12
    a_mat, r_vec = np.array(rows), np.array(rhs)
    x = lsq_linear(a_mat, r_vec, bounds=(lb, ub), method="bvls", max_iter=5000, tol=1e-12).x
    resid = a_mat[:n_obj] @ x - r_vec[:n_obj]
    return float(np.linalg.norm(resid) / np.linalg.norm(target[live])), float(x[s_idx])

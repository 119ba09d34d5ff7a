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
from simulation.population.marginals import AgeBand, AreaMarginals

__all__ = ["area_report", "city_report", "mixing_report", "tvd"]


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

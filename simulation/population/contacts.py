"""Setting-specific contact matrices (Prem et al. 2017) and contacts drawn to match them.

A matrix ``M[a, b]`` is the mean number of daily contacts a person of age band ``a`` has
with people of band ``b`` in one setting (16 five-year bands 0-4 … 75+). Edges between
bands are drawn in proportion to the reciprocal total ``½(N_a M_ab + N_b M_ba)`` and placed
in groups (schools, workplaces, neighbourhoods) in proportion to the pairs each group holds.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass

import numpy as np

from simulation.population.errors import PopulationError
from simulation.population.marginals import DATA_DIR

__all__ = [
    "CONTACT_BANDS",
    "SETTINGS",
    "ContactMatrices",
    "age_mixing",
    "contact_band",
    "load_contact_matrices",
    "matrix_edges",
    "reciprocal_totals",
    "relative_frobenius",
]

CONTACT_BANDS = 16  # 0-4, 5-9, …, 70-74, 75+
SETTINGS = ("household", "school", "work", "community")


def contact_band(age: np.ndarray) -> np.ndarray:
    """Five-year contact band of an age in years (75+ is band 15)."""
    return np.minimum(np.asarray(age) // 5, CONTACT_BANDS - 1).astype(np.int64)


@dataclass(frozen=True)
class ContactMatrices:
    """One 16×16 matrix per setting, with the name of the bundled set it came from."""

    name: str
    matrices: dict[str, np.ndarray]

    def __getitem__(self, setting: str) -> np.ndarray:
        return self.matrices[setting]


def load_contact_matrices(name: str) -> ContactMatrices:
    """Bundled ``simulation/data/contacts/<name>_<setting>.csv`` (e.g. ``prem2017_usa``)."""
    out = {}
    for setting in SETTINGS:
        path = DATA_DIR / "contacts" / f"{name}_{setting}.csv"
        if not path.exists():
            raise PopulationError(f"no contact matrix {path.name} (choose prem2017_usa or prem2017_gbr)")
        with path.open(newline="") as f:
            rows = list(csv.reader(f))[1:]
        m = np.array([[float(x) for x in r[1:]] for r in rows])
        if m.shape != (CONTACT_BANDS, CONTACT_BANDS) or np.any(m < 0):
            raise PopulationError(f"{path.name}: need a non-negative 16×16 matrix")
        out[setting] = m
    return ContactMatrices(name, out)


def matrix_edges(
    rng: np.random.Generator,
    members: np.ndarray,
    group: np.ndarray,
    band: np.ndarray,
    band_population: np.ndarray,
    matrix: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Undirected edges among ``members`` (agent ids) inside their ``group`` whose band-by-band
    totals are ``½(N_a M_ab + N_b M_ba)``, N the ``band_population`` (everyone, not only members).

    Each edge picks a group in proportion to the (a, b) pairs it holds, then a uniform member
    of band a and one of band b there. Pairs no group can hold are skipped.
    """
    if members.size == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    nb = CONTACT_BANDS
    n_groups = int(group.max()) + 1
    key = group.astype(np.int64) * nb + band
    order = np.argsort(key, kind="stable")
    sorted_members = members[order]
    counts = np.bincount(key, minlength=n_groups * nb).reshape(n_groups, nb)
    starts = np.concatenate([[0], np.cumsum(counts.ravel())[:-1]]).reshape(n_groups, nb)
    totals = reciprocal_totals(matrix, band_population)
    srcs, dsts = [], []
    for a in range(nb):
        ca = counts[:, a].astype(np.float64)
        if ca.sum() == 0:
            continue
        for b in range(a, nb):
            cb = counts[:, b].astype(np.float64)
            pairs = ca * (ca - 1) / 2 if a == b else ca * cb
            total = pairs.sum()
            want = totals[a, b] if a != b else totals[a, a] / 2
            m = int(rng.poisson(want)) if want > 0 else 0
            if m == 0 or total <= 0:
                continue
            cdf = np.cumsum(pairs)
            g = np.searchsorted(cdf, rng.random(m) * cdf[-1], side="right")
            g = np.minimum(g, n_groups - 1)
            i = starts[g, a] + (rng.random(m) * counts[g, a]).astype(np.int64)
            j = starts[g, b] + (rng.random(m) * counts[g, b]).astype(np.int64)
            srcs.append(sorted_members[i])
            dsts.append(sorted_members[j])
    if not srcs:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    return np.concatenate(srcs), np.concatenate(dsts)


def reciprocal_totals(matrix: np.ndarray, band_population: np.ndarray) -> np.ndarray:
    """Symmetric X[a, b]: total a–b contacts of the reciprocal matrix closest (least squares)
    to ``matrix`` for this population. A published matrix is generally not reciprocal
    (N_a M_ab ≠ N_b M_ba), so no undirected graph can reproduce it exactly."""
    n = np.maximum(np.asarray(band_population, float), 1.0)
    ia, ib = 1.0 / n[:, None], 1.0 / n[None, :]
    present = (np.asarray(band_population)[:, None] > 0) & (np.asarray(band_population)[None, :] > 0)
    return np.where(present, (matrix * ia + matrix.T * ib) / (ia**2 + ib**2), 0.0)


def age_mixing(indptr: np.ndarray, indices: np.ndarray, band: np.ndarray) -> np.ndarray:
    """C[a, b]: mean contacts a person of band a has with band b in one CSR layer."""
    nb = CONTACT_BANDS
    deg = np.diff(indptr)
    rows_band = np.repeat(band, deg)
    counts = np.bincount(rows_band * nb + band[indices], minlength=nb * nb).reshape(nb, nb)
    pop = np.bincount(band, minlength=nb).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(pop[:, None] > 0, counts / pop[:, None], 0.0)


def relative_frobenius(measured: np.ndarray, published: np.ndarray, fit_scale: bool = False) -> tuple[float, float]:
    """(‖s·C − M‖_F / ‖M‖_F, s); s = 1, or with ``fit_scale`` the least-squares scale (the
    layer weight that best matches the published intensity)."""
    c, m = np.asarray(measured, float), np.asarray(published, float)
    s = float((c * m).sum() / max((c * c).sum(), 1e-300)) if fit_scale else 1.0
    return float(np.linalg.norm(s * c - m) / np.linalg.norm(m)), s

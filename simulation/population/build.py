"""Build one area's agents and contact layers from its marginals.

1. Integer people per (age band, sex) and households per size (largest remainder).
2. IPF fits the joint (age band × sex × household size) of people to both margins; the seed
   has structural zeros for children (< 15) living alone.
3. Households: a head (adult, with the tabled head age where given) per household; the other
   members' five-year bands are drawn from the published *household* contact matrix row of
   the head (or of the previous member) and matched to the people of that size class; then
   greedy swaps of non-head members between households (``BuildOptions.household_refine``
   proposals per person) pull the household age mixing towards the reciprocal form of the
   published matrix, keeping every size, head and marginal, never leaving more children
   without a member 15–50 years older, and holding the share of three-generation households
   near the published one where ``multigenerational.csv`` gives it (:mod:`households`).
4. Enrolment and employment: exactly round(rate · people) per band; school staff come from
   the employed (one per ``students_per_staff`` students).
5. Workers are placed in workplaces at random, then swapped between workplaces
   (``BuildOptions.work_refine`` proposals per worker) so each band pair of the work matrix
   has enough pairs for its contacts (:mod:`workplaces`).
6. Schools, workplaces (sizes from the bracket tables) and neighbourhoods (contiguous runs of
   households) hold matrix-driven contacts (:func:`contacts.matrix_edges`). A pair already
   joined in an earlier layer (household, then school, work, community) is not repeated, so
   the merged graph has unit weights when the layer weights are one.

Agents are numbered household by household, so a household, and a neighbourhood, occupy
contiguous ids (cache locality for the neighbour sum).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numba
import numpy as np

from simulation.population.contacts import ContactMatrices, contact_band, matrix_edges
from simulation.population.graph import build_csr
from simulation.population.households import compose_households
from simulation.population.ipf import IPFResult, integerize, ipf
from simulation.population.marginals import AgeBand, AreaMarginals
from simulation.population.workplaces import refine_workplaces, wanted_edges

__all__ = ["LAYERS", "AreaPopulation", "BuildOptions", "build_area"]

LAYERS = ("household", "school", "work", "community")


@dataclass(frozen=True)
class BuildOptions:
    """Knobs of the generator that no census table fixes."""

    neighbourhood_size: int = 2_000  # people per community group
    students_per_staff: float = 12.0  # school staff drawn from the employed
    # swap proposals per person that pull household age mixing towards the published matrix
    # (reciprocal form); 0 = the composition from the matrix rows alone
    household_refine: float = 5.0
    # swap proposals per worker that move workers between workplaces so the work matrix's
    # contacts find enough pairs (:mod:`workplaces`); 0 = workers placed at random
    work_refine: float = 5.0
    # the household refinement keeps the shares of multigenerational and of grandparent-and-
    # grandchild households within this (absolute) distance of the area's published shares
    # (multigenerational.csv), where given
    multigenerational_tolerance: float = 0.01
    layer_weights: Mapping[str, float] = field(default_factory=lambda: {k: 1.0 for k in LAYERS})


@dataclass
class AreaPopulation:
    """One area: attributes with local ids 0..n-1 and one local CSR per layer."""

    n: int
    attributes: dict[str, np.ndarray]
    layers: dict[str, tuple[np.ndarray, np.ndarray]]  # indptr int64, indices int32
    ipf: IPFResult
    targets: dict[str, np.ndarray]


@numba.njit(cache=True)
def _not_in(indptr, indices, src, dst):  # pragma: no cover - compiled
    """True where the pair (src, dst) is not an edge of the CSR (sorted rows)."""
    keep = np.ones(src.size, dtype=np.bool_)
    for k in range(src.size):
        s, d = src[k], dst[k]
        lo, hi = indptr[s], indptr[s + 1]
        while lo < hi:
            mid = (lo + hi) // 2
            if indices[mid] < d:
                lo = mid + 1
            else:
                hi = mid
        if lo < indptr[s + 1] and indices[lo] == d:
            keep[k] = False
    return keep


def _sample_sizes(rng: np.random.Generator, brackets: np.ndarray, total: int) -> np.ndarray:
    """Group sizes holding ``total`` people: groups per bracket in proportion to the
    establishment counts (largest remainder, so the size distribution is reproduced), sizes
    uniform within a bracket, then moved within their brackets to sum to ``total`` (so the
    bracket counts stay at the rounding floor; a proportional rescale only when the brackets
    cannot hold ``total``), in random order."""
    if total <= 0:
        return np.empty(0, np.int64)
    p = brackets[:, 2] / brackets[:, 2].sum()
    mean = float((p * (brackets[:, 0] + brackets[:, 1]) / 2).sum())
    n_groups = max(1, int(round(total / mean)))
    per = integerize(p, n_groups)
    k = np.repeat(np.arange(p.size), per)
    lo, hi = brackets[k, 0].astype(np.int64), brackets[k, 1].astype(np.int64)
    sizes = np.minimum(lo + (rng.random(k.size) * (hi - lo + 1)).astype(np.int64), hi)
    delta = total - int(sizes.sum())
    room = hi - sizes if delta > 0 else sizes - lo
    if delta and 0 < abs(delta) <= int(room.sum()):
        # each group moves toward its bracket's edge in proportion to its room: ceil(room·r)
        # ≤ room for r ≤ 1, so no size leaves its bracket
        sizes = sizes + np.sign(delta) * integerize(room.astype(np.float64), abs(delta))
    elif delta:  # the brackets cannot hold ``total``: rescale (keeps the number of groups)
        sizes = integerize(sizes.astype(np.float64), total)
    sizes = sizes[rng.permutation(sizes.size)]
    return sizes[sizes > 0]


def _assign_groups(rng: np.random.Generator, members: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Group id per member (random order), groups of the given sizes."""
    gid = np.repeat(np.arange(sizes.size), sizes)[: members.size]
    return gid[rng.permutation(members.size)]


def _local_groups(sizes: np.ndarray) -> np.ndarray:
    """Group id per member when members, in order, fill groups of these sizes in turn."""
    return np.repeat(np.arange(sizes.size), sizes)


def _exact_share(rng: np.random.Generator, band: np.ndarray, rate: np.ndarray) -> np.ndarray:
    """A boolean mask with exactly round(rate[b] · people of band b) True per band."""
    out = np.zeros(band.size, dtype=bool)
    order = np.argsort(band, kind="stable")
    counts = np.bincount(band, minlength=rate.size)
    start = 0
    for b, c in enumerate(counts):
        k = int(round(rate[b] * c))
        if k:
            out[order[start + rng.permutation(c)[:k]]] = True
        start += c
    return out


def _household_pairs(sizes: np.ndarray, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    hs, hd = [], []
    for s in range(2, int(sizes.max(initial=1)) + 1):
        base = starts[sizes == s]
        for i in range(s):
            for j in range(i + 1, s):
                hs.append(base + i)
                hd.append(base + j)
    if not hs:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    return np.concatenate(hs), np.concatenate(hd)


def _band_overlap(bands: tuple[AgeBand, ...]) -> np.ndarray:
    """[marginal bands, 16]: share of a marginal band's years in each five-year contact band."""
    out = np.zeros((len(bands), 16))
    for i, b in enumerate(bands):
        years = np.minimum(np.arange(b.lo, b.hi + 1) // 5, 15)
        out[i] = np.bincount(years, minlength=16) / years.size
    return out


def _ipf_seed(bands: tuple[AgeBand, ...], k: int, head_age: np.ndarray | None, home: np.ndarray) -> np.ndarray:
    """Seed of the (age band × sex × household size) fit: expected people of each band per
    household of size h, from the head's age by size and the home contact matrix row of the
    head (data-driven interaction); without a head table, uniform. Children (< 15) never
    live alone (structural zeros)."""
    nb = len(bands)
    seed = np.ones((nb, 2, k))
    if head_age is not None:
        cond = home / np.maximum(home.sum(axis=1, keepdims=True), 1e-12)  # P(member band | head band)
        width = np.array([5.0] * 15 + [20.0])
        per_year = np.zeros((k, 16))
        for h in range(1, k + 1):
            expected = head_age[h - 1] + (h - 1) * head_age[h - 1] @ cond
            per_year[h - 1] = expected / width
        years = np.array([b.hi - b.lo + 1 for b in bands], float)
        s = (_band_overlap(bands) * years[:, None]) @ per_year.T  # [bands, k]
        seed = np.repeat((s + 1e-3 * s.max())[:, None, :], 2, axis=1)
    child = np.array([b.hi < 15 for b in bands])
    seed[child, :, 0] = 0.0
    return seed


def build_area(
    marginals: AreaMarginals,
    bands: tuple[AgeBand, ...],
    n: int,
    matrices: ContactMatrices,
    rng: np.random.Generator,
    options: BuildOptions,
) -> AreaPopulation:
    """Agents and layers of one area of ``n`` people (deterministic for the generator state)."""
    nb = len(bands)
    cells = integerize(marginals.age_sex, n)  # [bands, 2]
    k = marginals.household_share.size
    hsize = np.arange(1, k + 1)
    persons_per_size = integerize(marginals.household_share * hsize, n)
    seed = _ipf_seed(bands, k, marginals.head_age, matrices["household"])
    fit = ipf(seed, [((0, 1), cells.astype(float)), ((2,), persons_per_size.astype(float))])
    joint = np.zeros((nb, 2, k), np.int64)
    for a in range(nb):
        for s in range(2):
            if cells[a, s]:
                joint[a, s] = integerize(fit.table[a, s], int(cells[a, s]))
    flat = joint.ravel()
    idx = np.repeat(np.arange(flat.size), flat)
    band_i, rem = np.divmod(idx, 2 * k)
    sex, size_i = np.divmod(rem, k)
    lo = np.array([b.lo for b in bands])[band_i]
    hi = np.array([b.hi for b in bands])[band_i]
    age = (lo + rng.random(idx.size) * (hi - lo + 1)).astype(np.int64)

    tol = options.multigenerational_tolerance
    band_mg = (None if marginals.multigenerational is None else (marginals.multigenerational, tol),
               None if marginals.grandparent is None else (marginals.grandparent, tol))
    household, hh_sizes = compose_households(rng, size_i + 1, age, matrices["household"], marginals.head_age,
                                             options.household_refine, band_mg)
    # number agents household by household, households in random order
    hh_rank = rng.permutation(hh_sizes.size)
    order = np.lexsort((rng.random(n), hh_rank[household]))
    age, sex, band_i, household = age[order], sex[order], band_i[order], hh_rank[household[order]]
    sizes = hh_sizes[np.argsort(hh_rank)]
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    household = np.repeat(np.arange(sizes.size), sizes)  # renumbered in id order

    enrolled = _exact_share(rng, band_i, marginals.enrolment)
    employed = _exact_share(rng, band_i, marginals.employment)
    workers = np.flatnonzero(employed)  # employed students also work (part-time jobs)
    students = np.flatnonzero(enrolled)
    n_staff = min(int(round(students.size / options.students_per_staff)), workers.size)
    eligible = workers[(age[workers] >= 20) & (age[workers] < 70) & ~enrolled[workers]]
    staff = eligible[rng.permutation(eligible.size)[: min(n_staff, eligible.size)]]
    is_staff = np.zeros(n, bool)
    is_staff[staff] = True
    workers = workers[~is_staff[workers]]
    school_members = np.concatenate([students, staff])
    school = np.full(n, -1, np.int64)
    # schools are local: members in id (neighbourhood) order fill schools one after another
    school_members = np.sort(school_members)
    school[school_members] = _local_groups(_sample_sizes(rng, marginals.school_sizes, school_members.size))
    cb = contact_band(age)
    band_pop = np.bincount(cb, minlength=16).astype(np.float64)
    workplace = np.full(n, -1, np.int64)
    workplace[workers] = refine_workplaces(
        rng, _assign_groups(rng, workers, _sample_sizes(rng, marginals.workplace_sizes, workers.size)), cb[workers],
        wanted_edges(matrices["work"], band_pop), options.work_refine)
    # a small area still gets several neighbourhoods (at least ~40 when it has 2,000+ people)
    nb_size = max(50, min(options.neighbourhood_size, n // 40))
    n_nb = max(1, n // nb_size)
    neighbourhood = np.minimum(starts[household] // nb_size, n_nb - 1)

    layers: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    hs, hd = _household_pairs(sizes, starts)
    indptr, indices, _ = build_csr(n, hs, hd)
    layers["household"] = (indptr, indices)
    groups = {
        "school": (school_members, school[school_members]),
        "work": (workers, workplace[workers]),
        "community": (np.arange(n), neighbourhood),
    }
    for name, (members, gid) in groups.items():
        src, dst = matrix_edges(rng, members, gid, cb[members], band_pop, matrices[name])
        for prev_indptr, prev_indices in layers.values():
            keep = _not_in(prev_indptr, prev_indices, src, dst)
            src, dst = src[keep], dst[keep]
        indptr, indices, _ = build_csr(n, src, dst)
        layers[name] = (indptr, indices)

    occupation = np.zeros(n, np.int8)
    occupation[workers] = 2
    occupation[staff] = 2
    occupation[students] = 1
    attributes = {
        "age": age.astype(np.int8),
        "age_band": np.minimum(age // 10, 8).astype(np.int8),
        "sex": sex.astype(np.int8),
        "household": household.astype(np.int32),
        "occupation": occupation,
        "enrolled": enrolled.astype(np.int8),
        "employed": employed.astype(np.int8),
        "school": school.astype(np.int32),
        "workplace": workplace.astype(np.int32),
        "neighbourhood": neighbourhood.astype(np.int32),
    }
    targets = {"age_sex": cells, "persons_per_size": persons_per_size}
    return AreaPopulation(n, attributes, layers, fit, targets)

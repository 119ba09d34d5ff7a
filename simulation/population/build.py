"""Build one area's agents and contact layers from its marginals.

1. Integer people per (age band, sex) and households per size (largest remainder).
2. IPF fits the joint (age band × sex × household size) of people to both margins; the seed
   has structural zeros for children (< 15) living alone.
3. Households: a head (adult, with the tabled head age where given) per household; the other
   members' five-year bands are drawn from the published *household* contact matrix row of
   the head (or of the previous member) and matched to the people of that size class; then
   greedy swaps of non-head members between households (``BuildOptions.household_refine``
   proposals per person) pull the household age mixing towards the reciprocal form of the
   published matrix, keeping every size, head and marginal and never leaving more children
   without a member 15–50 years older.
4. Enrolment and employment: exactly round(rate · people) per band; school staff come from
   the employed (one per ``students_per_staff`` students).
5. Schools, workplaces (sizes from the bracket tables) and neighbourhoods (contiguous runs of
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

from simulation.population.contacts import (
    ContactMatrices,
    contact_band,
    matrix_edges,
    reciprocal_totals,
)
from simulation.population.graph import build_csr
from simulation.population.ipf import IPFResult, integerize, ipf
from simulation.population.marginals import AgeBand, AreaMarginals

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


def _match(rng: np.random.Generator, want: np.ndarray, have: np.ndarray, nb: int) -> tuple[np.ndarray, np.ndarray]:
    """Pair slots wanting band ``want`` with people of band ``have`` band by band, then the
    unmatched at random; returns (slot index, person index) pairs covering min(len) slots."""
    slot_order = np.argsort(want, kind="stable")
    pers_order = np.argsort(have, kind="stable")
    s_counts = np.bincount(want, minlength=nb)
    p_counts = np.bincount(have, minlength=nb)
    s_start = np.concatenate([[0], np.cumsum(s_counts)[:-1]])
    p_start = np.concatenate([[0], np.cumsum(p_counts)[:-1]])
    filled = np.zeros(want.size, bool)
    placed = np.zeros(have.size, bool)
    si_all, pi_all = [], []
    for b in range(nb):
        m = min(s_counts[b], p_counts[b])
        if m:
            si = slot_order[s_start[b] : s_start[b] + m]
            pi = pers_order[p_start[b] : p_start[b] + m]
            si_all.append(si)
            pi_all.append(pi)
            filled[si] = True
            placed[pi] = True
    left_slots = np.flatnonzero(~filled)
    left_people = np.flatnonzero(~placed)
    left_people = left_people[rng.permutation(left_people.size)]
    m = min(left_slots.size, left_people.size)
    si_all.append(left_slots[:m])
    pi_all.append(left_people[:m])
    return np.concatenate(si_all), np.concatenate(pi_all)


def _pick_heads(
    rng: np.random.Generator, people: np.ndarray, age: np.ndarray, cb: np.ndarray, n_hh: int, head_age: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """One head per household (adults first; ages follow ``head_age`` where given)."""
    adult = age[people] >= 18
    adults, minors = people[adult], people[~adult]
    if head_age is None or adults.size == 0 or head_age.sum() == 0:
        ordered = np.concatenate([adults, minors])
        return ordered[:n_hh], ordered[n_hh:]
    k = min(n_hh, adults.size)
    want = np.minimum(np.searchsorted(np.cumsum(head_age), rng.random(k) * head_age.sum(), side="right"), 15)
    _, pi = _match(rng, want, cb[adults], 16)
    chosen = np.zeros(adults.size, bool)
    chosen[pi] = True
    rest = np.concatenate([adults[~chosen], minors])
    heads = np.concatenate([adults[pi], rest[: n_hh - k]])
    return heads, rest[n_hh - k :]


SIBLING_SAME_BAND = 0.4  # P(a member under 25 following one under 25 shares their band), tuned to the matrix
SIBLING_CHAIN = 0.8  # P(a member's band follows the previous member's row, not the head's)


def _member_bands(rng: np.random.Generator, cdf: np.ndarray, head_band: np.ndarray, slots: np.ndarray) -> np.ndarray:
    """Bands of the non-head members (slots per household, in order): the first from the
    home-matrix row of the head, each next one from the row of the previous member with
    probability SIBLING_CHAIN (siblings and partners cluster in age), else the head's."""
    nb = cdf.shape[0]
    start = np.concatenate([[0], np.cumsum(slots)[:-1]])
    pos = np.arange(head_band.size) - np.repeat(start, slots)
    want = np.empty(head_band.size, np.int64)
    u = rng.random(head_band.size)
    chain = rng.random(head_band.size) < SIBLING_CHAIN
    same = rng.random(head_band.size)
    for j in range(int(slots.max(initial=0))):
        sel = np.flatnonzero(pos == j)
        src = head_band[sel].copy()
        if j:
            follow = chain[sel]
            src[follow] = want[sel[follow] - 1]
        for k in range(nb):
            kk = sel[src == k]
            want[kk] = np.minimum(np.searchsorted(cdf[k], u[kk], side="right"), nb - 1)
        if j and SIBLING_SAME_BAND > 0:
            prev = want[sel - 1]
            copy = chain[sel] & (prev < 5) & (same[sel] < SIBLING_SAME_BAND)
            want[sel[copy]] = prev[copy]
    return want


PARENT_GAP = (15, 50)  # a child (< 15) lives with someone 15–50 years older (a possible parent)


@numba.njit(cache=True)
def _orphans(members, h0, hn, age, swap_slot, swap_person, lo, hi):  # pragma: no cover - compiled
    """Children (< 15) of the household (slots h0..h0+hn; ``swap_slot`` holding
    ``swap_person``, −1 for none) without a member lo..hi years older (a possible parent)."""
    count = 0
    for i in range(h0, h0 + hn):
        ci = swap_person if i == swap_slot else members[i]
        if age[ci] >= 15:
            continue
        ok = False
        for j in range(h0, h0 + hn):
            if j != i:
                gap = age[swap_person if j == swap_slot else members[j]] - age[ci]
                if lo <= gap <= hi:
                    ok = True
                    break
        if not ok:
            count += 1
    return count


@numba.njit(cache=True)
def _refine_households(members, hh_of_slot, hh_start, hh_size, movable, band, age, target, inv_pop, scale,
                       steps, seed, gap_lo, gap_hi):  # pragma: no cover - compiled
    """Greedy swaps of two non-head members between households: keeps every household's
    size and head, so every marginal (age × sex, household size, head age) is unchanged, and
    accepts a swap when it brings the household mixing s·T_ab / N_a closer to ``target``
    (squared Frobenius) and leaves no more children without a member ``gap_lo``–``gap_hi``
    years older (a possible parent) than before. ``members`` (person per slot, households contiguous) is updated in place;
    returns the number of accepted swaps."""
    np.random.seed(seed)
    nb = target.shape[0]
    t = np.zeros((nb, nb))
    for h in range(hh_start.size):
        a0 = hh_start[h]
        for i in range(a0, a0 + hh_size[h]):
            for j in range(a0, a0 + hh_size[h]):
                if i != j:
                    t[band[members[i]], band[members[j]]] += 1.0
    n_mov = movable.size
    accepted = 0
    for _ in range(steps):
        p = movable[np.random.randint(n_mov)]
        q = movable[np.random.randint(n_mov)]
        ha, hb = hh_of_slot[p], hh_of_slot[q]
        x, y = members[p], members[q]
        a, b = band[x], band[y]
        if ha == hb or a == b:
            continue
        delta = 0.0
        # x (band a) leaves ha for hb, y (band b) leaves hb for ha: apply, then revert if worse
        for rep in range(2):
            sign = 1.0 if rep == 0 else -1.0
            for side in range(2):
                h0 = hh_start[ha] if side == 0 else hh_start[hb]
                hn = hh_size[ha] if side == 0 else hh_size[hb]
                skip = p if side == 0 else q
                out_b = a if side == 0 else b
                in_b = b if side == 0 else a
                for k in range(h0, h0 + hn):
                    if k == skip:
                        continue
                    c = band[members[k]]
                    for (r, col, d) in ((out_b, c, -sign), (c, out_b, -sign), (in_b, c, sign), (c, in_b, sign)):
                        e_old = scale * t[r, col] * inv_pop[r] - target[r, col]
                        t[r, col] += d
                        e_new = e_old + scale * d * inv_pop[r]
                        if rep == 0:
                            delta += e_new * e_new - e_old * e_old
            if rep == 0 and delta < 0.0:
                sa, na, sb, nb_ = hh_start[ha], hh_size[ha], hh_start[hb], hh_size[hb]
                before = (_orphans(members, sa, na, age, -1, -1, gap_lo, gap_hi)
                          + _orphans(members, sb, nb_, age, -1, -1, gap_lo, gap_hi))
                after = (_orphans(members, sa, na, age, p, y, gap_lo, gap_hi)
                         + _orphans(members, sb, nb_, age, q, x, gap_lo, gap_hi))
                if after <= before:  # never leave more children without a possible parent
                    members[p], members[q] = y, x
                    accepted += 1
                    break
    return accepted


def _compose_households(
    rng: np.random.Generator,
    size_class: np.ndarray,
    age: np.ndarray,
    home: np.ndarray,
    head_age: np.ndarray | None = None,
    refine_steps: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Household id per person and household sizes, from each person's size class; with
    ``refine_steps`` > 0, that many swap proposals per person (:func:`_refine_households`)
    then pull the household age mixing towards the reciprocal matrix closest to ``home``."""
    n = size_class.size
    cb = contact_band(age)
    cdf = np.cumsum(home / np.maximum(home.sum(axis=1, keepdims=True), 1e-12), axis=1)
    household = np.empty(n, np.int64)
    is_head = np.zeros(n, bool)
    sizes_out: list[np.ndarray] = []
    next_id = 0
    for h in np.unique(size_class):
        people = np.flatnonzero(size_class == h)
        people = people[rng.permutation(people.size)]
        full, rest = divmod(people.size, int(h))
        sizes = np.full(full, int(h), np.int64)
        if rest:
            sizes = np.append(sizes, rest)
        n_hh = sizes.size
        heads, others = _pick_heads(rng, people, age, cb, n_hh, None if head_age is None else head_age[int(h) - 1])
        hh_ids = np.arange(next_id, next_id + n_hh)
        household[heads] = hh_ids
        is_head[heads] = True
        if others.size:
            slot_hh = np.repeat(hh_ids, sizes - 1)
            slot_head_band = np.repeat(cb[heads], sizes - 1)
            want = _member_bands(rng, cdf, slot_head_band, sizes - 1)
            # people matched to slots band by band; the unmatched fill the rest at random
            si, pi = _match(rng, want, cb[others], cdf.shape[0])
            household[others[pi]] = slot_hh[si]
        sizes_out.append(sizes)
        next_id += n_hh
    sizes_all = np.concatenate(sizes_out) if sizes_out else np.empty(0, np.int64)
    if refine_steps > 0 and n > 1:
        household = _refined(rng, household, sizes_all, is_head, cb, age, home, refine_steps)
    return household, sizes_all


def _refined(rng: np.random.Generator, household: np.ndarray, sizes: np.ndarray, is_head: np.ndarray,
             cb: np.ndarray, age: np.ndarray, home: np.ndarray, steps_per_person: float) -> np.ndarray:
    """Run :func:`_refine_households` against M* (the reciprocal matrix closest to the
    published home matrix for this area's ages) at the scale that equates total contacts."""
    nb = home.shape[0]
    pop = np.bincount(cb, minlength=nb).astype(np.float64)
    target = reciprocal_totals(home, pop) / np.maximum(pop, 1.0)[:, None]
    pairs = float((sizes * (sizes - 1)).sum())
    scale = float((target * pop[:, None]).sum() / max(pairs, 1.0))
    members = np.argsort(household, kind="stable")
    hh_start = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    hh_of_slot = household[members]
    movable = np.flatnonzero(~is_head[members]).astype(np.int64)
    if movable.size < 2:
        return household
    steps = int(steps_per_person * household.size)
    _refine_households(members, hh_of_slot, hh_start, sizes.astype(np.int64), movable, cb.astype(np.int64),
                       age.astype(np.int64), target, 1.0 / np.maximum(pop, 1.0), scale, steps,
                       int(rng.integers(2**31)), PARENT_GAP[0], PARENT_GAP[1])
    out = np.empty_like(household)
    out[members] = hh_of_slot
    return out


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

    household, hh_sizes = _compose_households(rng, size_i + 1, age, matrices["household"], marginals.head_age,
                                              options.household_refine)
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
    workplace = np.full(n, -1, np.int64)
    workplace[workers] = _assign_groups(rng, workers, _sample_sizes(rng, marginals.workplace_sizes, workers.size))
    # a small area still gets several neighbourhoods (at least ~40 when it has 2,000+ people)
    nb_size = max(50, min(options.neighbourhood_size, n // 40))
    n_nb = max(1, n // nb_size)
    neighbourhood = np.minimum(starts[household] // nb_size, n_nb - 1)

    cb = contact_band(age)
    band_pop = np.bincount(cb, minlength=16).astype(np.float64)
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

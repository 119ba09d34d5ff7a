"""Households: who lives with whom (heads, members from the home matrix, swap refinement).

Members' five-year bands are drawn from the published *household* contact matrix row of the
head (or of the previous member) and matched to the people of each size class; then greedy
swaps of non-head members between households (:func:`_refine_households`) pull the household
age mixing towards the reciprocal form of the published matrix. A swap keeps every size,
head and marginal, never leaves more children without a member 15–50 years older, and keeps
the shares of **multigenerational households** (:func:`three_generation_share`) and of
households with a **grandparent and a grandchild** (:func:`grandparent_share`) within a
tolerance of the area's published figures (``multigenerational.csv``) where given.
"""

from __future__ import annotations

import numba
import numpy as np

from simulation.population.contacts import contact_band, reciprocal_totals

__all__ = ["GENERATION_GAP", "PARENT_GAP", "Bands", "compose_households", "grandparent_share", "three_generation_share"]


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
GENERATION_GAP = (18, 50)  # one generation: 18–50 years (three generations = two such steps)
# (share, tolerance) bands for multigenerational and for grandparent-and-grandchild households
Bands = tuple[tuple[float, float] | None, tuple[float, float] | None]


@numba.njit(cache=True)
def _person(members, i, swap_slot, swap_person):  # pragma: no cover - compiled
    return swap_person if i == swap_slot else members[i]


@numba.njit(cache=True)
def _orphans(members, h0, hn, age, swap_slot, swap_person, lo, hi):  # pragma: no cover - compiled
    """Children (< 15) of the household (slots h0..h0+hn; ``swap_slot`` holding
    ``swap_person``, −1 for none) without a member lo..hi years older (a possible parent)."""
    count = 0
    for i in range(h0, h0 + hn):
        ci = _person(members, i, swap_slot, swap_person)
        if age[ci] >= 15:
            continue
        ok = False
        for j in range(h0, h0 + hn):
            if j != i:
                gap = age[_person(members, j, swap_slot, swap_person)] - age[ci]
                if lo <= gap <= hi:
                    ok = True
                    break
        if not ok:
            count += 1
    return count


@numba.njit(cache=True)
def _kinds(members, h0, hn, age, swap_slot, swap_person, lo, hi):  # pragma: no cover - compiled
    """Bit 0: the household is multigenerational by age (a member with one member lo..hi
    years younger and one lo..hi years older: child, parent, grandparent; or a child < 18
    with a member more than ``hi`` years older). Bit 1: it holds a child < 18 and a member
    more than ``hi`` years older (a grandparent and a grandchild)."""
    chain = 0
    grand = 0
    for j in range(h0, h0 + hn):
        aj = age[_person(members, j, swap_slot, swap_person)]
        younger = False
        older = False
        for i in range(h0, h0 + hn):
            if i == j:
                continue
            d = age[_person(members, i, swap_slot, swap_person)] - aj
            if lo <= d <= hi:
                older = True
            elif -hi <= d <= -lo:
                younger = True
            elif d > hi and aj < 18:
                grand = 2
        if younger and older:
            chain = 1
    return (1 if chain or grand else 0) | grand


@numba.njit(cache=True)
def _count_kinds(members, hh_start, hh_size, age, lo, hi, out):  # pragma: no cover - compiled
    """Per-household kind bits (:func:`_kinds`) into ``out``; returns the two counts."""
    k0 = 0
    k1 = 0
    for h in range(hh_start.size):
        out[h] = _kinds(members, hh_start[h], hh_size[h], age, -1, -1, lo, hi) if hh_size[h] >= 2 else 0
        k0 += out[h] & 1
        k1 += out[h] >> 1
    return k0, k1


def _household_kinds(age: np.ndarray, household: np.ndarray, gap: tuple[int, int]) -> tuple[float, float]:
    household = np.asarray(household)
    if household.size == 0:
        return 0.0, 0.0
    members = np.argsort(household, kind="stable").astype(np.int64)
    sizes = np.bincount(household)
    sizes = sizes[sizes > 0].astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    k0, k1 = _count_kinds(members, starts, sizes, np.asarray(age, np.int64), gap[0], gap[1],
                          np.zeros(sizes.size, np.int64))
    return float(k0) / sizes.size, float(k1) / sizes.size


def three_generation_share(age: np.ndarray, household: np.ndarray, gap: tuple[int, int] = GENERATION_GAP) -> float:
    """Share of households that are multigenerational by age: a member with one member
    ``gap`` years younger and one ``gap`` years older, or a child (< 18) with a member more
    than ``gap[1]`` years older. The age-only counterpart of the census "multigenerational
    household" (three or more generations of one family; in England and Wales also
    grandparents with grandchildren and no generation between)."""
    return _household_kinds(age, household, gap)[0]


def grandparent_share(age: np.ndarray, household: np.ndarray, gap: tuple[int, int] = GENERATION_GAP) -> float:
    """Share of households holding a child (< 18) and a member more than ``gap[1]`` years
    older: the age-only counterpart of "households with grandparents and grandchildren under
    18" (it misses grandparents fewer than ``gap[1]`` years older than the grandchild)."""
    return _household_kinds(age, household, gap)[1]


@numba.njit(cache=True)
def _violation(k, lo, hi):  # pragma: no cover - compiled
    if hi < 0:
        return 0
    if k < lo:
        return lo - k
    if k > hi:
        return k - hi
    return 0


@numba.njit(cache=True)
def _can_move(count, lo, hi, flags_now):  # pragma: no cover - compiled
    """Whether a swap of two households with ``flags_now`` of them counted could move the
    count towards [lo, hi] (hi < 0: no band)."""
    if hi < 0:
        return False
    return (count > hi and flags_now > 0) or (count < lo and flags_now < 2)


@numba.njit(cache=True)
def _refine_households(members, hh_of_slot, hh_start, hh_size, movable, band, age, target, inv_pop, scale,
                       steps, seed, gap_lo, gap_hi, gen_lo, gen_hi, bands):  # pragma: no cover - compiled
    """Greedy swaps of two non-head members between households: keeps every household's
    size and head, so every marginal (age × sex, household size, head age) is unchanged.
    A swap is accepted when it leaves no more children without a member ``gap_lo``–``gap_hi``
    years older (a possible parent) than before and either brings the household counts of
    :func:`_kinds` (multigenerational; grandparent and grandchild, steps of ``gen_lo``–
    ``gen_hi`` years) closer to their bands (``bands[k] = (lo, hi)``, hi < 0: none) or keeps
    their total distance from the bands and brings the household mixing s·T_ab / N_a closer to
    ``target`` (squared Frobenius). ``members`` (person per slot, households contiguous) is
    updated in place; returns (accepted swaps, multigenerational, grandparent households)."""
    np.random.seed(seed)
    nb = target.shape[0]
    t = np.zeros((nb, nb))
    for h in range(hh_start.size):
        a0 = hh_start[h]
        for i in range(a0, a0 + hh_size[h]):
            for j in range(a0, a0 + hh_size[h]):
                if i != j:
                    t[band[members[i]], band[members[j]]] += 1.0
    banded = bands[0, 1] >= 0 or bands[1, 1] >= 0
    kind = np.zeros(hh_start.size if banded else 0, np.int64)
    c0, c1 = _count_kinds(members, hh_start, hh_size, age, gen_lo, gen_hi, kind) if banded else (0, 0)
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
        off = (_violation(c0, bands[0, 0], bands[0, 1]) + _violation(c1, bands[1, 0], bands[1, 1])) if banded else 0
        k_a = 0
        k_b = 0
        d0 = 0
        d1 = 0
        # x (band a) leaves ha for hb, y (band b) leaves hb for ha: apply, then revert if not accepted
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
            if rep == 1:
                break
            if delta >= 0.0 and off == 0:
                continue  # revert: no gain possible
            sa, na, sb, nb_ = hh_start[ha], hh_size[ha], hh_start[hb], hh_size[hb]
            better = delta < 0.0
            if banded:
                if delta >= 0.0 and not (
                        _can_move(c0, bands[0, 0], bands[0, 1], (kind[ha] & 1) + (kind[hb] & 1))
                        or _can_move(c1, bands[1, 0], bands[1, 1], (kind[ha] >> 1) + (kind[hb] >> 1))):
                    continue  # no count can move towards its band: revert
                k_a = _kinds(members, sa, na, age, p, y, gen_lo, gen_hi)
                k_b = _kinds(members, sb, nb_, age, q, x, gen_lo, gen_hi)
                d0 = (k_a & 1) + (k_b & 1) - (kind[ha] & 1) - (kind[hb] & 1)
                d1 = (k_a >> 1) + (k_b >> 1) - (kind[ha] >> 1) - (kind[hb] >> 1)
                new_off = (_violation(c0 + d0, bands[0, 0], bands[0, 1])
                           + _violation(c1 + d1, bands[1, 0], bands[1, 1]))
                better = new_off < off or (new_off == off and delta < 0.0)
            if not better:
                continue
            before = (_orphans(members, sa, na, age, -1, -1, gap_lo, gap_hi)
                      + _orphans(members, sb, nb_, age, -1, -1, gap_lo, gap_hi))
            after = (_orphans(members, sa, na, age, p, y, gap_lo, gap_hi)
                     + _orphans(members, sb, nb_, age, q, x, gap_lo, gap_hi))
            if after <= before:  # never leave more children without a possible parent
                members[p], members[q] = y, x
                if banded:
                    c0 += d0
                    c1 += d1
                    kind[ha] = k_a
                    kind[hb] = k_b
                accepted += 1
                break
    return accepted, c0, c1


def compose_households(
    rng: np.random.Generator,
    size_class: np.ndarray,
    age: np.ndarray,
    home: np.ndarray,
    head_age: np.ndarray | None = None,
    refine_steps: float = 0.0,
    multigenerational: Bands | None = None,
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
        household = _refined(rng, household, sizes_all, is_head, cb, age, home, refine_steps, multigenerational)
    return household, sizes_all


def _refined(rng: np.random.Generator, household: np.ndarray, sizes: np.ndarray, is_head: np.ndarray,
             cb: np.ndarray, age: np.ndarray, home: np.ndarray, steps_per_person: float,
             multigenerational: Bands | None) -> np.ndarray:
    """Run :func:`_refine_households` against M* (the reciprocal matrix closest to the
    published home matrix for this area's ages) at the scale that equates total contacts;
    ``multigenerational`` = ((share, tol) | None for multigenerational households, (share,
    tol) | None for grandparent-and-grandchild households) keeps each share in [share − tol,
    share + tol] (pulled into it when it starts outside)."""
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
    bands = np.array([[0, -1], [0, -1]], np.int64)
    for k, pair in enumerate(multigenerational or ()):
        if pair is not None:
            share, tol = pair
            bands[k] = (int(np.ceil(max(share - tol, 0.0) * sizes.size)), int(np.floor((share + tol) * sizes.size)))
    steps = int(steps_per_person * household.size)
    _refine_households(members, hh_of_slot, hh_start, sizes.astype(np.int64), movable, cb.astype(np.int64),
                       age.astype(np.int64), target, 1.0 / np.maximum(pop, 1.0), scale, steps,
                       int(rng.integers(2**31)), PARENT_GAP[0], PARENT_GAP[1], GENERATION_GAP[0], GENERATION_GAP[1],
                       bands)
    out = np.empty_like(household)
    out[members] = hh_of_slot
    return out

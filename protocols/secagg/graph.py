"""The SecAgg+ communication graph: a k-regular random graph (Harary graph on a random
permutation), derived deterministically from public round randomness.

Clients sit on a ring in an order fixed by a ChaCha20 keystream under a key derived from the
graph seed; each is joined to its k/2 nearest positions on either side. Every client can
recompute its own neighbours; nobody can choose them after the seed is fixed.

The ring placement of a (seed, n) is computed once per process (O(n log n)) and kept in a
small cache keyed by exactly those two values, so a process that serves many clients of one
epoch (a fleet's device host, the server) pays it once and each client's neighbours then
cost O(k).
"""

from __future__ import annotations

import functools

import numpy as np

from protocols.keys import derive_key, ring_keystream

__all__ = ["neighbour_graph", "neighbours_of"]


def _permutation(seed: bytes, n: int) -> np.ndarray:
    key = derive_key(seed, b"", label="secagg/graph-permutation")
    draws = ring_keystream(key, n).numpy().view(np.uint64)
    return np.argsort(draws, kind="stable")


@functools.lru_cache(maxsize=4)
def _placement(seed: bytes, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(order, pos): order[p] = the client at ring position p, pos[client] = its position
    (read-only arrays, shared by every caller in the process)."""
    order = _permutation(seed, n)
    pos = np.empty(n, dtype=np.int64)
    pos[order] = np.arange(n)
    order.flags.writeable = pos.flags.writeable = False
    return order, pos


def _check(seed: bytes, n: int, degree: int) -> None:
    if not isinstance(seed, bytes):
        raise TypeError("graph seed must be bytes")
    if n < 2 or not 1 <= degree <= n - 1:
        raise ValueError(f"bad graph size n={n}, degree={degree}")
    if degree < n - 1 and degree % 2:
        raise ValueError("degree must be even unless the graph is complete")


def neighbour_graph(seed: bytes, n: int, degree: int) -> list[tuple[int, ...]]:
    """Sorted neighbour indices of each of ``n`` clients in a ``degree``-regular graph.

    ``degree`` must be even, or ``n - 1`` (complete graph).
    """
    _check(seed, n, degree)
    if degree == n - 1:
        everyone = list(range(n))
        return [tuple(everyone[:i] + everyone[i + 1 :]) for i in range(n)]
    order, pos = _placement(seed, n)
    half = degree // 2
    offsets = np.concatenate([np.arange(-half, 0), np.arange(1, half + 1)])
    nbr_pos = (pos[:, None] + offsets[None, :]) % n
    nbrs = np.sort(order[nbr_pos], axis=1)
    return [tuple(row) for row in nbrs.tolist()]


def neighbours_of(seed: bytes, n: int, degree: int, index: int) -> tuple[int, ...]:
    """Sorted neighbours of one client: O(n log n) the first time a process sees this
    (seed, n), O(k) after that."""
    if not 0 <= index < n:
        raise ValueError(f"index {index} outside [0, {n})")
    _check(seed, n, degree)
    if degree == n - 1:
        return tuple(j for j in range(n) if j != index)
    order, pos = _placement(seed, n)
    p = int(pos[index])
    half = degree // 2
    return tuple(sorted(int(order[(p + o) % n]) for o in range(-half, half + 1) if o))

"""Split a contact graph into P parts so that few edges cross parts.

Methods (``partition_graph(..., method=)``):

* ``metis`` (default) — multilevel k-way partitioning (METIS through ``pymetis``), unweighted
  edges (the halo cost is per cut edge). Agents are weighted by what a rank stores for them
  (state, row pointer and id: 28 bytes; 8 bytes per neighbour entry), balanced to within
  1 %, so each rank holds about 1/P of the graph's memory and of the neighbour-sum work,
  not only 1/P of the agents (unweighted METIS let one rank hold 1–3 % more edges).
* ``locality`` — a documented heuristic for when METIS is unavailable or too big for one
  host: agents sorted by (area, household, id) and cut into P equal contiguous blocks, so a
  household is never split and an area is split at most once; workplace and school edges
  that leave the area are cut.
* ``block`` — contiguous id ranges (what AgentTorch's runner does); ``random`` — the
  worst case, a baseline for the benchmark.

A :class:`Partition` is an owner rank per agent; :func:`cut_stats` reports cut edges.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from simulation.population import CSRLayer

__all__ = ["DistributedError", "Partition", "METHODS", "cut_stats", "partition_graph"]

METHODS = ("metis", "locality", "block", "random")


class DistributedError(ValueError):
    """Invalid partition, world size or distributed settings."""


@dataclass(frozen=True)
class Partition:
    """Owner rank of every agent (``parts[i]`` in ``[0, n_parts)``) and how it was made."""

    parts: np.ndarray  # int32 [n]
    n_parts: int
    method: str

    def __post_init__(self) -> None:
        if self.n_parts < 1:
            raise DistributedError("n_parts must be >= 1")
        if self.parts.ndim != 1 or self.parts.dtype != np.int32:
            raise DistributedError("parts must be a 1-D int32 array")
        if self.parts.size and (self.parts.min() < 0 or self.parts.max() >= self.n_parts):
            raise DistributedError(f"part ids must lie in [0, {self.n_parts})")

    @property
    def n(self) -> int:
        return int(self.parts.size)

    def owned(self, rank: int) -> np.ndarray:
        """Global ids (sorted, int64) of the agents rank ``rank`` owns."""
        return np.flatnonzero(self.parts == rank).astype(np.int64)

    def sizes(self) -> np.ndarray:
        return np.bincount(self.parts, minlength=self.n_parts)


def cut_stats(layer: CSRLayer, partition: Partition) -> dict[str, float]:
    """Undirected edges, cut edges (endpoints on different parts), cut fraction, imbalance
    (largest part / mean, in agents and in memory weight — see :func:`_memory_weights`)."""
    if layer.n != partition.n:
        raise DistributedError(f"graph has {layer.n} agents, partition {partition.n}")
    rows = np.repeat(partition.parts, layer.degree().numpy())
    cols = partition.parts[layer.indices.numpy()]
    cut_directed = int(np.count_nonzero(rows != cols))
    edges = layer.nnz // 2
    sizes = partition.sizes()
    weights = np.bincount(partition.parts, weights=_memory_weights(layer), minlength=partition.n_parts)
    return {
        "edges": edges,
        "cut_edges": cut_directed // 2,
        "cut_fraction": (cut_directed / 2) / max(edges, 1),
        "imbalance": float(sizes.max() / max(sizes.mean(), 1e-9)),
        "memory_imbalance": float(weights.max() / max(weights.mean(), 1e-9)),
    }


_METIS_UFACTOR = 10  # allowed imbalance of the vertex weights, in 1/1000 (METIS' k-way default: 30)


def _memory_weights(layer: CSRLayer) -> np.ndarray:
    """Per-agent weight ∝ the bytes a rank holds for it, in 4-byte units: 7 for state, row
    pointer and id, 2 per neighbour entry (int32 column and float32 weight)."""
    return (7 + 2 * layer.degree().numpy()).astype(np.int64)


def _metis(layer: CSRLayer, n_parts: int, seed: int,
           shares: list[float] | None = None) -> np.ndarray:
    try:
        import pymetis
    except ImportError as exc:  # pragma: no cover - pymetis is a dependency
        raise DistributedError("method 'metis' needs pymetis (pip install pymetis)") from exc
    opts = pymetis.Options(seed=int(seed), ufactor=_METIS_UFACTOR)
    _, parts = pymetis.part_graph(
        n_parts,
        xadj=layer.indptr.numpy(),
        adjncy=layer.indices.numpy(),
        vweights=_memory_weights(layer),
        tpwgts=shares,
        options=opts,
    )
    return np.asarray(parts, dtype=np.int32)


def _blocks(order: np.ndarray, n_parts: int) -> np.ndarray:
    """Cut an agent ordering into ``n_parts`` contiguous, equal-size blocks."""
    n = order.size
    parts = np.empty(n, np.int32)
    parts[order] = (np.arange(n, dtype=np.int64) * n_parts // max(n, 1)).astype(np.int32)
    return parts


def _locality(n: int, n_parts: int, attributes: Mapping[str, torch.Tensor] | None) -> np.ndarray:
    keys = [np.arange(n)]
    for name in ("household", "area"):  # np.lexsort: last key is the primary one
        if attributes is not None and name in attributes:
            keys.append(attributes[name].numpy().astype(np.int64))
    order = np.lexsort(keys)
    parts = _blocks(order, n_parts)
    if attributes is not None and "household" in attributes:
        # move each household wholly to the part of its first member (blocks may split one)
        hh = attributes["household"].numpy().astype(np.int64)
        sorted_hh = hh[order]
        first = np.concatenate([[True], sorted_hh[1:] != sorted_hh[:-1]])
        head = np.maximum.accumulate(np.where(first, np.arange(n), 0))
        parts[order] = parts[order][head]
    return parts


def partition_graph(
    layer: CSRLayer,
    n_parts: int,
    method: str = "metis",
    *,
    attributes: Mapping[str, torch.Tensor] | None = None,
    seed: int = 0,
    shares: list[float] | None = None,
) -> Partition:
    """Partition the (merged, symmetric) contact graph ``layer`` into ``n_parts`` parts.

    ``attributes`` (``household``, ``area``) guide the ``locality`` heuristic; ``seed`` fixes
    METIS' and ``random``'s choices (partitions are deterministic for a seed). ``shares``
    (METIS only): the fraction of the weight each part should get (default 1/P each), e.g.
    a smaller part for a rank with other work (the hybrid run's rank 0 runs the protocol).
    """
    if method not in METHODS:
        raise DistributedError(f"unknown partition method {method!r}; choose from {METHODS}")
    n = layer.n
    if not 1 <= n_parts <= max(n, 1):
        raise DistributedError(f"n_parts must be in [1, {n}] for {n} agents, got {n_parts}")
    if n_parts == 1:
        return Partition(np.zeros(n, np.int32), 1, method)
    if shares is not None:
        if method != "metis" or len(shares) != n_parts or min(shares) <= 0:
            raise DistributedError(f"shares need method 'metis' and {n_parts} positive "
                                   f"fractions, got {method!r} and {shares}")
        total = float(sum(shares))
        shares = [float(x) / total for x in shares]
    if method == "metis":
        parts = _metis(layer, n_parts, seed, shares)
    elif method == "locality":
        parts = _locality(n, n_parts, attributes)
    elif method == "block":
        parts = _blocks(np.arange(n), n_parts)
    else:
        rng = np.random.default_rng(np.random.PCG64([seed, 0x9A27]))
        parts = _blocks(rng.permutation(n), n_parts)
    return Partition(parts, n_parts, method)

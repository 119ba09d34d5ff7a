"""Contact graphs: symmetric CSR layers and the multi-layer :class:`ContactGraph`.

CSR with int64 ``indptr`` and int32 ``indices`` (optional float32 weights), symmetric,
without self-loops, column indices sorted within each row; nothing N×N is ever built.
CSR construction is a counting sort in numba (O(E), no global sort of int64 keys).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numba
import numpy as np
import torch

from simulation.population.errors import PopulationError

__all__ = ["CSRLayer", "ContactGraph", "build_csr", "merge_layers", "random_contact_graph"]


@numba.njit(cache=True)
def _csr_count(n, src, dst, out_deg):  # pragma: no cover - compiled
    for k in range(src.size):
        s, d = src[k], dst[k]
        if s != d:
            out_deg[s + 1] += 1
            out_deg[d + 1] += 1


@numba.njit(cache=True)
def _csr_fill(src, dst, w, indptr, cols, vals, has_w):  # pragma: no cover - compiled
    pos = indptr[:-1].copy()
    for k in range(src.size):
        s, d = src[k], dst[k]
        if s != d:
            cols[pos[s]] = d
            cols[pos[d]] = s
            if has_w:
                vals[pos[s]] = w[k]
                vals[pos[d]] = w[k]
            pos[s] += 1
            pos[d] += 1


@numba.njit(cache=True)
def _csr_sort_dedup(indptr, cols, vals, has_w, new_indptr):  # pragma: no cover - compiled
    """Sort each row by column, merge duplicate columns (weights summed), compact in place."""
    n = indptr.size - 1
    out = 0
    for i in range(n):
        a, b = indptr[i], indptr[i + 1]
        new_indptr[i] = out
        if b - a == 0:
            continue
        order = np.argsort(cols[a:b], kind="quicksort")
        row_c = cols[a:b][order]
        row_v = vals[a:b][order] if has_w else vals[:0]
        last = -1
        for k in range(b - a):
            c = row_c[k]
            if c == last:
                if has_w:
                    vals[out - 1] += row_v[k]
                continue
            cols[out] = c
            if has_w:
                vals[out] = row_v[k]
            out += 1
            last = c
    new_indptr[n] = out


@numba.njit(cache=True)
def _merge_sorted_rows(indptrs, indices, weights, out_indptr, out_cols, out_w, fill):  # pragma: no cover
    """Row-wise k-way merge of CSRs with sorted rows (stacked; layer l's arrays start at
    indptrs[layer, 0]); equal columns are merged with weights summed. ``fill`` False only counts."""
    n_layers = indptrs.shape[0]
    n = indptrs.shape[1] - 1
    pos = np.empty(n_layers, np.int64)
    out = 0
    for i in range(n):
        out_indptr[i] = out
        for layer in range(n_layers):
            pos[layer] = indptrs[layer, i]
        while True:
            best = -1
            col = np.int64(2**62)
            for layer in range(n_layers):
                if pos[layer] < indptrs[layer, i + 1] and indices[pos[layer]] < col:
                    col = indices[pos[layer]]
                    best = layer
            if best < 0:
                break
            acc = 0.0
            for layer in range(n_layers):
                if pos[layer] < indptrs[layer, i + 1] and indices[pos[layer]] == col:
                    acc += weights[pos[layer]]
                    pos[layer] += 1
            if fill:
                out_cols[out] = col
                out_w[out] = acc
            out += 1
    out_indptr[n] = out


@numba.njit(cache=True)
def _sorted_unique_rows(indptr, indices):  # pragma: no cover - compiled
    for i in range(indptr.size - 1):
        for k in range(indptr[i] + 1, indptr[i + 1]):
            if indices[k] <= indices[k - 1]:
                return False
    return True


def _rows_sorted(layer: CSRLayer) -> bool:
    return bool(_sorted_unique_rows(layer.indptr.numpy(), layer.indices.numpy()))


def merge_layers(layers: list[CSRLayer], layer_weights: list[float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Union of CSR layers (sorted rows) in O(E) without a global sort: (indptr, indices,
    weights) with weight = Σ layer weight × edge weight over the layers holding a pair."""
    n = layers[0].n
    if not all(_rows_sorted(layer) for layer in layers):  # arbitrary CSR input: sort first
        layers = [CSRLayer.from_edges(n, *layer.edges(), None if layer.weights is None else layer.weights.numpy())
                  if not _rows_sorted(layer) else layer for layer in layers]
    offsets = np.cumsum([0] + [layer.nnz for layer in layers])
    indptrs = np.stack([layer.indptr.numpy() + off for layer, off in zip(layers, offsets[:-1], strict=True)])
    indices = np.concatenate([layer.indices.numpy() for layer in layers])
    weights = np.concatenate(
        [
            np.full(layer.nnz, w, np.float32) * (1.0 if layer.weights is None else layer.weights.numpy())
            for layer, w in zip(layers, layer_weights, strict=True)
        ]
    ).astype(np.float32)
    indptr = np.empty(n + 1, np.int64)
    _merge_sorted_rows(indptrs, indices, weights, indptr, np.empty(0, np.int32), np.empty(0, np.float32), False)
    cols = np.empty(int(indptr[-1]), np.int32)
    w = np.empty(cols.size, np.float32)
    _merge_sorted_rows(indptrs, indices, weights, indptr, cols, w, True)
    return indptr, cols, w


def build_csr(
    n: int, src: np.ndarray, dst: np.ndarray, weights: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(indptr int64, indices int32, weights float32 | None) of the symmetric graph with an
    edge i–j for every (src, dst) pair; loops dropped, duplicate pairs merged (weights summed)."""
    src = np.ascontiguousarray(src, dtype=np.int64)
    dst = np.ascontiguousarray(dst, dtype=np.int64)
    if src.shape != dst.shape:
        raise PopulationError("src and dst differ in length")
    if src.size and (min(src.min(), dst.min()) < 0 or max(src.max(), dst.max()) >= n):
        raise PopulationError("edge endpoint out of range")
    has_w = weights is not None
    w = np.ascontiguousarray(weights, dtype=np.float32) if has_w else np.empty(0, np.float32)
    if has_w and w.shape != src.shape:
        raise PopulationError("weights must have one entry per edge")
    indptr = np.zeros(n + 1, dtype=np.int64)
    _csr_count(n, src, dst, indptr)
    np.cumsum(indptr, out=indptr)
    cols = np.empty(int(indptr[-1]), dtype=np.int32)
    vals = np.empty(cols.size if has_w else 0, dtype=np.float32)
    _csr_fill(src, dst, w, indptr, cols, vals, has_w)
    new_indptr = np.empty_like(indptr)
    _csr_sort_dedup(indptr, cols, vals, has_w, new_indptr)
    nnz = int(new_indptr[-1])
    cols = cols[:nnz].copy()
    return new_indptr, cols, (vals[:nnz].copy() if has_w else None)


@dataclass(frozen=True)
class CSRLayer:
    """One symmetric contact layer in CSR form: contacts of i are indices[indptr[i]:indptr[i+1]]."""

    indptr: torch.Tensor  # int64 [n + 1]
    indices: torch.Tensor  # int32 [nnz]
    weights: torch.Tensor | None = None  # float32 [nnz]

    def __post_init__(self) -> None:
        if self.indptr.dtype != torch.int64 or self.indices.dtype != torch.int32:
            raise PopulationError("CSR needs int64 indptr and int32 indices")
        if int(self.indptr[-1]) != self.indices.numel():
            raise PopulationError("indptr[-1] must equal the number of edges")
        if self.weights is not None and self.weights.shape != self.indices.shape:
            raise PopulationError("weights must have one entry per edge")

    @property
    def n(self) -> int:
        return self.indptr.numel() - 1

    @property
    def nnz(self) -> int:
        return self.indices.numel()

    def degree(self) -> torch.Tensor:
        return (self.indptr[1:] - self.indptr[:-1]).to(torch.int32)

    @classmethod
    def from_edges(
        cls, n: int, src: np.ndarray, dst: np.ndarray, weights: np.ndarray | None = None
    ) -> CSRLayer:
        """Build a symmetric, deduplicated, loop-free CSR from an undirected edge list
        (weights of repeated pairs are summed)."""
        indptr, cols, w = build_csr(n, src, dst, weights)
        return cls(
            torch.from_numpy(indptr),
            torch.from_numpy(cols),
            None if w is None else torch.from_numpy(w),
        )

    def edges(self) -> tuple[np.ndarray, np.ndarray]:
        """(row, col) arrays of every stored (directed) edge."""
        rows = np.repeat(np.arange(self.n, dtype=np.int64), self.degree().numpy())
        return rows, self.indices.numpy().astype(np.int64)

    def upper(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Each undirected edge once (row < col), as int32 arrays, with its weight."""
        rows = np.repeat(np.arange(self.n, dtype=np.int32), self.degree().numpy())
        cols = self.indices.numpy()
        keep = rows < cols
        w = None if self.weights is None else self.weights.numpy()[keep]
        return rows[keep], cols[keep], w

    def to(self, device: torch.device | str) -> CSRLayer:
        w = None if self.weights is None else self.weights.to(device)
        return CSRLayer(self.indptr.to(device), self.indices.to(device), w)


@dataclass
class ContactGraph:
    """Named contact layers (``household``, ``school``, ``work``, ``community``, …) with
    layer weights (the contact intensity of each setting; calibration may learn them)."""

    layers: dict[str, CSRLayer]
    layer_weights: dict[str, float] = field(default_factory=dict)
    _merged: dict[bool, CSRLayer] = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def n(self) -> int:
        return next(iter(self.layers.values())).n

    def degree(self) -> torch.Tensor:
        """Number of distinct contacts over all layers (the n_i of the risk formula)."""
        return self.merged().degree()

    def merged(self, weighted: bool = True) -> CSRLayer:
        """All layers in one CSR; weights are layer weights (× per-edge weights), summed
        where two layers join the same pair. Where every merged weight is 1 the result is
        unweighted, so the engine takes its bit-packed fast path."""
        if weighted not in self._merged:
            self._merged[weighted] = self._merge(weighted)
        return self._merged[weighted]

    def _merge(self, weighted: bool) -> CSRLayer:
        if len(self.layers) == 1:
            name, layer = next(iter(self.layers.items()))
            unit = float(self.layer_weights.get(name, 1.0)) == 1.0 and layer.weights is None
            if unit or not weighted:  # already the merged graph (weights all one)
                return CSRLayer(layer.indptr, layer.indices)
        names = list(self.layers)
        weights = [float(self.layer_weights.get(k, 1.0)) if weighted else 1.0 for k in names]
        layers = [self.layers[k] if weighted else CSRLayer(self.layers[k].indptr, self.layers[k].indices) for k in names]
        indptr, cols, wsum = merge_layers(layers, weights)
        unit = not weighted or bool(np.all(wsum == 1.0))
        return CSRLayer(
            torch.from_numpy(indptr), torch.from_numpy(cols), None if unit else torch.from_numpy(wsum)
        )


def random_contact_graph(n: int, mean_degree: float, seed: int = 0) -> ContactGraph:
    """An Erdős–Rényi-style static random network with the given mean degree (one layer)."""
    if n < 2 or mean_degree <= 0:
        raise PopulationError("need n >= 2 and mean_degree > 0")
    rng = np.random.default_rng(np.random.PCG64([seed, 0xE4]))
    m = int(round(n * mean_degree / 2))
    src = rng.integers(0, n, size=m)
    dst = rng.integers(0, n, size=m)
    return ContactGraph({"contacts": CSRLayer.from_edges(n, src, dst)}, {"contacts": 1.0})

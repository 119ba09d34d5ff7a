"""Synthetic populations: static agent attributes and a multi-layer contact graph.

Graphs are CSR with int64 ``indptr`` and int32 ``indices`` (optional float32 weights),
symmetric, without self-loops; nothing N×N is ever built. Populations are stored as
Parquet (one attribute table, one edge table per layer), never pickled. Generation is
deterministic for a seed (NumPy PCG64: this is modelling randomness, not cryptography).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

__all__ = [
    "AGE_BANDS",
    "PRESETS",
    "CSRLayer",
    "ContactGraph",
    "Population",
    "PopulationError",
    "PopulationPreset",
    "random_contact_graph",
    "synthesize",
]

# Ten-year age bands 0-9, 10-19, ..., 80+.
AGE_BANDS = ("0-9", "10-19", "20-29", "30-39", "40-49", "50-59", "60-69", "70-79", "80+")


class PopulationError(ValueError):
    """Invalid population, graph or preset."""


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
        """Build a symmetric, deduplicated, loop-free CSR from an undirected edge list."""
        src = np.asarray(src, dtype=np.int64)
        dst = np.asarray(dst, dtype=np.int64)
        if src.shape != dst.shape:
            raise PopulationError("src and dst differ in length")
        if src.size and (min(src.min(), dst.min()) < 0 or max(src.max(), dst.max()) >= n):
            raise PopulationError("edge endpoint out of range")
        keep = src != dst
        a = np.concatenate([src[keep], dst[keep]])
        b = np.concatenate([dst[keep], src[keep]])
        w = None
        if weights is not None:
            weights = np.asarray(weights, dtype=np.float32)[keep]
            w = np.concatenate([weights, weights])
        key = a * n + b
        key, first = np.unique(key, return_index=True)  # sorted by (row, col)
        rows = key // n
        cols = (key - rows * n).astype(np.int32)
        indptr = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(np.bincount(rows, minlength=n), out=indptr[1:])
        wt = None if w is None else torch.from_numpy(np.ascontiguousarray(w[first]))
        return cls(torch.from_numpy(indptr), torch.from_numpy(cols), wt)

    def edges(self) -> tuple[np.ndarray, np.ndarray]:
        """(row, col) arrays of every stored (directed) edge."""
        rows = np.repeat(np.arange(self.n, dtype=np.int64), self.degree().numpy())
        return rows, self.indices.numpy().astype(np.int64)

    def to(self, device: torch.device | str) -> CSRLayer:
        w = None if self.weights is None else self.weights.to(device)
        return CSRLayer(self.indptr.to(device), self.indices.to(device), w)


@dataclass
class ContactGraph:
    """Named contact layers (``household``, ``work``, ``community``, …) with layer weights."""

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
        where two layers join the same pair."""
        if weighted not in self._merged:
            self._merged[weighted] = self._merge(weighted)
        return self._merged[weighted]

    def _merge(self, weighted: bool) -> CSRLayer:
        if len(self.layers) == 1:
            name, layer = next(iter(self.layers.items()))
            unit = float(self.layer_weights.get(name, 1.0)) == 1.0 and layer.weights is None
            if unit or not weighted:  # already the merged graph (weights all one)
                return CSRLayer(layer.indptr, layer.indices)
        n = self.n
        srcs, dsts, ws = [], [], []
        for name, layer in self.layers.items():
            r, c = layer.edges()
            keep = r < c
            srcs.append(r[keep])
            dsts.append(c[keep])
            lw = float(self.layer_weights.get(name, 1.0))
            w = np.full(keep.sum(), lw, np.float32)
            if layer.weights is not None:
                w *= layer.weights.numpy()[keep]
            ws.append(w)
        src, dst, w = np.concatenate(srcs), np.concatenate(dsts), np.concatenate(ws)
        # sum weights of duplicate pairs before symmetrising
        key = src * n + dst
        uniq, inv = np.unique(key, return_inverse=True)
        wsum = np.bincount(inv, weights=w).astype(np.float32)
        rows = uniq // n
        merged = CSRLayer.from_edges(n, rows, uniq - rows * n, wsum if weighted else None)
        return merged


@dataclass
class Population:
    """Agents' static attributes (one int tensor per attribute) and their contact graph."""

    n: int
    attributes: dict[str, torch.Tensor]
    graph: ContactGraph
    meta: dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, value in self.attributes.items():
            if value.shape != (self.n,):
                raise PopulationError(f"attribute {name!r} has shape {tuple(value.shape)}")
        if self.graph.n != self.n:
            raise PopulationError("graph size differs from population size")

    def save(self, path: str | Path) -> Path:
        """Write ``attributes.parquet``, one ``edges-<layer>.parquet`` per layer, ``meta.json``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        pq.write_table(
            pa.table({k: v.numpy() for k, v in self.attributes.items()}),
            path / "attributes.parquet",
        )
        for name, layer in self.graph.layers.items():
            r, c = layer.edges()
            keep = r < c
            cols = {"src": r[keep].astype(np.int32), "dst": c[keep].astype(np.int32)}
            if layer.weights is not None:
                cols["weight"] = layer.weights.numpy()[keep]
            pq.write_table(pa.table(cols), path / f"edges-{name}.parquet")
        meta = {"n": self.n, "layer_weights": self.graph.layer_weights, **self.meta}
        (path / "meta.json").write_text(json.dumps(meta, indent=2))
        return path

    @classmethod
    def load(cls, path: str | Path) -> Population:
        path = Path(path)
        if not (path / "meta.json").exists():
            raise PopulationError(f"{path} is not a saved population (no meta.json)")
        meta = json.loads((path / "meta.json").read_text())
        n = int(meta.pop("n"))
        lw = meta.pop("layer_weights")
        attrs = {
            k: torch.from_numpy(v.to_numpy().copy())
            for k, v in zip(
                *(lambda t: (t.column_names, t.columns))(pq.read_table(path / "attributes.parquet")),
                strict=True,
            )
        }
        layers = {}
        for f in sorted(path.glob("edges-*.parquet")):
            t = pq.read_table(f)
            w = t.column("weight").to_numpy() if "weight" in t.column_names else None
            layers[f.stem[len("edges-") :]] = CSRLayer.from_edges(
                n, t.column("src").to_numpy(), t.column("dst").to_numpy(), w
            )
        return cls(n, attrs, ContactGraph(layers, lw), meta)


@dataclass(frozen=True)
class PopulationPreset:
    """Census-style marginals for :func:`synthesize`."""

    n: int
    age_distribution: tuple[float, ...]  # over AGE_BANDS
    household_sizes: tuple[float, ...]  # P(size = 1, 2, ...)
    workplace_mean_size: float
    school_mean_size: float
    n_areas: int
    work_contacts: int  # contacts per worker/student within their group
    community_contacts: int  # random contacts per agent within the area
    employment_rate: float = 0.62
    layer_weights: Mapping[str, float] = field(
        default_factory=lambda: {"household": 1.0, "work": 1.0, "community": 1.0}
    )


_UK_AGES = (0.115, 0.115, 0.17, 0.135, 0.125, 0.125, 0.1, 0.075, 0.04)  # Oxford-like
_NYC_AGES = (0.12, 0.11, 0.15, 0.16, 0.13, 0.12, 0.1, 0.07, 0.04)

PRESETS: dict[str, PopulationPreset] = {
    "tiny": PopulationPreset(1_000, _UK_AGES, (0.3, 0.34, 0.16, 0.14, 0.06), 20, 60, 4, 4, 4),
    "oxford": PopulationPreset(
        150_000, _UK_AGES, (0.3, 0.34, 0.16, 0.14, 0.06), 25, 200, 30, 4, 4
    ),
    "nyc": PopulationPreset(
        8_400_000, _NYC_AGES, (0.32, 0.28, 0.16, 0.13, 0.06, 0.05), 30, 400, 5 * 40, 4, 4
    ),
}


def _groups(rng: np.random.Generator, members: np.ndarray, mean_size: float) -> np.ndarray:
    """Assign members to groups with sizes ~ 1 + Poisson(mean - 1); returns group id per member."""
    m = members.size
    if m == 0:
        return np.empty(0, np.int64)
    sizes = 1 + rng.poisson(max(mean_size - 1, 0.0), size=int(m / max(mean_size, 1)) + 2)
    while sizes.sum() < m:
        sizes = np.concatenate([sizes, 1 + rng.poisson(max(mean_size - 1, 0), size=len(sizes))])
    gid = np.repeat(np.arange(sizes.size), sizes)[:m]
    return gid[rng.permutation(m)]


def _random_within_groups(
    rng: np.random.Generator, agents: np.ndarray, group: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Each agent links to ~k random others of its group (sorted by group, offsets drawn)."""
    if agents.size == 0 or k == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    order = np.argsort(group, kind="stable")
    a, g = agents[order], group[order]
    starts = np.searchsorted(g, g, side="left")
    ends = np.searchsorted(g, g, side="right")
    size = ends - starts
    src = np.repeat(a, k)
    pos = np.repeat(np.arange(a.size), k)
    sz = np.repeat(size, k)
    offset = rng.integers(1, np.maximum(sz, 2), size=src.size)
    other = starts[pos] + (pos - starts[pos] + offset) % sz
    keep = sz > 1
    return src[keep], a[other[keep]]


def synthesize(preset: str = "tiny", seed: int = 0, scale: float = 1.0) -> Population:
    """Generate a synthetic population from a preset's marginals (deterministic for a seed).

    ``scale`` multiplies the preset's size (e.g. ``synthesize("nyc", scale=0.12)`` ≈ 1M).
    """
    if preset not in PRESETS:
        raise PopulationError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    if not 0 < scale <= 1.0e3:
        raise PopulationError("scale must be in (0, 1000]")
    p = PRESETS[preset]
    n = max(int(round(p.n * scale)), 10)
    rng = np.random.default_rng(np.random.PCG64([seed, 0x1A7E]))
    ages = np.asarray(p.age_distribution) / np.sum(p.age_distribution)
    hh = np.asarray(p.household_sizes) / np.sum(p.household_sizes)

    # households: contiguous blocks of agents
    sizes = rng.choice(np.arange(1, hh.size + 1), size=n, p=hh)
    sizes = sizes[: np.searchsorted(np.cumsum(sizes), n) + 1]
    household = np.repeat(np.arange(sizes.size), sizes)[:n]
    age_band = rng.choice(len(AGE_BANDS), size=n, p=ages).astype(np.int8)
    sex = rng.integers(0, 2, size=n, dtype=np.int8)
    hh_area = rng.integers(0, p.n_areas, size=sizes.size)
    area = hh_area[household].astype(np.int16)
    students = np.flatnonzero(age_band <= 1)
    adults = np.flatnonzero((age_band >= 2) & (age_band <= 6))
    employed = adults[rng.random(adults.size) < p.employment_rate]
    occupation = np.zeros(n, np.int8)  # 0 none/retired, 1 student, 2 worker
    occupation[students] = 1
    occupation[employed] = 2

    # household layer: complete graph within each household (sizes are small)
    hs, hd = [], []
    starts = np.concatenate([[0], np.cumsum(sizes)])[:-1]
    for s in range(2, int(sizes.max()) + 1):
        base = starts[sizes == s]
        base = base[base + s <= n]
        for i in range(s):
            for j in range(i + 1, s):
                hs.append(base + i)
                hd.append(base + j)
    household_layer = CSRLayer.from_edges(
        n, np.concatenate(hs) if hs else np.empty(0), np.concatenate(hd) if hd else np.empty(0)
    )
    # work/school layer
    schools = _groups(rng, students, p.school_mean_size)
    works = _groups(rng, employed, p.workplace_mean_size)
    ws1, wd1 = _random_within_groups(rng, students, schools, p.work_contacts)
    ws2, wd2 = _random_within_groups(rng, employed, works, p.work_contacts)
    work_layer = CSRLayer.from_edges(n, np.concatenate([ws1, ws2]), np.concatenate([wd1, wd2]))
    # community layer: random contacts within the area
    cs, cd = _random_within_groups(rng, np.arange(n), area.astype(np.int64), p.community_contacts // 2)
    community_layer = CSRLayer.from_edges(n, cs, cd)

    attributes = {
        "age_band": torch.from_numpy(age_band),
        "sex": torch.from_numpy(sex),
        "household": torch.from_numpy(household.astype(np.int32)),
        "area": torch.from_numpy(area),
        "occupation": torch.from_numpy(occupation),
    }
    graph = ContactGraph(
        {"household": household_layer, "work": work_layer, "community": community_layer},
        dict(p.layer_weights),
    )
    return Population(n, attributes, graph, {"preset": preset, "seed": seed, "scale": scale})


def random_contact_graph(n: int, mean_degree: float, seed: int = 0) -> ContactGraph:
    """An Erdős–Rényi-style static random network with the given mean degree (one layer)."""
    if n < 2 or mean_degree <= 0:
        raise PopulationError("need n >= 2 and mean_degree > 0")
    rng = np.random.default_rng(np.random.PCG64([seed, 0xE4]))
    m = int(round(n * mean_degree / 2))
    src = rng.integers(0, n, size=m)
    dst = rng.integers(0, n, size=m)
    return ContactGraph({"contacts": CSRLayer.from_edges(n, src, dst)}, {"contacts": 1.0})

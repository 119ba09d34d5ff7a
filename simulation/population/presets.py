"""Presets and whole-city builds: areas built one by one, in memory or streamed to Parquet.

Areas are disjoint blocks of agent ids (a block-diagonal graph: nobody's contacts cross an
area, a simplification documented in docs/population.md). Each area's generator is seeded
from (seed, area index), so an area is the same whether built alone, in memory or streamed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from simulation.population.build import LAYERS, AreaPopulation, BuildOptions, build_area
from simulation.population.contacts import load_contact_matrices
from simulation.population.errors import PopulationError
from simulation.population.graph import ContactGraph, CSRLayer
from simulation.population.marginals import Marginals, bundled_marginals
from simulation.population.report import area_report, city_report
from simulation.population.store import Population, PopulationWriter

__all__ = ["PRESETS", "PopulationPreset", "build_population", "synthesize", "write_population"]


@dataclass(frozen=True)
class PopulationPreset:
    """A bundled marginal set at a default size (``scale`` multiplies it)."""

    marginals: str  # directory name under simulation/data/marginals
    n: int | None = None  # default size; None = the marginals' census total
    split_areas: int = 1  # cut a single-area set into this many equal areas
    neighbourhood_size: int = 2_000
    layer_weights: Mapping[str, float] = field(default_factory=lambda: {k: 1.0 for k in LAYERS})

    def load(self) -> Marginals:
        m = bundled_marginals(self.marginals)
        return m.split(self.split_areas) if self.split_areas > 1 else m


PRESETS: dict[str, PopulationPreset] = {
    "tiny": PopulationPreset("oxford", n=1_000, split_areas=4, neighbourhood_size=250),
    "oxford": PopulationPreset("oxford"),
    "nyc": PopulationPreset("nyc"),
}


def _rng(seed: int, area: int) -> np.random.Generator:
    return np.random.default_rng(np.random.PCG64([seed, 0x1A7E, area]))


def _areas(
    marginals: Marginals, n: int, seed: int, options: BuildOptions
) -> tuple[np.ndarray, Callable[[int], AreaPopulation]]:
    sizes = marginals.area_sizes(n)
    matrices = load_contact_matrices(marginals.contact_matrices)

    def one(i: int) -> AreaPopulation:
        return build_area(marginals.areas[i], marginals.bands, int(sizes[i]), matrices, _rng(seed, i), options)

    return sizes, one


def _meta(marginals: Marginals, n: int, seed: int, options: BuildOptions, **extra: object) -> dict[str, object]:
    return {
        "name": marginals.name,
        "seed": seed,
        "n": n,
        "areas": [a.code for a in marginals.areas],
        "area_names": [a.name for a in marginals.areas],
        "contact_matrices": marginals.contact_matrices,
        "neighbourhood_size": options.neighbourhood_size,
        "students_per_staff": options.students_per_staff,
        "household_refine": options.household_refine,
        "work_refine": options.work_refine,
        "multigenerational_tolerance": options.multigenerational_tolerance,
        "provenance": {"source": marginals.source, "sha256": marginals.provenance},
        **extra,
    }


def build_population(
    marginals: Marginals,
    n: int | None = None,
    seed: int = 0,
    options: BuildOptions | None = None,
    meta: dict[str, object] | None = None,
) -> Population:
    """The whole population in memory (areas as blocks of ids, ``area`` attribute = index)."""
    options = options or BuildOptions()
    n = marginals.population if n is None else int(n)
    if n < len(marginals.areas) * 2:
        raise PopulationError(f"need at least 2 agents per area, got n={n}")
    sizes, one = _areas(marginals, n, seed, options)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    attrs: dict[str, list[np.ndarray]] = {}
    parts: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {k: [] for k in LAYERS}
    reports = []
    hh_offset = 0
    for i in range(len(sizes)):
        ap = one(i)
        a = ap.attributes
        a["household"] = a["household"] + hh_offset
        hh_offset = int(a["household"].max(initial=hh_offset - 1)) + 1
        a["area"] = np.full(ap.n, i, np.int16)
        for k, v in a.items():
            attrs.setdefault(k, []).append(v)
        for name, (indptr, indices) in ap.layers.items():
            parts[name].append((indptr, indices))
        reports.append(area_report(marginals.areas[i], marginals.bands, ap))
    layers = {}
    for name in LAYERS:
        ptrs, idxs, nnz = [], [], 0
        for i, (indptr, indices) in enumerate(parts[name]):
            ptrs.append(indptr[1:] + nnz)
            idxs.append(indices + np.int32(offsets[i]))
            nnz += indices.size
        indptr = np.concatenate([[0], *ptrs]).astype(np.int64)
        layers[name] = CSRLayer(torch.from_numpy(indptr), torch.from_numpy(np.concatenate(idxs).astype(np.int32)))
    attributes = {k: torch.from_numpy(np.concatenate(v)) for k, v in attrs.items()}
    graph = ContactGraph(layers, dict(options.layer_weights))
    info = _meta(marginals, n, seed, options, report=reports, city=city_report(list(marginals.areas), reports), **(meta or {}))
    return Population(n, attributes, graph, info)


def write_population(
    marginals: Marginals,
    path: str | Path,
    n: int | None = None,
    seed: int = 0,
    options: BuildOptions | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, object]:
    """Stream the population to ``path`` (+ ``.edges.parquet``) one area at a time: memory
    is bounded by the largest area. Returns the metadata written."""
    options = options or BuildOptions()
    n = marginals.population if n is None else int(n)
    if n < len(marginals.areas) * 2:
        raise PopulationError(f"need at least 2 agents per area, got n={n}")
    sizes, one = _areas(marginals, n, seed, options)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    reports = []
    hh_offset = 0
    meta = _meta(marginals, n, seed, options)
    with PopulationWriter(path, list(LAYERS), meta, dict(options.layer_weights)) as writer:
        for i in range(len(sizes)):
            ap = one(i)
            off = int(offsets[i])
            a = ap.attributes
            a["household"] = a["household"] + hh_offset
            hh_offset = int(a["household"].max(initial=hh_offset - 1)) + 1
            a["area"] = np.full(ap.n, i, np.int16)
            edges = {}
            for name, (indptr, indices) in ap.layers.items():
                rows = np.repeat(np.arange(ap.n, dtype=np.int32), np.diff(indptr))
                keep = rows < indices
                edges[name] = (rows[keep] + off, indices[keep] + off)
            writer.write_block(a, edges, off)
            reports.append(area_report(marginals.areas[i], marginals.bands, ap))
            if progress is not None:
                progress(f"area {marginals.areas[i].code}: {ap.n:,} agents")
            del ap, a, edges
        writer.set_meta(report=reports, city=city_report(list(marginals.areas), reports), edges=writer.edge_counts)
        meta = writer.meta
    return meta


def synthesize(preset: str = "tiny", seed: int = 0, scale: float = 1.0) -> Population:
    """A preset population (deterministic for a seed); ``scale`` multiplies its default size
    (``synthesize("nyc", scale=0.12)`` ≈ 1.06M, the five boroughs in proportion)."""
    if preset not in PRESETS:
        raise PopulationError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    if not 0 < scale <= 1.0e3:
        raise PopulationError("scale must be in (0, 1000]")
    p = PRESETS[preset]
    marginals = p.load()
    base = p.n if p.n is not None else marginals.population
    n = max(int(round(base * scale)), 10 * len(marginals.areas))
    options = BuildOptions(neighbourhood_size=p.neighbourhood_size, layer_weights=dict(p.layer_weights))
    return build_population(marginals, n, seed, options, meta={"preset": preset, "scale": scale})

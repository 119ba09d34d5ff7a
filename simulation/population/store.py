"""The :class:`Population` and its storage: Parquet, never pickles.

Two forms. A directory (``attributes.parquet``, ``edges-<layer>.parquet``, ``meta.json``),
kept for existing callers. A single-file form ``FILE.parquet`` (agents, one row each) with
``FILE.edges.parquet`` beside it (``layer``, ``src``, ``dst``, each undirected edge once),
both carrying ``lpm.population`` metadata: the schema version, the build settings and the
provenance (SHA-256) of every input table. :class:`PopulationWriter` streams that form area
by area, so a city larger than memory can be written.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from simulation.population.errors import PopulationError
from simulation.population.graph import ContactGraph, CSRLayer

__all__ = ["SCHEMA_VERSION", "Population", "PopulationWriter", "edges_path", "read_metadata"]

SCHEMA_VERSION = 1
_META_KEY = b"lpm.population"


def edges_path(path: str | Path) -> Path:
    """``city.parquet`` → ``city.edges.parquet``."""
    p = Path(path)
    return p.with_name(p.name[: -len(".parquet")] + ".edges.parquet") if p.name.endswith(".parquet") else p.with_name(p.name + ".edges.parquet")


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The ``lpm.population`` metadata of a population file (schema version checked)."""
    p = Path(path)
    if not p.is_file():
        raise PopulationError(f"{p} is not a population file")
    try:
        raw = (pq.read_metadata(p).metadata or {}).get(_META_KEY)  # footer: written last
    except (pa.ArrowInvalid, OSError) as exc:
        raise PopulationError(f"{p} is not a Parquet file: {exc}") from exc
    if raw is None:
        raise PopulationError(f"{p} has no lpm.population metadata (not written by lpm population build)")
    meta = json.loads(raw)
    if meta.get("schema_version") != SCHEMA_VERSION:
        raise PopulationError(
            f"{p} has population schema {meta.get('schema_version')}, this version reads {SCHEMA_VERSION}"
        )
    return meta


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
        """A ``*.parquet`` path writes the single-file form; any other path a directory
        (``attributes.parquet``, ``edges-<layer>.parquet``, ``meta.json``)."""
        path = Path(path)
        if path.suffix == ".parquet":
            with PopulationWriter(path, list(self.graph.layers), dict(self.meta), self.graph.layer_weights) as w:
                w.write_block(
                    {k: v.numpy() for k, v in self.attributes.items()},
                    {name: layer.upper()[:2] for name, layer in self.graph.layers.items()},
                    offset=0,
                )
            return path
        path.mkdir(parents=True, exist_ok=True)
        pq.write_table(
            pa.table({k: v.numpy() for k, v in self.attributes.items()}),
            path / "attributes.parquet",
        )
        for name, layer in self.graph.layers.items():
            r, c, wt = layer.upper()
            cols = {"src": r, "dst": c}
            if wt is not None:
                cols["weight"] = wt
            pq.write_table(pa.table(cols), path / f"edges-{name}.parquet")
        meta = {"n": self.n, "layer_weights": self.graph.layer_weights, **self.meta}
        (path / "meta.json").write_text(json.dumps(meta, indent=2, default=str))
        return path

    @classmethod
    def load(cls, path: str | Path) -> Population:
        """Read either storage form."""
        path = Path(path)
        if path.is_file() and path.suffix == ".parquet":
            return cls._load_file(path)
        if not (path / "meta.json").exists():
            raise PopulationError(f"{path} is not a saved population (no meta.json)")
        meta = json.loads((path / "meta.json").read_text())
        n = int(meta.pop("n"))
        lw = meta.pop("layer_weights")
        table = pq.read_table(path / "attributes.parquet")
        attrs = {k: torch.from_numpy(table.column(k).to_numpy().copy()) for k in table.column_names}
        layers = {}
        for f in sorted(path.glob("edges-*.parquet")):
            t = pq.read_table(f)
            w = t.column("weight").to_numpy() if "weight" in t.column_names else None
            layers[f.stem[len("edges-") :]] = CSRLayer.from_edges(
                n, t.column("src").to_numpy(), t.column("dst").to_numpy(), w
            )
        return cls(n, attrs, ContactGraph(layers, lw), meta)

    @classmethod
    def _load_file(cls, path: Path) -> Population:
        meta = read_metadata(path)
        table = pq.read_table(path)
        attrs = {k: torch.from_numpy(table.column(k).to_numpy().copy()) for k in table.column_names}
        n = table.num_rows
        ep = edges_path(path)
        if not ep.exists():
            raise PopulationError(f"{path}: its edge file {ep.name} is missing")
        edges = pq.read_table(ep)
        layer_col = edges.column("layer").to_numpy()
        src, dst = edges.column("src").to_numpy(), edges.column("dst").to_numpy()
        layers = {}
        for i, name in enumerate(meta["layers"]):
            sel = layer_col == i
            layers[name] = CSRLayer.from_edges(n, src[sel], dst[sel])
        lw = {k: float(v) for k, v in meta["layer_weights"].items()}
        return cls(n, attrs, ContactGraph(layers, lw), meta)


class PopulationWriter:
    """Stream agents and edges to ``FILE.parquet`` / ``FILE.edges.parquet`` block by block."""

    def __init__(
        self,
        path: str | Path,
        layers: list[str],
        meta: dict[str, Any],
        layer_weights: dict[str, float],
    ) -> None:
        self.path = Path(path)
        if self.path.suffix != ".parquet":
            raise PopulationError(f"population file must end in .parquet, got {self.path.name}")
        self.layers = list(layers)
        self.meta = {
            "schema_version": SCHEMA_VERSION,
            "layers": self.layers,
            "layer_weights": {k: float(v) for k, v in layer_weights.items()},
            **meta,
        }
        self._agents: pq.ParquetWriter | None = None
        self._edges: pq.ParquetWriter | None = None
        self.n = 0
        self.edge_counts = dict.fromkeys(self.layers, 0)

    def _schema_meta(self) -> dict[bytes, bytes]:
        return {_META_KEY: json.dumps(self.meta, default=str).encode()}

    def write_block(
        self,
        attributes: dict[str, np.ndarray],
        edges: dict[str, tuple[np.ndarray, np.ndarray]],
        offset: int,
    ) -> None:
        """One block of agents (ids ``offset``…) and its edges (global ids, each pair once)."""
        table = pa.table(attributes)
        if self._agents is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._agents = pq.ParquetWriter(self.path, table.schema.with_metadata(self._schema_meta()))
        self._agents.write_table(table.replace_schema_metadata(self._schema_meta()))
        self.n += table.num_rows
        for name, (src, dst) in edges.items():
            code = self.layers.index(name)
            t = pa.table(
                {
                    "layer": np.full(src.size, code, np.int8),
                    "src": np.asarray(src, np.int32),
                    "dst": np.asarray(dst, np.int32),
                }
            )
            if self._edges is None:
                self._edges = pq.ParquetWriter(edges_path(self.path), t.schema.with_metadata(self._schema_meta()))
            self._edges.write_table(t.replace_schema_metadata(self._schema_meta()))
            self.edge_counts[name] += src.size

    def set_meta(self, **items: Any) -> None:
        """Add metadata before the files are closed (e.g. the marginal report)."""
        self.meta.update(items)

    def close(self) -> None:
        """Close both files (the metadata written last includes everything set so far)."""
        for w in (self._agents, self._edges):
            if w is not None:
                w.add_key_value_metadata(self._schema_meta())
                w.close()
        self._agents = self._edges = None

    def __enter__(self) -> PopulationWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

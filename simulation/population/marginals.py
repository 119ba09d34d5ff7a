"""Census-style marginal tables: the documented CSV format a population is built from.

A marginals directory holds (``area`` ``*`` rows apply to every area without rows of its own):

- ``areas.csv``: ``area,name,population`` (required; one row per area, population > 0)
- ``age_sex.csv``: ``area,age_band,sex,count`` (required; bands ``0-4`` … ``85+``, sex F/M;
  counts are relative within an area, scaled to its population)
- ``household_size.csv``: ``area,size,share`` (required; size 1…k, the last may be ``k+``)
- ``rates.csv``: ``area,age_band,employment_rate,enrolment_rate`` (required; same bands)
- ``workplace_size.csv``, ``school_size.csv``: ``area,size_min,size_max,count`` (optional;
  establishments per size bracket)
- ``household_head_age.csv``: ``area,size,age_min,age_max,count`` (optional; householders
  by age bracket per household size)
- ``multigenerational.csv``: ``area,share[,grandparent_share]`` (optional; share of
  households holding three generations and, if given, of households holding a grandparent
  and a grandchild under 18, which the household refinement keeps within a tolerance)
- ``settings.csv``: ``key,value`` (optional: ``name``, ``contact_matrices``)

See docs/population.md.
"""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from simulation.datafiles import DATA_DIR
from simulation.population.errors import PopulationError
from simulation.population.ipf import integerize

__all__ = [
    "DATA_DIR",
    "AgeBand",
    "AreaMarginals",
    "Marginals",
    "bundled_marginals",
    "load_marginals",
    "parse_band",
]

OPEN_BAND_WIDTH = 10  # ages in an open band "85+" are drawn from 85..94
_REQUIRED = ("areas.csv", "age_sex.csv", "household_size.csv", "rates.csv")
_DEFAULT_WORKPLACES = np.array([[1, 4, 0.55], [5, 19, 0.3], [20, 99, 0.12], [100, 499, 0.03]])
_DEFAULT_SCHOOLS = np.array([[100, 300, 0.3], [301, 700, 0.5], [701, 1500, 0.2]])


@dataclass(frozen=True)
class AgeBand:
    """Ages ``lo``…``hi`` inclusive (an open band ``85+`` spans OPEN_BAND_WIDTH years)."""

    label: str
    lo: int
    hi: int


def parse_band(label: str) -> AgeBand:
    """``"20-24"`` → AgeBand(20, 24); ``"85+"`` → AgeBand(85, 94)."""
    text = label.strip()
    try:
        if text.endswith("+"):
            lo = int(text[:-1])
            return AgeBand(text, lo, lo + OPEN_BAND_WIDTH - 1)
        lo_s, hi_s = text.split("-")
        lo, hi = int(lo_s), int(hi_s)
    except ValueError:
        raise PopulationError(f"bad age band {label!r} (use '20-24' or '85+')") from None
    if not 0 <= lo <= hi <= 120:
        raise PopulationError(f"bad age band {label!r}")
    return AgeBand(text, lo, hi)


@dataclass(frozen=True)
class AreaMarginals:
    """The marginals of one area (arrays over the shared age bands)."""

    code: str
    name: str
    population: int
    age_sex: np.ndarray  # [bands, 2] relative counts (F, M)
    household_share: np.ndarray  # [sizes] share of households of size 1..k
    employment: np.ndarray  # [bands]
    enrolment: np.ndarray  # [bands]
    workplace_sizes: np.ndarray  # [k, 3] size_min, size_max, count
    school_sizes: np.ndarray  # [k, 3]
    head_age: np.ndarray | None = None  # [sizes, 16] P(head's five-year band | household size)
    multigenerational: float | None = None  # share of households with three generations
    grandparent: float | None = None  # share of households with a grandparent and a grandchild < 18


@dataclass(frozen=True)
class Marginals:
    """All areas' marginals plus the provenance of the files they came from."""

    name: str
    bands: tuple[AgeBand, ...]
    areas: tuple[AreaMarginals, ...]
    contact_matrices: str
    provenance: dict[str, str] = field(default_factory=dict)  # file name -> sha256
    source: str = ""

    @property
    def population(self) -> int:
        return sum(a.population for a in self.areas)

    def area_sizes(self, n: int) -> np.ndarray:
        """Agents per area for a population of ``n`` (in proportion, summing to ``n``)."""
        return integerize(np.array([a.population for a in self.areas], float), n)

    def with_population(self, n: int) -> Marginals:
        """The same marginals rescaled to ``n`` people in total (areas in proportion)."""
        sizes = self.area_sizes(n)
        return replace(
            self, areas=tuple(replace(a, population=int(k)) for a, k in zip(self.areas, sizes, strict=True))
        )

    def split(self, parts: int) -> Marginals:
        """One area cut into ``parts`` equal areas (a small preset with several areas)."""
        if len(self.areas) != 1 or parts < 1:
            raise PopulationError("split needs a single-area marginal set and parts >= 1")
        a = self.areas[0]
        sizes = integerize(np.ones(parts), a.population)
        areas = tuple(
            replace(a, code=f"{a.code}{i + 1}", name=f"{a.name} {i + 1}", population=int(k))
            for i, k in enumerate(sizes)
        )
        return replace(self, areas=areas)


def _read(path: Path, columns: tuple[str, ...]) -> list[dict[str, str]]:
    try:
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            header = tuple(reader.fieldnames or ())
            missing = [c for c in columns if c not in header]
            if missing:
                raise PopulationError(f"{path.name}: missing column(s) {missing}; has {list(header)}")
            return [dict(r) for r in reader]
    except OSError as exc:
        raise PopulationError(f"cannot read {path}: {exc}") from exc


def _num(path: Path, line: int, value: str | None, what: str) -> float:
    try:
        x = float(value if value is not None else "")
    except ValueError:
        raise PopulationError(f"{path.name} line {line}: {what} {value!r} is not a number") from None
    if not np.isfinite(x) or x < 0:
        raise PopulationError(f"{path.name} line {line}: {what} must be finite and >= 0, got {value}")
    return x


def _by_area(path: Path, rows: list[dict[str, str]], codes: list[str]) -> dict[str, list[tuple[int, dict]]]:
    out: dict[str, list[tuple[int, dict]]] = {}
    for i, r in enumerate(rows, start=2):
        code = (r.get("area") or "").strip()
        if code != "*" and code not in codes:
            raise PopulationError(f"{path.name} line {i}: unknown area {code!r} (not in areas.csv)")
        out.setdefault(code, []).append((i, r))
    for c in codes:
        if c not in out and "*" not in out:
            raise PopulationError(f"{path.name}: no rows for area {c!r} and no '*' rows")
    return out


def _rows_for(table: dict[str, list[tuple[int, dict]]], code: str) -> list[tuple[int, dict]]:
    return table.get(code) or table.get("*") or []


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _brackets(path: Path, codes: list[str], default: np.ndarray) -> dict[str, np.ndarray]:
    if not path.exists():
        return {c: default for c in codes}
    table = _by_area(path, _read(path, ("area", "size_min", "size_max", "count")), codes)
    out = {}
    for c in codes:
        rows = []
        for line, r in _rows_for(table, c):
            lo = _num(path, line, r["size_min"], "size_min")
            hi = _num(path, line, r["size_max"], "size_max")
            if lo < 1 or hi < lo:
                raise PopulationError(f"{path.name} line {line}: need 1 <= size_min <= size_max")
            rows.append((lo, hi, _num(path, line, r["count"], "count")))
        arr = np.array(rows, dtype=np.float64).reshape(-1, 3)
        if arr[:, 2].sum() <= 0:
            raise PopulationError(f"{path.name}: area {c!r} has no establishments")
        out[c] = arr
    return out


def _head_age(path: Path, codes: list[str], sizes: int) -> dict[str, np.ndarray | None]:
    """P(head in five-year band | size) per area, brackets spread uniformly over their years."""
    if not path.exists():
        return dict.fromkeys(codes)
    table = _by_area(path, _read(path, ("area", "size", "age_min", "age_max", "count")), codes)
    out: dict[str, np.ndarray | None] = {}
    for c in codes:
        arr = np.zeros((sizes, 16))
        for line, r in _rows_for(table, c):
            h = int(_num(path, line, r["size"], "size"))
            lo = int(_num(path, line, r["age_min"], "age_min"))
            hi = int(_num(path, line, r["age_max"], "age_max"))
            if h < 1 or hi < lo:
                raise PopulationError(f"{path.name} line {line}: need size >= 1 and age_min <= age_max")
            if h > sizes:
                continue
            years = np.minimum(np.arange(lo, hi + 1) // 5, 15)
            arr[h - 1] += np.bincount(years, minlength=16) * (_num(path, line, r["count"], "count") / years.size)
        total = arr.sum(axis=1, keepdims=True)
        out[c] = np.where(total > 0, arr / np.maximum(total, 1e-300), 0.0)
    return out


def _multigenerational(path: Path, codes: list[str]) -> dict[str, tuple[float | None, float | None]]:
    """(multigenerational share, grandparent-and-grandchild share or None) per area (optional table)."""
    if not path.exists():
        return dict.fromkeys(codes, (None, None))
    table = _by_area(path, _read(path, ("area", "share")), codes)
    out: dict[str, tuple[float | None, float | None]] = {}
    for c in codes:
        rows = _rows_for(table, c)
        if len(rows) != 1:
            raise PopulationError(f"{path.name}: need exactly one row for area {c!r} (or one '*' row)")
        line, r = rows[0]
        shares: list[float | None] = []
        for col in ("share", "grandparent_share"):
            text = (r.get(col) or "").strip()
            if col != "share" and not text:
                shares.append(None)
                continue
            x = _num(path, line, text, col)
            if x > 1:
                raise PopulationError(f"{path.name} line {line}: {col} must be in [0, 1], got {x}")
            shares.append(x)
        out[c] = (shares[0], shares[1])
    return out


def load_marginals(path: str | Path) -> Marginals:
    """Read and validate a marginals directory (clear :class:`PopulationError` on bad input)."""
    root = Path(path)
    if not root.is_dir():
        raise PopulationError(f"{root} is not a directory of marginal tables")
    for name in _REQUIRED:
        if not (root / name).exists():
            raise PopulationError(f"{root}: missing {name} (needs {', '.join(_REQUIRED)})")
    settings = {}
    if (root / "settings.csv").exists():
        settings = {r["key"].strip(): r["value"].strip() for r in _read(root / "settings.csv", ("key", "value"))}
    area_rows = _read(root / "areas.csv", ("area", "name", "population"))
    codes = [r["area"].strip() for r in area_rows]
    if not codes or len(set(codes)) != len(codes) or "*" in codes:
        raise PopulationError("areas.csv: need at least one area, unique codes, none named '*'")
    pops = [int(_num(root / "areas.csv", i, r["population"], "population")) for i, r in enumerate(area_rows, 2)]
    if min(pops) <= 0:
        raise PopulationError("areas.csv: every population must be > 0")

    p = root / "age_sex.csv"
    age_t = _by_area(p, _read(p, ("area", "age_band", "sex", "count")), codes)
    bands: list[str] | None = None
    age_sex: dict[str, np.ndarray] = {}
    for c in codes:
        cells: dict[tuple[str, int], float] = {}
        order: list[str] = []
        for line, r in _rows_for(age_t, c):
            band = parse_band(r["age_band"]).label
            sex = r["sex"].strip().upper()
            if sex not in ("F", "M"):
                raise PopulationError(f"{p.name} line {line}: sex must be F or M, got {r['sex']!r}")
            if band not in order:
                order.append(band)
            key = (band, 0 if sex == "F" else 1)
            if key in cells:
                raise PopulationError(f"{p.name} line {line}: duplicate row for {band} {sex}")
            cells[key] = _num(p, line, r["count"], "count")
        if bands is None:
            bands = order
        elif order != bands:
            raise PopulationError(f"{p.name}: area {c!r} uses other age bands than the first area")
        arr = np.array([[cells.get((b, s), 0.0) for s in (0, 1)] for b in bands])
        if arr.sum() <= 0:
            raise PopulationError(f"{p.name}: area {c!r} has no people")
        age_sex[c] = arr
    assert bands is not None
    parsed = tuple(parse_band(b) for b in bands)
    for a, b in zip(parsed, parsed[1:], strict=False):
        if b.lo != a.hi + 1:
            raise PopulationError(f"{p.name}: age bands must be contiguous ({a.label} then {b.label})")

    p = root / "household_size.csv"
    hh_t = _by_area(p, _read(p, ("area", "size", "share")), codes)
    households = {}
    for c in codes:
        share: dict[int, float] = {}
        for line, r in _rows_for(hh_t, c):
            s = r["size"].strip().rstrip("+")
            if not s.isdigit() or int(s) < 1:
                raise PopulationError(f"{p.name} line {line}: size must be a positive integer (or 'k+')")
            share[int(s)] = _num(p, line, r["share"], "share")
        k = max(share)
        arr = np.array([share.get(i, 0.0) for i in range(1, k + 1)])
        if arr.sum() <= 0:
            raise PopulationError(f"{p.name}: area {c!r} has no households")
        households[c] = arr / arr.sum()

    p = root / "rates.csv"
    rate_t = _by_area(p, _read(p, ("area", "age_band", "employment_rate", "enrolment_rate")), codes)
    rates = {}
    for c in codes:
        emp, enr = {}, {}
        for line, r in _rows_for(rate_t, c):
            band = parse_band(r["age_band"]).label
            if band not in bands:
                raise PopulationError(f"{p.name} line {line}: band {band} is not in age_sex.csv")
            emp[band] = _num(p, line, r["employment_rate"], "employment_rate")
            enr[band] = _num(p, line, r["enrolment_rate"], "enrolment_rate")
            if emp[band] > 1 or enr[band] > 1:
                raise PopulationError(f"{p.name} line {line}: rates must be in [0, 1]")
        rates[c] = (np.array([emp.get(b, 0.0) for b in bands]), np.array([enr.get(b, 0.0) for b in bands]))

    sizes_max = max(h.size for h in households.values())
    heads = _head_age(root / "household_head_age.csv", codes, sizes_max)
    work = _brackets(root / "workplace_size.csv", codes, _DEFAULT_WORKPLACES)
    school = _brackets(root / "school_size.csv", codes, _DEFAULT_SCHOOLS)
    multigen = _multigenerational(root / "multigenerational.csv", codes)
    areas = tuple(
        AreaMarginals(
            code=c,
            name=r["name"].strip(),
            population=pop,
            age_sex=age_sex[c],
            household_share=households[c],
            employment=rates[c][0],
            enrolment=rates[c][1],
            workplace_sizes=work[c],
            school_sizes=school[c],
            head_age=heads[c],
            multigenerational=multigen[c][0],
            grandparent=multigen[c][1],
        )
        for c, r, pop in zip(codes, area_rows, pops, strict=True)
    )
    provenance = {f.name: _sha256(f) for f in sorted(root.glob("*.csv"))}
    return Marginals(
        name=settings.get("name", root.name),
        bands=parsed,
        areas=areas,
        contact_matrices=settings.get("contact_matrices", "prem2017_usa"),
        provenance=provenance,
        source=str(root),
    )


def bundled_marginals(name: str) -> Marginals:
    """A marginal set shipped in ``simulation/data/marginals/<name>`` (``nyc``, ``oxford``)."""
    root = DATA_DIR / "marginals" / name
    if not root.is_dir():
        have = sorted(p.name for p in (DATA_DIR / "marginals").iterdir() if p.is_dir())
        raise PopulationError(f"no bundled marginals {name!r}; have {have}")
    return load_marginals(root)

"""The five NYC boroughs: the one table every package uses (codes, names, 2020 Census totals).

Read from ``simulation/data/nyc_boroughs.csv`` (source in simulation/data/README.md).
"""

from __future__ import annotations

import csv

from simulation.population.marginals import DATA_DIR

__all__ = ["BOROUGHS", "BOROUGH_NAMES", "BOROUGH_POPULATION"]


def _load() -> list[dict[str, str]]:
    with (DATA_DIR / "nyc_boroughs.csv").open(newline="") as f:
        return list(csv.DictReader(f))


_ROWS = _load()
BOROUGHS: tuple[str, ...] = tuple(r["code"] for r in _ROWS)  # BX, BK, MN, QN, SI
BOROUGH_NAMES: dict[str, str] = {r["code"]: r["name"] for r in _ROWS}
BOROUGH_POPULATION: dict[str, int] = {r["code"]: int(r["population_2020"]) for r in _ROWS}

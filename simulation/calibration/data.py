"""Observed case series: NYC DOHMH daily cases (bundled copy, or any path with that layout)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from importlib import resources
from pathlib import Path

import pandas as pd
import torch

__all__ = ["BOROUGHS", "CaseSeries", "DataError", "load_nyc_cases"]

BOROUGHS = ("BX", "BK", "MN", "QN", "SI")
NYC_POPULATION = 8_400_000


class DataError(ValueError):
    """Missing file, column or date range."""


@dataclass
class CaseSeries:
    """Daily counts (float tensor [days]) with their dates and source column."""

    dates: list[date]
    counts: torch.Tensor
    column: str

    def __len__(self) -> int:
        return self.counts.numel()

    def seven_day_average(self) -> torch.Tensor:
        return rolling_mean(self.counts, 7)


def rolling_mean(x: torch.Tensor, window: int) -> torch.Tensor:
    """Trailing mean over ``window`` days (shorter at the start)."""
    c = torch.cumsum(torch.cat([x.new_zeros(1), x]), 0)
    idx = torch.arange(1, x.numel() + 1)
    lo = (idx - window).clamp(min=0)
    return (c[idx] - c[lo]) / (idx - lo)


def load_nyc_cases(
    path: str | Path | None = None,
    *,
    start: str = "2020-03-01",
    end: str = "2020-06-30",
    column: str = "CASE_COUNT",
    include_probable: bool = True,
) -> CaseSeries:
    """Daily cases between ``start`` and ``end`` inclusive.

    ``column`` is ``CASE_COUNT`` (citywide) or a borough's ``BX_CASE_COUNT`` etc.; with
    ``include_probable`` the matching ``PROBABLE_CASE_COUNT`` column is added.
    """
    if path is None:
        src = resources.files("simulation.data").joinpath("nyc_cases_2020.csv")
        frame = pd.read_csv(src.open())
    else:
        p = Path(path)
        if not p.exists():
            raise DataError(f"no such file: {p}")
        frame = pd.read_csv(p)
    if "date_of_interest" not in frame or column not in frame:
        raise DataError(f"expected columns date_of_interest and {column!r}")
    frame["date"] = pd.to_datetime(frame["date_of_interest"], format="%m/%d/%Y")
    sel = frame[(frame["date"] >= start) & (frame["date"] <= end)]
    if sel.empty:
        raise DataError(f"no rows between {start} and {end}")
    values = sel[column].astype(float)
    probable = column.replace("CASE_COUNT", "PROBABLE_CASE_COUNT")
    if include_probable and probable in sel:
        values = values + sel[probable].astype(float)
    return CaseSeries(
        [d.date() for d in sel["date"]], torch.tensor(values.to_numpy(), dtype=torch.float32), column
    )

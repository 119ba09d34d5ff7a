"""Observed case series: NYC DOHMH daily cases (bundled copy, or any CSV in the layout of
nychealth/coronavirus-data ``trends/cases-by-day.csv``), validated with clear errors."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from pathlib import Path

import pandas as pd
import torch

from simulation.datafiles import DATA_DIR
from simulation.population.boroughs import BOROUGHS

__all__ = ["BOROUGHS", "CaseSeries", "DataError", "load_case_frame", "load_nyc_cases", "parse_date"]

NYC_POPULATION = 8_400_000
DATE_COLUMN = "date_of_interest"


class DataError(ValueError):
    """Missing file, bad column, bad date or date range."""


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


def parse_date(value: str | date, what: str = "date") -> date:
    """ISO ``YYYY-MM-DD`` (or a ``date``) → ``date``; DataError naming ``what`` otherwise."""
    if isinstance(value, date):
        return value
    try:
        return date.fromisoformat(str(value).strip())
    except ValueError:
        raise DataError(f"{what} {value!r} is not a date in YYYY-MM-DD form") from None


def load_case_frame(path: str | Path | None = None, column: str = "CASE_COUNT",
                    include_probable: bool = True) -> pd.Series:
    """The whole daily series of ``column`` (+ its probable column) indexed by date.

    Checks: the file exists and parses, ``date_of_interest`` and ``column`` exist, dates are
    MM/DD/YYYY, unique and consecutive (no gaps), counts are finite and non-negative.
    """
    if path is None:
        frame = pd.read_csv(DATA_DIR / "nyc_cases_2020.csv")
        name = "bundled nyc_cases_2020.csv"
    else:
        p = Path(path)
        if not p.is_file():
            raise DataError(f"no such file: {p}")
        try:
            frame = pd.read_csv(p)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
            raise DataError(f"{p}: not a readable CSV ({exc})") from exc
        name = str(p)
    missing = [c for c in (DATE_COLUMN, column) if c not in frame.columns]
    if missing:
        raise DataError(f"{name}: missing column(s) {', '.join(missing)}; expected the NYC Health "
                        f"trends/cases-by-day.csv layout ({DATE_COLUMN}, CASE_COUNT, PROBABLE_CASE_COUNT, ...)")
    try:
        dates = pd.to_datetime(frame[DATE_COLUMN], format="%m/%d/%Y")
    except (ValueError, TypeError) as exc:
        raise DataError(f"{name}: {DATE_COLUMN} must be MM/DD/YYYY ({exc})") from exc
    values = pd.to_numeric(frame[column], errors="coerce")
    probable = column.replace("CASE_COUNT", "PROBABLE_CASE_COUNT")
    if include_probable and probable in frame.columns and probable != column:
        values = values + pd.to_numeric(frame[probable], errors="coerce")
    series = pd.Series(values.to_numpy(dtype=float), index=pd.DatetimeIndex(dates)).sort_index()
    if series.empty:
        raise DataError(f"{name}: no rows")
    if series.index.has_duplicates:
        raise DataError(f"{name}: duplicate dates, e.g. {series.index[series.index.duplicated()][0].date()}")
    gaps = series.index.to_series().diff().dt.days.iloc[1:]
    if (gaps != 1).any():
        raise DataError(f"{name}: dates are not consecutive (gap after {gaps[gaps != 1].index[0].date()})")
    bad = ~pd.Series(series.to_numpy()).between(0, float("inf"))
    if bad.any():
        raise DataError(f"{name}: non-numeric or negative count in {column} on {series.index[bad.to_numpy()][0].date()}")
    return series


def load_nyc_cases(
    path: str | Path | None = None,
    *,
    start: str | date = "2020-03-01",
    end: str | date = "2020-06-30",
    column: str = "CASE_COUNT",
    include_probable: bool = True,
) -> CaseSeries:
    """Daily cases between ``start`` and ``end`` inclusive (both must lie in the file).

    ``column`` is ``CASE_COUNT`` (citywide) or a borough's ``BX_CASE_COUNT`` etc.; with
    ``include_probable`` the matching ``PROBABLE_CASE_COUNT`` column is added.
    """
    d0, d1 = parse_date(start, "start"), parse_date(end, "end")
    if d1 < d0:
        raise DataError(f"end {d1} is before start {d0}")
    full = load_case_frame(path, column, include_probable)
    first, last = full.index[0].date(), full.index[-1].date()
    if d0 < first or d1 > last:
        raise DataError(f"window {d0} → {d1} is outside the data ({first} → {last})")
    sel = full[str(d0):str(d1)]
    return CaseSeries([d.date() for d in sel.index],
                      torch.tensor(sel.to_numpy(), dtype=torch.float32), column)

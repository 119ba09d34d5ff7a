"""Backtests: forecast from each origin, score against what happened, compare with baselines.

For every origin the forecast (``forecast.run_forecast``: "simulator", what ``lpm forecast``
writes by default, and "ensemble", its equal-weight quantile average with the baselines) and
the two baselines
(``baselines``) see only data up to the origin; each is scored over days 1..h for every
horizon h: MAE and MAPE of the 7-day average, mean WIS of the daily counts, and the share of
days inside the central 80 % interval. The summary gives, per horizon and method, the median
over origins of MAE/MAPE/WIS, the pooled coverage, and the ratio of the model's median MAE to
each baseline's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pandas as pd

from simulation.calibration.data import DataError, load_case_frame, parse_date
from simulation.calibration.forecast import Forecast, ForecastConfig, run_forecast
from simulation.calibration.scoring import QUANTILES, coverage, mae_7day, mape_7day, seven_day, wis

__all__ = ["Backtest", "run_backtest", "score_rows"]

METHODS = ("simulator", "ensemble", "persistence", "log_linear")


@dataclass
class Backtest:
    rows: pd.DataFrame  # one row per origin × horizon × method
    summary: pd.DataFrame  # one row per horizon × method
    forecasts: dict[date, Forecast]

    def markdown(self) -> str:
        """The summary as a markdown table."""
        s = self.summary
        lines = ["| horizon | method | median MAE (7-day avg) | median MAPE | median WIS | 80 % coverage "
                 "| MAE / persistence | MAE / log-linear |", "|---|---|---|---|---|---|---|---|"]
        for _, r in s.iterrows():
            lines.append(f"| {r.horizon} | {r.method} | {r.mae:.1f} | {r.mape:.1%} | {r.wis:.1f} | "
                         f"{r.coverage80:.0%} | {r.mae_vs_persistence:.2f} | {r.mae_vs_log_linear:.2f} |")
        return "\n".join(lines) + "\n"

    def write(self, out: str | Path) -> list[Path]:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        paths = [out / "backtest.csv", out / "summary.csv", out / "summary.md", out / "backtest.png",
                 out / "forecasts.csv"]
        self.rows.to_csv(paths[0], index=False, float_format="%.4g")
        self.summary.to_csv(paths[1], index=False, float_format="%.4g")
        paths[2].write_text(self.markdown())
        self.plot(paths[3])
        frames = []
        for o, fc in self.forecasts.items():
            for name, (q, p7) in fc.members.items():
                f = pd.DataFrame(q, columns=[f"q{x}" for x in QUANTILES])
                f.insert(0, "date", [d.isoformat() for d in fc.dates])
                f.insert(0, "method", name)
                f.insert(0, "origin", o.isoformat())
                f["point7"] = p7
                frames.append(f)
        pd.concat(frames).to_csv(paths[4], index=False, float_format="%.1f")
        return paths

    def plot(self, path: str | Path) -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        horizons = sorted(self.rows.horizon.unique())
        fig, axes = plt.subplots(1, len(horizons) + 1, figsize=(5 * (len(horizons) + 1), 4.2))
        for ax, h in zip(axes, horizons, strict=False):
            sub = self.rows[self.rows.horizon == h]
            for m in METHODS:
                r = sub[sub.method == m]
                if r.empty:
                    continue
                ax.plot(pd.to_datetime(r.origin), r.mae, "o-", ms=3, label=m)
            ax.set_title(f"MAE of the 7-day average, days 1–{h}")
            ax.set_yscale("log")
            ax.legend(fontsize=8)
            ax.tick_params(axis="x", rotation=45)
        ax = axes[-1]
        first = next(iter(self.forecasts.values()))
        full = first.history
        for fc in self.forecasts.values():
            full = fc.history if len(fc.history) > len(full) else full
            q, p7 = fc.members["simulator"]
            ax.fill_between(pd.to_datetime(fc.dates), q[:, 1], q[:, 5], color="C1", alpha=0.3, lw=0)
            ax.plot(pd.to_datetime(fc.dates), p7, color="C1", lw=1)
        actual = self._actual
        ax.plot(actual.index, actual.rolling(7).mean(), color="k", lw=1, label="observed 7-day average")
        ax.set_title("simulator: 80 % bands and median 7-day average")
        ax.set_yscale("log")
        ax.legend(fontsize=8)
        ax.tick_params(axis="x", rotation=45)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return Path(path)

    _actual: pd.Series = None  # type: ignore[assignment]


def score_rows(origin: date, horizons: Sequence[int], actual: np.ndarray, before: np.ndarray,
               forecasts: dict[str, tuple[np.ndarray, np.ndarray]]) -> list[dict]:
    """Score each method's (quantiles, 7-day point path) over days 1..h for each horizon."""
    obs7 = seven_day(actual, before)
    rows = []
    for h in horizons:
        for name, (q, p7) in forecasts.items():
            rows.append({"origin": origin.isoformat(), "horizon": h, "method": name,
                         "mae": mae_7day(p7[:h], obs7[:h]), "mape": mape_7day(p7[:h], obs7[:h]),
                         "wis": float(wis(q[:h], actual[:h]).mean()),
                         "coverage80": coverage(q[:h], actual[:h], 0.8), "days": h})
    return rows


def _summary(rows: pd.DataFrame) -> pd.DataFrame:
    out = []
    for h, sub in rows.groupby("horizon"):
        med = {m: sub[sub.method == m].mae.median() for m in METHODS}
        for m in METHODS:
            r = sub[sub.method == m]
            out.append({"horizon": h, "method": m, "mae": r.mae.median(), "mape": r.mape.median(),
                        "wis": r.wis.median(),
                        "coverage80": float((r.coverage80 * r.days).sum() / r.days.sum()),
                        "mae_vs_persistence": med[m] / med["persistence"],
                        "mae_vs_log_linear": med[m] / med["log_linear"], "origins": len(r)})
    return pd.DataFrame(out)


def run_backtest(
    origins: Sequence[str | date],
    horizons: Sequence[int] = (14, 28),
    *,
    path: str | Path | None = None,
    config: ForecastConfig | None = None,
    column: str = "CASE_COUNT",
    progress: Callable[[date, Forecast], None] | None = None,
) -> Backtest:
    """Forecast from each origin (to the longest horizon) and score model and baselines."""
    if not origins or not horizons or min(horizons) < 1:
        raise DataError("need at least one origin and positive horizons")
    full = load_case_frame(path, column)
    last = full.index[-1].date()
    hmax = max(horizons)
    dates = sorted(parse_date(o, "origin") for o in origins)
    late = [d for d in dates if d + timedelta(days=hmax) > last]
    if late:
        raise DataError(f"origin {late[0]} + {hmax} days is past the last date in the data ({last})")
    rows: list[dict] = []
    forecasts: dict[date, Forecast] = {}
    for o in dates:
        fc = run_forecast(o, hmax, path=path, config=config, column=column)
        forecasts[o] = fc
        actual = full[str(o + timedelta(days=1)): str(o + timedelta(days=hmax))].to_numpy(dtype=float)
        before = fc.history.to_numpy(dtype=float)[-6:]
        methods = dict(fc.members)
        rows.extend(score_rows(o, horizons, actual, before, methods))
        if progress is not None:
            progress(o, fc)
    frame = pd.DataFrame(rows)
    bt = Backtest(frame, _summary(frame), forecasts)
    bt._actual = full[str(dates[0] - timedelta(days=28)): str(dates[-1] + timedelta(days=hmax))]
    return bt

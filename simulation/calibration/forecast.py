"""Forecast daily reported cases past the data with posterior-predictive bands.

A forecast from ``origin`` fits the ``fit_days`` days up to it (``window.fit_window``: warm
start, weekly random-walk log β_t, variational posterior), then extends log β_t past the
origin with a mean-reverting (AR(1)) random walk

    log β_{T+h} = log β* + φ^h (log β_T − log β*) + Σ_{k≤h} φ^{h−k} ε_k,   ε_k ~ N(0, σ²)

where β* = β_T / R_T is the transmission rate at which incidence would level off (R_T from the
fitted growth rate at the origin, R = 1 + r/γ), φ = 2^(−1/half_life) (damped growth: epidemics'
growth rates regress towards zero), and σ is the day-to-day volatility of log β implied by how
much the weekly growth rate of the data changed from week to week before the origin.
Each posterior draw θ ~ q × future β path runs the simulator over burn-in + window + horizon;
negative-binomial reporting noise (dispersion estimated from the data) is added to each
draw's expected reported cases. Quantiles are taken over all of them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from simulation.calibration.baselines import baseline_forecast
from simulation.calibration.data import DataError, load_case_frame, parse_date
from simulation.calibration.scoring import QUANTILES, seven_day
from simulation.calibration.window import WindowConfig, WindowFit, fit_window

__all__ = ["Forecast", "ForecastConfig", "growth_volatility", "run_forecast"]


@dataclass
class ForecastConfig:
    """Forecast settings on top of the window fit's (``window``)."""

    window: WindowConfig = field(default_factory=WindowConfig)
    fit_days: int = 56
    draws: int = 40  # posterior draws × future β paths (one simulator run each)
    noise_samples: int = 25  # reporting-noise samples per draw
    half_life: float = 14.0  # days for log β − log β* to halve
    volatility: float | None = None  # weekly sd of Δ log β; None: from the data
    ensemble: bool = False  # output the equal-weight quantile average of simulator and baselines


@dataclass
class Forecast:
    """Daily quantiles of reported cases (city scale) from the day after ``origin``."""

    origin: date
    dates: list[date]
    quantiles: np.ndarray  # [horizon, len(QUANTILES)] (the ensemble's when ``ensemble``)
    point7: np.ndarray  # median 7-day average path [horizon]
    members: dict[str, tuple[np.ndarray, np.ndarray]]  # simulator, ensemble, baselines: (quantiles, point7)
    history: pd.Series  # observed daily cases up to the origin
    fit: WindowFit
    volatility: float
    seconds: float
    runs: int

    def to_frame(self) -> pd.DataFrame:
        frame = pd.DataFrame(self.quantiles, columns=[f"q{q}" for q in QUANTILES])
        frame.insert(0, "date", [d.isoformat() for d in self.dates])
        return frame

    def write_csv(self, path: str | Path) -> Path:
        path = Path(path)
        self.to_frame().to_csv(path, index=False, float_format="%.1f")
        return path

    def plot(self, path: str | Path, actual: pd.Series | None = None, days_before: int = 56) -> Path:
        """Fan chart: 50/80/95 % bands, median, the observed data (and ``actual`` after the origin)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        path = Path(path)
        fig, ax = plt.subplots(figsize=(9, 4.8))
        x = pd.to_datetime(self.dates)
        q = self.quantiles
        for lo, hi, a in ((0, 6, 0.15), (1, 5, 0.25), (2, 4, 0.4)):
            ax.fill_between(x, q[:, lo], q[:, hi], color="C1", alpha=a, lw=0,
                            label=f"{QUANTILES[hi] - QUANTILES[lo]:.0%} band")
        ax.plot(x, q[:, 3], color="C1", label="median")
        ax.plot(x, self.point7, color="C1", ls="--", lw=1, label="median 7-day average")
        past = self.history.iloc[-days_before:]
        ax.plot(past.index, past.to_numpy(), ".", color="k", ms=3, label="observed")
        ax.plot(past.index, past.rolling(7).mean().to_numpy(), color="k", lw=1)
        if actual is not None and len(actual):
            ax.plot(actual.index, actual.to_numpy(), "x", color="C3", ms=3, label="observed after origin")
        ax.axvline(pd.Timestamp(self.origin), color="grey", lw=0.8, ls="--")
        ax.set_ylabel("reported cases / day")
        ax.set_title(f"Forecast from {self.origin} ({len(self.dates)} days) · "
                     f"{self.fit.config.agents:,} agents · in-window R² {self.fit.quality['r2_7day']:.2f}")
        ax.legend(fontsize=8, loc="upper left")
        fig.autofmt_xdate()
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path


def growth_volatility(history: pd.Series, dispersion: float = 1e9, weeks: int = 16,
                      default: float = 0.2) -> float:
    """Weekly sd of the change in log β implied by the data.

    With weekly 7-day averages a_w, the weekly log growth g_w = log(a_w / a_{w−1}) and, for an
    SIR with γ = 1/7, Δ log β ≈ Δg. The robust sd (1.4826 · MAD) of Δg over the last ``weeks``
    weeks includes reporting noise: var(log a) ≈ (1/μ + 1/r)/7 for NB(μ, r) days, and Δg
    sums four such terms (weights 1, −2, 1 → 6 var), which is subtracted. Clamped to
    [0.03, 0.5]; ``default`` if there are fewer than 6 weeks.
    """
    avg = history.rolling(7).mean().dropna().to_numpy()[::-1][::7][::-1]  # weekly, ending at origin
    avg = np.maximum(avg[-(weeks + 2):], 0.5)
    if len(avg) < 6:
        return default
    dg = np.diff(np.diff(np.log(avg)))
    mad = float(np.median(np.abs(dg - np.median(dg))))
    noise = 6 * (1 / float(np.mean(avg[-8:])) + 1 / dispersion) / 7
    return float(np.clip(np.sqrt(max((1.4826 * mad) ** 2 - noise, 0.0)), 0.03, 0.5))


def run_forecast(
    origin: str | date,
    horizon: int = 28,
    *,
    path: str | Path | None = None,
    config: ForecastConfig | None = None,
    column: str = "CASE_COUNT",
    progress: Callable[[str, int, float], None] | None = None,
) -> Forecast:
    """Fit the ``fit_days`` days up to ``origin`` and forecast ``horizon`` days past it."""
    cfg = config or ForecastConfig()
    if horizon < 1:
        raise DataError("horizon must be at least 1 day")
    if cfg.draws < 2 or cfg.noise_samples < 1:
        raise DataError("need at least 2 draws and 1 noise sample")
    o = parse_date(origin, "origin")
    full = load_case_frame(path, column)
    if o > full.index[-1].date():
        raise DataError(f"origin {o} is after the last date in the data ({full.index[-1].date()})")
    start = o - timedelta(days=cfg.fit_days - 1)
    if start < full.index[0].date():
        raise DataError(f"origin {o} leaves fewer than {cfg.fit_days} days of data before it "
                        f"(data start {full.index[0].date()})")
    t0 = time.perf_counter()
    fit = fit_window(start, o, path=path, config=cfg.window, column=column,
                     progress=progress)
    history = full[: str(o)]
    vol = cfg.volatility if cfg.volatility is not None else growth_volatility(history, fit.dispersion)
    with torch.random.fork_rng():
        torch.manual_seed(cfg.window.seed + 1)
        quantiles, point7, runs = _predictive(fit, history, horizon, cfg, vol)
    members = {"simulator": (quantiles, point7)}
    for name in ("persistence", "log_linear"):
        members[name] = baseline_forecast(name, history, horizon, fit.dow)
    # equal-weight ensemble (Vincentization: average each quantile level, and the point paths)
    members["ensemble"] = (np.mean([m[0] for m in members.values()], axis=0),
                           np.mean([m[1] for m in members.values()], axis=0))
    quantiles, point7 = members["ensemble" if cfg.ensemble else "simulator"]
    dates = [o + timedelta(days=h) for h in range(1, horizon + 1)]
    return Forecast(o, dates, quantiles, point7, members, history, fit, vol,
                    time.perf_counter() - t0, fit.runs + runs)


def _predictive(fit: WindowFit, history: pd.Series, horizon: int, cfg: ForecastConfig,
                vol: float) -> tuple[np.ndarray, np.ndarray, int]:
    w = fit.at_agents(fit.config.agents)  # posterior predictive on the full population
    days = fit._ctx["days"]
    gamma = fit.config.gamma
    inf = fit._ctx["infections"].numpy()
    r_t = math.log(max(inf[-1], 1e-9) / max(inf[-8], 1e-9)) / 7.0
    log_r = math.log(float(np.clip(1.0 + r_t / gamma, 0.5, 2.0)))
    phi = 0.5 ** (1.0 / cfg.half_life)
    sigma = vol / math.sqrt(7.0)
    rng = np.random.Generator(np.random.PCG64([fit.config.seed, 0xF0CA]))
    before = history.to_numpy(dtype=float)[-6:]
    means, samples = [], []
    with torch.no_grad():
        for z in fit.posterior.sample(cfg.draws)[0]:
            beta = w.beta_path(z, days)
            log_bt = float(torch.log(beta[-1]))
            dev = log_r  # log β_T − log β*
            future = np.empty(horizon)
            for h in range(horizon):
                dev = phi * dev + sigma * rng.standard_normal()
                future[h] = log_bt - log_r + dev
            beta_full = torch.cat([beta, torch.exp(torch.as_tensor(future, dtype=torch.float32))])
            rep = w.reported(z, w.infections(z, beta_full))[days:].numpy()
            means.append(rep)
            r = fit.dispersion
            lam = rng.gamma(r, np.broadcast_to(rep, (cfg.noise_samples, horizon)) / r)
            samples.append(rng.poisson(lam))
    means_arr = np.stack(means)  # [draws, horizon], with dow
    point7 = np.median(np.stack([seven_day(m, before) for m in means_arr]), axis=0)
    quantiles = np.quantile(np.concatenate(samples).astype(float), QUANTILES, axis=0).T
    return quantiles, point7, cfg.draws


def with_agents(cfg: ForecastConfig, agents: int, seed: int) -> ForecastConfig:
    """A copy of ``cfg`` at another population size and seed."""
    return replace(cfg, window=replace(cfg.window, agents=agents, seed=seed))

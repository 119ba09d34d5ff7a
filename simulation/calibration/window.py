"""Fit any window of daily cases with a warm-started simulator and a random-walk β_t.

The simulator is the SIR model on ``synthesize("nyc", …)`` in its individual-based
mean-field mode (``estimator="expected"``). A fit of the window [start, end]:

* **warm start** — the run begins ``burn_in`` days before ``start`` (day s0). At s0 every agent is
  recovered with probability r0 = (cases before s0) / (historical ascertainment × city
  population) (prior infections → immunity) and infectious with probability
  i0 = exp(θ_i) · (cases over s0+delay ± 3 d) / (ρ × city) / γ (current prevalence implied by
  the cases reported one delay later). The burn-in days are simulated but not scored.
* **β_t** — log β at weekly knots, linear in between, with a Gaussian random-walk prior on the
  weekly changes (scale ``rw_scale``); ascertainment ρ has a logit-normal prior.
* **observation** — reported(t) = ρ · (gamma delay ⊛ infections)(t) · dow(t) at city scale
  (÷ agents/city); dow is the day-of-week profile estimated from the data; negative-binomial
  likelihood with a dispersion estimated from the data.
* **posterior** — MAP by Adam, then a diagonal-Gaussian variational posterior
  (reparameterised, KL to the prior) started at the MAP point.

θ is per capita, so the fit runs on ``min(agents, fit_agents)`` agents (mean-field dynamics of
the preset barely depend on its size) and :meth:`WindowFit.at_agents` re-runs it on more.

Every random choice (population, variational draws) comes from ``seed``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from simulation.calibration.data import NYC_POPULATION, DataError, load_case_frame, parse_date
from simulation.calibration.observation import ObservationModel
from simulation.calibration.vi import DiagonalGaussian
from simulation.engine import simulate
from simulation.models import SIR
from simulation.population import Population, synthesize

__all__ = ["WindowConfig", "WindowFit", "day_of_week_profile", "dispersion_of", "fit_window"]

_BETA_NEUTRAL_GUESS = 0.137  # mean-field β with flat incidence on the nyc preset at S ≈ 1 (measured)


@dataclass
class WindowConfig:
    """Settings of a window fit (defaults are the documented ones)."""

    agents: int = 50_000
    fit_agents: int | None = 20_000  # fit on min(agents, fit_agents); forecasts run at ``agents``
    burn_in: int = 21
    knot_days: int = 7
    gamma: float = 1 / 7
    delay_mean: float = 6.0
    ascertainment: float = 0.25  # prior median of ρ in the window
    ascertainment_sd: float = 0.75  # prior sd of logit ρ
    history_ascertainment: float = 0.15  # ρ assumed for cases before the run (immunity)
    rw_scale: float = 0.2  # prior sd of the weekly change of log β
    steps: int = 80
    lr: float = 0.1
    posterior_steps: int = 15
    seed: int = 0
    city_population: int = NYC_POPULATION


@dataclass
class WindowFit:
    """A fitted window: data, posterior, and what a forecast needs to continue from it."""

    config: WindowConfig
    dates: list[date]  # window days (scored)
    observed: np.ndarray  # city-scale daily cases in the window
    fitted: np.ndarray  # city-scale expected reported cases at the MAP point (with dow)
    band: tuple[np.ndarray, np.ndarray, np.ndarray]  # 5 %, 50 %, 95 % over posterior draws (expected)
    beta_t: np.ndarray  # MAP β per simulated day (burn-in + window)
    ascertainment: float
    r0: float  # immune fraction at the run start
    quality: dict[str, float]
    dow: np.ndarray  # multiplicative day-of-week profile, index = date.weekday()
    dispersion: float
    posterior: DiagonalGaussian
    runs: int
    seconds: float
    history: pd.Series = field(repr=False, default_factory=pd.Series)  # all data up to `end`
    _ctx: dict = field(repr=False, default_factory=dict)

    def at_agents(self, agents: int) -> _Window:
        """The fitted pipeline on a population of ``agents`` (the fit's own if equal)."""
        w = self._ctx["window"]
        if agents == w.pop.n or agents == min(self.config.agents, self.config.fit_agents or agents):
            return w
        pop = synthesize("nyc", seed=self.config.seed, scale=agents / self.config.city_population)
        return _Window(self.config, pop, self._ctx["history"], self._ctx["run_start"], self._ctx["days"], self.dow)

    @property
    def run_start(self) -> date:
        return self.dates[0] - timedelta(days=self.config.burn_in)

    def plot(self, path: str | Path, title: str = "") -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        path = Path(path)
        fig, (ax, bx) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True, height_ratios=(3, 1.3))
        x = pd.to_datetime(self.dates)
        lo, _, hi = self.band
        ax.fill_between(x, lo, hi, alpha=0.3, color="C1", label="90 % posterior band (expected cases)")
        ax.plot(x, self.fitted, color="C1", label="simulated (MAP)")
        ax.plot(x, self.observed, ".", color="k", ms=3, label="observed")
        ax.set_ylabel("reported cases / day (city)")
        q = self.quality
        ax.set_title(title or f"{self.dates[0]} → {self.dates[-1]} · R² (7-day) {q['r2_7day']:.3f} · "
                     f"MAPE {q['mape_7day']:.0%} · ρ {self.ascertainment:.0%} · immune at start {self.r0:.0%}")
        ax.legend()
        bx.plot(pd.to_datetime([self.run_start + timedelta(days=i) for i in range(len(self.beta_t))]),
                self.beta_t, color="C0")
        bx.axvline(x[0], color="grey", lw=0.8, ls="--")
        bx.set_ylabel("β_t (burn-in | window)")
        fig.autofmt_xdate()
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path


def day_of_week_profile(history: pd.Series, weeks: int = 8) -> np.ndarray:
    """Multiplicative weekday effects (mean 1) from the last ``weeks`` weeks: geometric mean of
    count / centred 7-day average per weekday."""
    tail = history.iloc[-(7 * weeks + 6):]
    centred = tail.rolling(7, center=True).mean()
    ratio = (tail / centred).replace([np.inf, -np.inf], np.nan).dropna()
    ratio = ratio[(ratio > 0) & (centred.loc[ratio.index] >= 5)]
    prof = np.ones(7)
    if len(ratio) >= 14:
        logs = np.log(ratio)
        for wd in range(7):
            sel = logs[logs.index.weekday == wd]
            if len(sel):
                prof[wd] = math.exp(float(np.median(sel)))
    return prof / np.exp(np.log(prof).mean())


def dispersion_of(history: pd.Series, dow: np.ndarray, weeks: int = 8) -> float:
    """Negative-binomial dispersion r (variance μ + μ²/r) of the daily counts around their
    dow-adjusted centred 7-day average over the last ``weeks`` weeks (clamped to [5, 1000])."""
    tail = history.iloc[-(7 * weeks + 6):]
    mu = (tail.rolling(7, center=True).mean() * dow[tail.index.weekday]).dropna()
    y = tail.loc[mu.index]
    mu = mu[mu > 0]
    y = y.loc[mu.index]
    if len(mu) < 14:
        return 50.0
    excess = float(np.mean(((y - mu) ** 2 - mu) / mu**2))
    return float(np.clip(1.0 / max(excess, 1e-3), 5.0, 1000.0))


class _Window:
    """The differentiable pipeline θ → expected reported cases (city scale) for a run."""

    def __init__(self, cfg: WindowConfig, population: Population, history: pd.Series,
                 run_start: date, fit_days: int, dow: np.ndarray) -> None:
        self.cfg = cfg
        self.pop = population
        self.scale = population.n / cfg.city_population
        self.run_start = run_start
        self.fit_days = fit_days
        self.n_knots = fit_days // cfg.knot_days + 2
        self.dow = dow
        before = history[: str(run_start - timedelta(days=1))]
        self.r0 = float(min(before.sum() / (cfg.history_ascertainment * cfg.city_population), 0.9))
        d = int(round(cfg.delay_mean))
        near = history[str(run_start + timedelta(days=d - 3)): str(run_start + timedelta(days=d + 3))]
        level = float(near.mean()) if len(near) else 0.0
        self.i_base = level / cfg.city_population / cfg.gamma  # × 1/ρ inside
        self.i_floor = 1.0 / population.n  # a cold start (no cases yet) begins near one agent
        self.obs = ObservationModel(ascertainment=0.5, delay_mean=cfg.delay_mean)
        for p in self.obs.parameters():
            p.requires_grad_(False)
        self.model = SIR(beta=0.2, gamma=cfg.gamma, initial_infected=0.0)
        for p in self.model.parameters():
            p.requires_grad_(False)

    # θ = [log β knots (n_knots), logit ρ, θ_i]
    def initial_theta(self, history: pd.Series) -> torch.Tensor:
        """Start at the β_t implied by the data: at each knot, R = 1 + r/γ from the growth rate r
        of the 7-day average one reporting delay later, β = β₀ · R / S (β₀: flat incidence)."""
        cfg = self.cfg
        avg = history.rolling(7).mean()
        d = int(round(cfg.delay_mean))
        knots = []
        for k in range(self.n_knots):
            centre = self.run_start + timedelta(days=k * cfg.knot_days + d)
            a = avg.get(pd.Timestamp(centre + timedelta(days=7)), np.nan)
            b = avg.get(pd.Timestamp(centre), np.nan)
            if np.isfinite(a) and np.isfinite(b) and a >= 1 and b >= 1:
                r_growth = math.log(a / b) / 7.0
                knots.append(float(np.clip(1 + r_growth / cfg.gamma, 0.3, 3.0)))
            else:
                knots.append(knots[-1] if knots else 1.0)
        s0 = max(1 - self.r0, 0.1)
        logits = math.log(cfg.ascertainment / (1 - cfg.ascertainment))
        return torch.tensor([math.log(_BETA_NEUTRAL_GUESS * r / s0) for r in knots] + [logits, 0.0])

    def log_prior(self, theta: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        knots = theta[..., : self.n_knots]
        steps = knots[..., 1:] - knots[..., :-1]
        lp = -0.5 * (steps / cfg.rw_scale).pow(2).sum(-1)
        lp = lp - 0.5 * ((knots[..., 0] - math.log(0.2)) / 1.0).pow(2)  # weak anchor on the level
        logit0 = math.log(cfg.ascertainment / (1 - cfg.ascertainment))
        lp = lp - 0.5 * ((theta[..., self.n_knots] - logit0) / cfg.ascertainment_sd).pow(2)
        return lp - 0.5 * (theta[..., self.n_knots + 1] / 1.0).pow(2)

    def beta_path(self, theta: torch.Tensor, days: int) -> torch.Tensor:
        """log-linear interpolation of the knots over the fitted days (flat after the last knot)."""
        knots = theta[: self.n_knots]
        t = torch.arange(days, dtype=torch.float32) / self.cfg.knot_days
        i = t.floor().long().clamp(max=self.n_knots - 2)
        w = (t - i).clamp(max=1.0)
        return torch.exp(knots[i] * (1 - w) + knots[i + 1] * w)

    def ascertainment(self, theta: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(theta[self.n_knots])

    def initial_state(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        rho = self.ascertainment(theta)
        i0 = ((self.i_base / rho + self.i_floor) * torch.exp(theta[self.n_knots + 1])).clamp(max=0.2)
        n = self.pop.n
        ones = torch.ones(n)
        return {"S": ones * (1 - self.r0 - i0), "I": ones * i0, "R": ones * self.r0,
                "new_infections": torch.zeros(n)}

    def infections(self, theta: torch.Tensor, beta_t: torch.Tensor) -> torch.Tensor:
        """Mean-field new infections per simulated day (agent scale)."""
        traj = simulate(self.model, self.pop, beta_t.numel(), self.cfg.seed, estimator="expected",
                        initial_state=self.initial_state(theta), extras={"beta_t": beta_t})
        return traj["new_infections"][1:]

    def reported(self, theta: torch.Tensor, infections: torch.Tensor) -> torch.Tensor:
        """Expected reported cases per day at city scale, with the day-of-week profile."""
        rho = self.ascertainment(theta)
        delayed = self.obs(infections) / self.obs.ascertainment  # delay only
        wd = [(self.run_start + timedelta(days=k)).weekday() for k in range(infections.numel())]
        return rho * delayed / self.scale * torch.as_tensor(self.dow[wd], dtype=torch.float32)


def _nb_nll(mu: torch.Tensor, y: torch.Tensor, r: float) -> torch.Tensor:
    mu = mu.clamp(min=1e-3)
    return -(torch.lgamma(y + r) - math.lgamma(r) - torch.lgamma(y + 1)
             + r * torch.log(r / (r + mu)) + y * torch.log(mu / (r + mu))).sum()


def fit_window(
    start: str | date,
    end: str | date,
    *,
    path: str | Path | None = None,
    config: WindowConfig | None = None,
    column: str = "CASE_COUNT",
    progress: Callable[[str, int, float], None] | None = None,
) -> WindowFit:
    """Fit [start, end] (inclusive) with a warm start from the data before it.

    ``progress(phase, step, loss)`` reports each optimiser step (phases ``map``, ``posterior``).
    """
    cfg = config or WindowConfig()
    d0, d1 = parse_date(start, "start"), parse_date(end, "end")
    if (d1 - d0).days < 13:
        raise DataError(f"window {d0} → {d1} is shorter than 14 days")
    full = load_case_frame(path, column)
    first, last = full.index[0].date(), full.index[-1].date()
    if d0 < first or d1 > last:
        raise DataError(f"window {d0} → {d1} is outside the data ({first} → {last})")
    history = full[: str(d1)]
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        return _fit(cfg, history, d0, d1, progress)


def _fit(cfg: WindowConfig, history: pd.Series, d0: date, d1: date,
         progress: Callable[[str, int, float], None] | None) -> WindowFit:
    t0 = time.perf_counter()
    fit_n = min(cfg.agents, cfg.fit_agents or cfg.agents)
    pop = synthesize("nyc", seed=cfg.seed, scale=fit_n / cfg.city_population)
    run_start = d0 - timedelta(days=cfg.burn_in)
    days = cfg.burn_in + (d1 - d0).days + 1
    dow = day_of_week_profile(history, weeks=max((d1 - d0).days // 7, 4))
    r = dispersion_of(history, dow)
    w = _Window(cfg, pop, history, run_start, days, dow)
    y = torch.tensor(history[str(d0): str(d1)].to_numpy(), dtype=torch.float32)

    def neg_log_post(theta: torch.Tensor) -> torch.Tensor:
        rep = w.reported(theta, w.infections(theta, w.beta_path(theta, days)))
        return _nb_nll(rep[cfg.burn_in:], y, r) - w.log_prior(theta)

    theta = w.initial_theta(history).requires_grad_(True)
    opt = torch.optim.Adam([theta], lr=cfg.lr)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.97)
    runs = 0
    for step in range(cfg.steps):
        opt.zero_grad()
        loss = neg_log_post(theta)
        if not torch.isfinite(loss):
            raise DataError(f"the fit diverged at step {step} (non-finite loss); check the window's data")
        loss.backward()
        opt.step()
        sched.step()
        runs += 1
        if progress is not None:
            progress("map", step, float(loss) / len(y))
    theta_map = theta.detach()

    # diagonal-Gaussian variational posterior around the MAP point: E_q[−log p(y, θ)] − H[q]
    # (small steps for the mean: Adam's sign-like steps on a sharp objective would walk it away
    # from the MAP point; larger ones for the spread)
    q = DiagonalGaussian(theta_map, log_std=-4.0)
    vopt = torch.optim.Adam([{"params": [q.mean], "lr": 0.003}, {"params": [q.log_std], "lr": 0.1}])
    for step in range(cfg.posterior_steps):
        vopt.zero_grad()
        z, logq = q.sample(1)
        objective = neg_log_post(z[0]) + logq[0]
        objective.backward()
        vopt.step()
        runs += 1
        if progress is not None:
            progress("posterior", step, float(objective.detach()) / len(y))

    with torch.no_grad():
        inf = w.infections(theta_map, w.beta_path(theta_map, days))
        fitted = w.reported(theta_map, inf)[cfg.burn_in:].numpy()
        draws = []
        for z in q.sample(12)[0]:
            draws.append(w.reported(z, w.infections(z, w.beta_path(z, days)))[cfg.burn_in:].numpy())
            runs += 1
    stack = np.stack(draws)
    band = tuple(np.quantile(stack, [0.05, 0.5, 0.95], axis=0))
    observed = y.numpy()
    dates = [d0 + timedelta(days=k) for k in range(len(observed))]
    from simulation.calibration.metrics import fit_quality

    # per-agent scale, so MAPE skips days under 1 case per simulated population (as before)
    quality = fit_quality(torch.as_tensor(fitted) * w.scale, torch.as_tensor(observed) * w.scale)
    return WindowFit(
        config=cfg, dates=dates, observed=observed, fitted=fitted, band=band,  # type: ignore[arg-type]
        beta_t=w.beta_path(theta_map, days).numpy(), ascertainment=float(w.ascertainment(theta_map)),
        r0=w.r0, quality=quality, dow=dow, dispersion=r, posterior=q, runs=runs,
        seconds=time.perf_counter() - t0, history=history,
        _ctx={"window": w, "theta_map": theta_map, "days": days, "infections": inf,
              "history": history, "run_start": run_start},
    )

"""NYC first wave (March–June 2020) on a scaled synthetic population.

Pipeline: CalibNN β_t → SIR on ``synthesize("nyc", scale)`` → ascertainment + reporting
delay → expected reported cases, fitted to DOHMH daily cases scaled to the population
size (Poisson NLL), end to end with Adam. Then a diagonal-Gaussian GVI posterior over a
global transmission multiplier and the ascertainment gives credible bands.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from simulation.calibration.calibnn import CalibNN, calibnn_features
from simulation.calibration.data import NYC_POPULATION, CaseSeries, load_nyc_cases
from simulation.calibration.losses import poisson_nll
from simulation.calibration.metrics import fit_quality
from simulation.calibration.observation import ObservationModel
from simulation.calibration.point import calibrate
from simulation.calibration.vi import DiagonalGaussian, fit_gvi
from simulation.engine import simulate
from simulation.models import SIR
from simulation.population import synthesize

__all__ = ["NYCFit", "fit_nyc_first_wave"]


@dataclass
class NYCFit:
    observed: torch.Tensor  # scaled observed cases per day
    fitted: torch.Tensor  # expected reported cases per day (point fit)
    band: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # 5 %, 50 %, 95 % of reported cases
    beta_t: torch.Tensor
    ascertainment: float
    delay_mean: float
    quality: dict[str, float]
    runs: int
    seconds: float
    series: CaseSeries
    n_agents: int

    def plot(self, path: str | Path) -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        path = Path(path)
        fig, (ax, bx) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True, height_ratios=(3, 1.3))
        days = range(len(self.observed))
        lo, med, hi = self.band
        ax.fill_between(days, lo, hi, alpha=0.3, color="C1", label="90 % posterior band")
        ax.plot(days, self.fitted.detach(), color="C1", label="simulated (point fit)")
        ax.plot(days, self.observed, ".", color="k", ms=3, label="observed (scaled)")
        ax.set_ylabel(f"cases/day per {self.n_agents:,} agents")
        ax.set_title(
            f"NYC first wave · R² (7-day) {self.quality['r2_7day']:.2f} · "
            f"MAPE {self.quality['mape_7day']:.0%} · ascertainment {self.ascertainment:.0%}"
        )
        ax.legend()
        bx.plot(days, self.beta_t.detach(), color="C0")
        bx.set_ylabel("β_t (CalibNN)")
        bx.set_xlabel(f"days since {self.series.dates[0]}")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path


class _Pipeline(nn.Module):
    def __init__(self, features: torch.Tensor, gamma: float, initial_infected: float,
                 estimator: str):
        super().__init__()
        self.features = features
        self.estimator = estimator
        self.calibnn = CalibNN(features.shape[1], beta_init=0.4)
        self.observation = ObservationModel(ascertainment=0.15, delay_mean=6.0)
        self.sir = SIR(beta=0.5, gamma=gamma, initial_infected=initial_infected)
        for p in self.sir.parameters():
            p.requires_grad_(False)

    def forward(self, population, seed: int, beta_scale: torch.Tensor | float = 1.0,
                ascertainment_shift: torch.Tensor | float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        beta_t = self.calibnn(self.features) * beta_scale
        days = self.features.shape[0]
        traj = simulate(self.sir, population, days, seed, estimator=self.estimator,
                        extras={"beta_t": beta_t})
        infections = traj["new_infections"][1:]
        obs = self.observation
        reported = obs(infections) * torch.sigmoid(obs.logit_ascertainment + ascertainment_shift) / obs.ascertainment
        return reported, beta_t


def fit_nyc_first_wave(
    *,
    agents: int = 100_000,
    steps: int = 40,
    posterior_steps: int = 12,
    posterior_samples: int = 2,
    seed: int = 0,
    estimator: str = "expected",
    lr: float = 0.1,
    path: str | Path | None = None,
    start: str = "2020-03-01",
    end: str = "2020-06-30",
    progress: Callable[[str, int, float], None] | None = None,
) -> NYCFit:
    """Fit the first wave; ``progress(phase, step, loss)`` reports each optimiser step.

    ``estimator`` is the gradient estimator used while fitting: the default ``expected``
    (mean-field) gives smooth, deterministic gradients through 120 days; the band shows the
    posterior uncertainty of the fitted model (same estimator) over posterior draws. The
    same ``seed`` gives the same fit (it seeds the population, the simulator, the network
    initialisation and the posterior draws; the global torch RNG is left untouched). Note:
    the mean-field surrogate infects more than the sampled model at equal β (docs).
    """
    with torch.random.fork_rng():  # --seed fixes every random choice (CalibNN init, GVI draws)
        torch.manual_seed(seed)
        return _fit(agents, steps, posterior_steps, posterior_samples, seed, estimator, lr,
                    path, start, end, progress)


def _fit(agents, steps, posterior_steps, posterior_samples, seed, estimator, lr, path, start,
         end, progress) -> NYCFit:
    series = load_nyc_cases(path, start=start, end=end)
    pop = synthesize("nyc", seed=seed, scale=agents / NYC_POPULATION)
    observed = series.counts * pop.n / NYC_POPULATION
    model = _Pipeline(calibnn_features(series.counts), gamma=1 / 7,
                      initial_infected=max(5.0 / pop.n, 2e-4), estimator=estimator)

    def loss() -> torch.Tensor:
        reported, _ = model(pop, seed)
        return poisson_nll(reported, observed)

    params = {f"calibnn.{k}": v for k, v in model.calibnn.named_parameters()}
    params.update({f"observation.{k}": v for k, v in model.observation.named_parameters()})
    point = calibrate(loss, params, steps=steps, lr=lr, lr_decay=0.97,
                      progress=(lambda s, v: progress("point", s, v)) if progress else None)
    with torch.no_grad():
        fitted, beta_t = model(pop, seed)

    # GVI over (log β multiplier, ascertainment logit shift) around the point fit
    def loss_of(z: torch.Tensor) -> torch.Tensor:
        reported, _ = model(pop, seed, torch.exp(z[0]), z[1])
        return poisson_nll(reported, observed) * len(observed)

    for p in model.parameters():
        p.requires_grad_(False)
    prior = torch.distributions.Normal(torch.zeros(2), torch.tensor([0.2, 0.5]))
    post = fit_gvi(loss_of, DiagonalGaussian(torch.zeros(2), log_std=-3.0), prior,
                   steps=posterior_steps, samples=posterior_samples, lr=0.05,
                   progress=(lambda s, v: progress("posterior", s, v)) if progress else None)
    draws = []
    with torch.no_grad():
        for z in post.samples(12):
            draws.append(model(pop, seed, torch.exp(z[0]), z[1])[0])
    stack = torch.stack(draws)
    band = tuple(torch.quantile(stack, torch.tensor([0.05, 0.5, 0.95]), dim=0))
    return NYCFit(
        observed=observed,
        fitted=fitted,
        band=band,  # type: ignore[arg-type]
        beta_t=beta_t,
        ascertainment=float(model.observation.ascertainment),
        delay_mean=float(model.observation.delay_mean),
        quality=fit_quality(fitted, observed),
        runs=point.runs + post.runs + len(draws) + 1,
        seconds=point.seconds + post.seconds,
        series=series,
        n_agents=pop.n,
    )



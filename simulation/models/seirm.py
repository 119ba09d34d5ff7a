"""SEIRM: susceptible → exposed → infectious → recovered | dead, with interventions.

Stage durations are geometric with the given means: an agent leaves the latent (infectious)
stage on each following day with probability Δt/m, so it spends m days there on average
(``latent_days=3`` means 3.0 days, not 1/(1 − e^{−1/3}) = 3.53); m must be ≥ Δt. Susceptibility and mortality are
age-specific (per age band); transmission runs over all contact layers with layer weights.
Intervention substeps (testing, isolation, vaccination) are ordinary substeps, inserted in
the model's registry before ``infection``; behaviour models add their own the same way.

State: ``S E I R M`` indicators, ``isolated`` (0–1 reduction of a person's contacts after a
positive test), ``behaviour`` (0–1 voluntary contact reduction of the day, written by behaviour
policies such as ``simulation.behaviour``), ``vaccinated``, and ``new_infections`` / ``new_deaths`` of the day.
"""

from __future__ import annotations

import torch
from torch import nn

from simulation.substeps import State, Substep, SubstepModel

__all__ = ["SEIRM", "Testing", "Isolation", "Vaccination"]

# Relative susceptibility and infection fatality by ten-year age band (0-9 … 80+),
# COVID-19-like shapes (Davies et al. 2020; Levin et al. 2020), scaled to one.
DEFAULT_SUSCEPTIBILITY = (0.4, 0.39, 0.79, 0.86, 0.8, 0.82, 0.88, 0.74, 0.74)
DEFAULT_IFR = (2e-5, 6e-5, 3e-4, 8e-4, 2.2e-3, 6.4e-3, 2e-2, 6e-2, 1.5e-1)


def _daily_probability(mean_days: torch.Tensor, dt: float) -> torch.Tensor:
    """Daily leave probability Δt/m: geometric stage duration with mean m days (m ≥ Δt)."""
    return (dt / mean_days).clamp(max=1.0)


class Testing(Substep):
    """Daily tests: an infectious person tests positive with probability ``sensitivity·rate``."""

    reads = ("I",)
    writes = ("tested_positive",)

    def __init__(self, daily_test_rate: float = 0.05, sensitivity: float = 0.85, stream: int = 4):
        super().__init__()
        self.daily_test_rate = nn.Parameter(torch.tensor(daily_test_rate))
        self.sensitivity = sensitivity
        self.stream = stream

    def transition(self, state, action, ctx):
        p = (self.daily_test_rate * self.sensitivity).expand_as(state["I"])
        return {"tested_positive": state["I"] * ctx.estimator(p, ctx.uniforms[self.stream])}


class Isolation(Substep):
    """Positives isolate, cutting their contacts by ``efficacy``; isolation wanes daily."""

    reads = ("tested_positive", "isolated")
    writes = ("isolated",)

    def __init__(self, efficacy: float = 0.7, mean_duration: float = 10.0):
        super().__init__()
        self.efficacy = nn.Parameter(torch.tensor(efficacy))
        self.mean_duration = mean_duration

    def transition(self, state, action, ctx):
        keep = torch.exp(torch.tensor(-ctx.dt / self.mean_duration))
        iso = torch.maximum(state["isolated"] * keep, state["tested_positive"] * self.efficacy)
        return {"isolated": iso}


class Vaccination(Substep):
    """A daily fraction of susceptibles is vaccinated; vaccine cuts susceptibility."""

    reads = ("S", "vaccinated")
    writes = ("vaccinated",)

    def __init__(self, daily_rate: float = 0.0, efficacy: float = 0.8, stream: int = 5):
        super().__init__()
        self.daily_rate = nn.Parameter(torch.tensor(daily_rate))
        self.efficacy = efficacy
        self.stream = stream

    def transition(self, state, action, ctx):
        newly = (1 - state["vaccinated"]) * ctx.estimator(
            self.daily_rate.expand_as(state["vaccinated"]), ctx.uniforms[self.stream])
        return {"vaccinated": state["vaccinated"] + newly}


class Transmission(Substep):
    """S → E with hazard β · susceptibility(age) · (1 − vacc) · Σ_j w_ij I_j (1 − iso_j) / n_i
    (isolation and voluntary behaviour cut both sides of a contact)."""

    reads = ("S", "I", "isolated", "behaviour", "vaccinated")
    writes = ("S", "E", "new_infections")

    def __init__(self, beta: float, susceptibility: tuple[float, ...], vaccine_efficacy: float):
        super().__init__()
        self.beta = nn.Parameter(torch.tensor(beta))
        self.log_susceptibility = nn.Parameter(torch.log(torch.tensor(susceptibility)))
        self.vaccine_efficacy = vaccine_efficacy

    def observe(self, state, ctx):
        infectious = state["I"] * (1 - state["isolated"]) * (1 - state["behaviour"])
        return {"pressure": ctx.neighbour_sum(infectious)}

    def policy(self, state, obs, ctx):
        age = ctx.attributes["age_band"].long()
        sus = torch.exp(self.log_susceptibility)[age]
        protect = (
            (1 - state["isolated"]) * (1 - state["behaviour"])
            * (1 - self.vaccine_efficacy * state["vaccinated"])
        )
        hazard = self.beta * sus * protect * ctx.dt * obs["pressure"] / ctx.degree.clamp(min=1)
        return {"q": -torch.expm1(-hazard)}  # the day's infection probability if susceptible

    def transition(self, state, action, ctx):
        new = state["S"] * ctx.estimator(action["q"], ctx.uniforms[0])
        return {"S": state["S"] - new, "E": state["E"] + new, "new_infections": new}


class Progression(Substep):
    """E → I after the latent period; I → R or M after the infectious period."""

    reads = ("E", "I")
    writes = ("E", "I", "R", "M", "new_deaths")

    def __init__(self, latent_days: float, infectious_days: float, ifr: tuple[float, ...]):
        super().__init__()
        self.latent_days = nn.Parameter(torch.tensor(latent_days))
        self.infectious_days = nn.Parameter(torch.tensor(infectious_days))
        self.logit_ifr = nn.Parameter(torch.logit(torch.tensor(ifr)))

    def transition(self, state, action, ctx):
        exposed = state["E"] - state["new_infections"]  # not the ones infected today
        onset = exposed * ctx.estimator(
            _daily_probability(self.latent_days, ctx.dt).expand_as(exposed), ctx.uniforms[1])
        leave = state["I"] * ctx.estimator(
            _daily_probability(self.infectious_days, ctx.dt).expand_as(exposed), ctx.uniforms[2])
        ifr = torch.sigmoid(self.logit_ifr)[ctx.attributes["age_band"].long()]
        die = leave * ctx.estimator(ifr, ctx.uniforms[3])
        return {
            "E": state["E"] - onset,
            "I": state["I"] + onset - leave,
            "R": state["R"] + leave - die,
            "M": state["M"] + die,
            "new_deaths": die,
        }


class SEIRM(SubstepModel):
    """SEIRM with testing → isolation → vaccination → transmission → progression."""

    compartments = ("S", "E", "I", "R", "M")

    def __init__(
        self,
        beta: float = 0.6,
        latent_days: float = 3.0,
        infectious_days: float = 7.0,
        susceptibility: tuple[float, ...] = DEFAULT_SUSCEPTIBILITY,
        ifr: tuple[float, ...] = DEFAULT_IFR,
        initial_infected: float = 0.005,
        test_rate: float = 0.05,
        isolation_efficacy: float = 0.7,
        vaccination_rate: float = 0.0,
        vaccine_efficacy: float = 0.8,
    ) -> None:
        super().__init__()
        if len(susceptibility) != 9 or len(ifr) != 9:
            raise ValueError("susceptibility and ifr need one value per age band (9)")
        if latent_days < 1.0 or infectious_days < 1.0:
            raise ValueError("latent_days and infectious_days are mean durations in days (>= 1)")
        self.initial_infected = initial_infected
        self.add_substep("testing", Testing(test_rate))
        self.add_substep("isolation", Isolation(isolation_efficacy))
        self.add_substep("vaccination", Vaccination(vaccination_rate, vaccine_efficacy))
        self.add_substep("infection", Transmission(beta, susceptibility, vaccine_efficacy))
        self.add_substep("progression", Progression(latent_days, infectious_days, ifr))

    @property
    def beta(self) -> nn.Parameter:
        infection = self.substeps["infection"]
        assert isinstance(infection, Transmission)
        return infection.beta

    def n_uniform_streams(self) -> int:
        return 6 + len(self.extra_streams)

    @property
    def extra_streams(self) -> tuple[str, ...]:
        """Names of additional uniform streams requested by added substeps (index 6, 7, …)."""
        return getattr(self, "_extra_streams", ())

    def request_stream(self, name: str) -> int:
        """Reserve one more uniform stream for an added substep; returns its index."""
        streams = self.extra_streams
        if name not in streams:
            self._extra_streams = (*streams, name)
        return 6 + self.extra_streams.index(name)

    def initial_state(self, n: int, generator: torch.Generator, device: torch.device) -> State:
        infected = (torch.rand(n, generator=generator) < self.initial_infected).float().to(device)
        zeros = torch.zeros(n, device=device)
        return {
            "S": 1.0 - infected,
            "E": zeros.clone(),
            "I": infected,
            "R": zeros.clone(),
            "M": zeros.clone(),
            "isolated": zeros.clone(),
            "behaviour": zeros.clone(),
            "vaccinated": zeros.clone(),
            "tested_positive": zeros.clone(),
            "new_infections": infected.clone(),
            "new_deaths": zeros.clone(),
        }

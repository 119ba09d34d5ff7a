"""The Private-ABM SIR (Chopra et al., AAMAS 2024).

Susceptible agent i is infected on a day with probability

    p_i = S_i · (1 − exp(−β Δt / n_i · Σ_{j∈N(i)} I_j))

and an infected agent recovers with probability 1 − exp(−γ Δt) (γ is a daily *rate*: the
infectious period is geometric with mean 1/(1 − exp(−γ)) days, e.g. 10.5 for γ = 0.1).
Events are written ``state · event(q, u)`` (the state factor outside the Bernoulli draw) so
that gradient estimators differentiate the state exactly (``simulation.estimators``). The neighbour sum is a
hook (``StepContext.neighbour_sum``): the central run uses the CSR kernel, a decentralised
run uses the secure neighbourhood protocol, and both give the same events.
"""

from __future__ import annotations

import torch
from torch import nn

from simulation.substeps import State, StepContext, Substep, SubstepModel

__all__ = ["SIR", "contact_probability", "infection_probability", "infection_probability_dbeta"]


def _hazard(neighbour_infected_sum, degree, beta, dt):
    n = torch.clamp(torch.as_tensor(degree, dtype=torch.float32), min=1.0)
    return beta * dt / n * neighbour_infected_sum


def contact_probability(
    neighbour_infected_sum: torch.Tensor, degree: torch.Tensor, beta: torch.Tensor | float, dt: float = 1.0
) -> torch.Tensor:
    """q_i = 1 − exp(−β Δt / n_i Σ_j I_j): the day's infection probability *if* i is susceptible."""
    return -torch.expm1(-_hazard(neighbour_infected_sum, degree, beta, dt))


def infection_probability(
    neighbour_infected_sum: torch.Tensor,
    susceptible: torch.Tensor,
    degree: torch.Tensor,
    beta: torch.Tensor | float,
    dt: float = 1.0,
) -> torch.Tensor:
    """p_i = S_i (1 − exp(−β Δt / n_i Σ_j I_j)); agents without contacts (n_i = 0) get 0.

    For a fractional S_i (mean-field state) this is the expected new infection S_i · q_i."""
    return susceptible * contact_probability(neighbour_infected_sum, degree, beta, dt)


def infection_probability_dbeta(
    neighbour_infected_sum: torch.Tensor,
    susceptible: torch.Tensor,
    degree: torch.Tensor,
    beta: torch.Tensor | float,
    dt: float = 1.0,
) -> torch.Tensor:
    """Closed-form ∂p_i/∂β = S_i · exp(−β h_i) · h_i with h_i = Δt / n_i · Σ_j I_j
    (LPM paper Eq. 11–12; equals (1 − p_i) h_i for a susceptible agent)."""
    h = _hazard(neighbour_infected_sum, degree, 1.0, dt)
    return susceptible * torch.exp(-h * beta) * h


class Infection(Substep):
    """Observe infected contacts, compute the risk p_i, draw infections."""

    reads = ("S", "I")
    writes = ("S", "I", "new_infections")

    def __init__(self, beta: float) -> None:
        super().__init__()
        self.beta = nn.Parameter(torch.tensor(float(beta)))

    def observe(self, state: State, ctx: StepContext) -> dict[str, torch.Tensor]:
        return {"infected_contacts": ctx.neighbour_sum(state["I"])}

    def policy(self, state, obs, ctx):
        beta_t = ctx.extras.get("beta_t")  # optional time-varying β (e.g. from CalibNN)
        beta = self.beta if beta_t is None else beta_t[ctx.day]
        return {"q": contact_probability(obs["infected_contacts"], ctx.degree, beta, ctx.dt)}

    def transition(self, state, action, ctx):
        new = state["S"] * ctx.estimator(action["q"], ctx.uniforms[0])
        return {"S": state["S"] - new, "I": state["I"] + new, "new_infections": new}


class Recovery(Substep):
    """Infected agents recover with probability 1 − exp(−γ Δt)."""

    reads = ("I", "R")
    writes = ("I", "R")

    def __init__(self, gamma: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.tensor(float(gamma)))

    def transition(self, state, action, ctx):
        # infected at the start of the day (today's new infections do not recover today)
        infected = state["I"] - state["new_infections"]
        rec = infected * ctx.estimator(-torch.expm1(-self.gamma * ctx.dt).expand_as(infected),
                                       ctx.uniforms[1])
        return {"I": state["I"] - rec, "R": state["R"] + rec}


class SIR(SubstepModel):
    """SIR over one contact graph: substeps ``infection`` then ``recovery``."""

    compartments = ("S", "I", "R")

    def __init__(self, beta: float = 0.5, gamma: float = 0.1, initial_infected: float = 0.01) -> None:
        super().__init__()
        if not 0.0 <= initial_infected <= 1.0:
            raise ValueError("initial_infected must be a fraction in [0, 1]")
        self.initial_infected = initial_infected
        self.add_substep("infection", Infection(beta))
        self.add_substep("recovery", Recovery(gamma))

    @property
    def beta(self) -> nn.Parameter:
        infection = self.substeps["infection"]
        assert isinstance(infection, Infection)
        return infection.beta

    @property
    def gamma(self) -> nn.Parameter:
        recovery = self.substeps["recovery"]
        assert isinstance(recovery, Recovery)
        return recovery.gamma

    def initial_state(self, n: int, generator: torch.Generator, device: torch.device) -> State:
        infected = (torch.rand(n, generator=generator) < self.initial_infected).float().to(device)
        return {
            "S": 1.0 - infected,
            "I": infected,
            "R": torch.zeros(n, device=device),
            "new_infections": infected.clone(),
        }

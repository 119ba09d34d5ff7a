"""Personal forecast model: a device's infection risk over the next T days per behaviour option.

The hazard is the project SIR's (``simulation.models.sir``, DESIGN.md §2):

    p = 1 − exp(−β S Δt / n · Σ_j I_j)

where the device's own infected-neighbour sum Σ_j I_j is replaced by its expectation under a
behaviour option k and the public community exposure forecast π (probability that a contact
in layer l on day t is infectious):

    λ_{k,t} = β · s · Δt / n · (1 − mask_k) · Σ_l c_{k,l} (1 − isolation_k · a_l) π_{t,l}

with s = susceptible flag × age-band susceptibility, n = the device's baseline degree (its
usual number of daily contacts, the SIR's n_i; n = 0 gives p = 0), c_{k,l} the contacts per
day in layer l under option k, and a_l = 1 where isolation applies (work, community) and 0
where it does not (household). With the baseline option (usual contacts, no isolation, no
mask) this is exactly the SIR's p_i. Days are independent given the forecast, so

    risk_k(T) = 1 − Π_t exp(−λ_{k,t})          (expected-value mode)
    ∂risk_k/∂β = Q_k · Σ_t g_{k,t}              (closed form, LPM Eq. 11–12; g = ∂λ/∂β = λ/β)

and in Monte Carlo mode sample m of option k is infected on the first day t with
``uniforms[t, m, k] < p_{k,t}`` (uniforms are an input: no random op is exported, because the
onnxruntime ``Bernoulli`` kernel is inverted, DESIGN.md §4). The horizon is a ``scan`` so the
exported graph carries an ONNX ``Scan`` with a dynamic T.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch._higher_order_ops.scan import scan

from mobile_export.schema import (
    DEFAULT_HORIZON,
    INPUT_NAMES,
    ISOLATION_APPLIES,
    LAYERS,
    OUTPUT_NAMES,
    STATE_FIELDS,
    THETA_FIELDS,
    Theta,
)

__all__ = [
    "DEFAULT_HORIZON",
    "INPUT_NAMES",
    "ISOLATION_APPLIES",
    "LAYERS",
    "OUTPUT_NAMES",
    "STATE_FIELDS",
    "THETA_FIELDS",
    "PersonalForecast",
    "Theta",
    "example_inputs",
]


class PersonalForecast(nn.Module):
    """Forecast a device's infection risk per behaviour option over a dynamic horizon.

    Inputs (float32; K options, L = len(layers), T days, M Monte Carlo samples, M may be 0):
    ``state`` (3,) = STATE_FIELDS, ``contacts`` (K, L), ``isolation`` (K,) in [0, 1],
    ``mask`` (K,) in [0, 1] (relative transmission reduction), ``prevalence`` (T, L),
    ``theta`` (2,) = THETA_FIELDS, ``uniforms`` (T, M, K) in [0, 1).

    Outputs: ``risk`` (K,) P(infected within T days); ``daily_risk`` (T, K) cumulative risk
    at the end of each day; ``drisk_dbeta`` (K,) closed-form ∂risk/∂β; ``mc_infection_day``
    (M, K) float32 day index of infection in Monte Carlo sample m, −1 if not infected.
    """

    isolation_applies: torch.Tensor  # buffer [1, L]: 1 where isolating removes that layer

    def __init__(
        self,
        layers: Sequence[str] = LAYERS,
        isolation_applies: Sequence[float] = ISOLATION_APPLIES,
    ) -> None:
        super().__init__()
        if len(layers) != len(isolation_applies) or not layers:
            raise ValueError("layers and isolation_applies must be non-empty and equally long")
        self.layers = tuple(layers)
        # (L, 1) column: keeps the layer mixing a 2-D MatMul (DESIGN.md §4).
        self.register_buffer(
            "isolation_applies",
            torch.tensor(list(isolation_applies), dtype=torch.float32).reshape(1, -1),
        )

    def hazard_slope(
        self,
        state: Tensor,
        contacts: Tensor,
        isolation: Tensor,
        mask: Tensor,
        prevalence: Tensor,
        dt: Tensor,
    ) -> Tensor:
        """g_{t,k} = ∂λ_{k,t}/∂β, shape (T, K); λ = β g."""
        susceptibility = state[0] * state[1]
        degree = state[2]
        has_contacts = (degree > 0).to(state.dtype)
        per_degree = susceptibility * dt * has_contacts / torch.clamp(degree, min=1e-12)
        kept = 1.0 - isolation.unsqueeze(1) * self.isolation_applies  # (K, L)
        effective = contacts * kept  # (K, L)
        exposure = torch.matmul(prevalence, effective.transpose(0, 1))  # (T, K)
        return exposure * ((1.0 - mask) * per_degree).unsqueeze(0)

    def forward(
        self,
        state: Tensor,
        contacts: Tensor,
        isolation: Tensor,
        mask: Tensor,
        prevalence: Tensor,
        theta: Tensor,
        uniforms: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        beta = theta[0]
        slope = self.hazard_slope(state, contacts, isolation, mask, prevalence, theta[1])
        hazard = beta * slope  # (T, K)
        days = torch.cumsum(torch.ones_like(hazard[:, :1]), dim=0) - 1.0  # (T, 1): 0..T-1

        def step(
            carry: tuple[Tensor, Tensor, Tensor, Tensor], xs: tuple[Tensor, Tensor, Tensor, Tensor]
        ) -> tuple[tuple[Tensor, Tensor, Tensor, Tensor], Tensor]:
            survival, dsurvival, alive, day = carry
            lam, g, u, t = xs
            escape = torch.exp(-lam)  # 1 − p
            p = 1.0 - escape
            next_survival = survival * escape
            next_dsurvival = dsurvival * escape - next_survival * g
            hit = (u < p).to(u.dtype) * alive
            next_day = day + hit * (t + 1.0)  # day starts at −1
            return (next_survival, next_dsurvival, alive - hit, next_day), 1.0 - next_survival

        ones_k = hazard.new_ones(hazard.shape[1:])
        ones_mk = uniforms.new_ones(uniforms.shape[1:])
        init = (ones_k, torch.zeros_like(ones_k), ones_mk, -ones_mk)
        (survival, dsurvival, _alive, day), daily_risk = scan(
            step, init, (hazard, slope, uniforms, days)
        )
        return 1.0 - survival, daily_risk, -dsurvival, day


def example_inputs(
    horizon: int = DEFAULT_HORIZON,
    options: int = 8,
    samples: int = 4,
    layers: int = len(LAYERS),
    seed: int = 0,
    theta: Theta | None = None,
) -> tuple[Tensor, ...]:
    """A plausible input tuple (test fixtures, export tracing, benchmarks). Not security-relevant."""
    gen = torch.Generator().manual_seed(seed)
    state = torch.tensor([1.0, 0.8, 12.0])
    contacts = torch.rand(options, layers, generator=gen) * torch.tensor([4.0, 8.0, 10.0])[:layers]
    isolation = torch.rand(options, generator=gen)
    mask = torch.rand(options, generator=gen) * 0.7
    prevalence = torch.rand(horizon, layers, generator=gen) * 0.2
    theta_t = (theta or Theta()).as_tensor()
    uniforms = torch.rand(horizon, samples, options, generator=gen)
    return state, contacts, isolation, mask, prevalence, theta_t, uniforms

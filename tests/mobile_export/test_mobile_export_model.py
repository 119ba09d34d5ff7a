"""The torch forecast model: SIR-consistent hazard, closed-form ∂risk/∂β, Monte Carlo mode."""

from __future__ import annotations

import math

import pytest
import torch

from mobile_export.model import PersonalForecast, Theta, example_inputs


def _run(model: PersonalForecast, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        return model(*inputs)


def test_baseline_option_is_the_sir_hazard() -> None:
    """Usual contacts, no isolation, no mask: each day's p is the SIR's p_i with Σ I_j replaced
    by its expectation Σ_l c_l π_{t,l} and n_i = the usual degree."""
    model = PersonalForecast()
    beta, dt, sus, age = 0.37, 0.5, 1.0, 0.8
    usual = torch.tensor([[2.0, 5.0, 7.0]])
    degree = float(usual.sum())
    prevalence = torch.tensor([[0.05, 0.1, 0.02], [0.0, 0.3, 0.1], [0.2, 0.0, 0.0]])
    state = torch.tensor([sus, age, degree])
    zeros = torch.zeros(1)
    risk, daily, _, _ = _run(
        model,
        (state, usual, zeros, zeros, prevalence, torch.tensor([beta, dt]), torch.zeros(3, 0, 1)),
    )
    survival = 1.0
    for t in range(3):
        infected_sum = float((usual[0] * prevalence[t]).sum())
        p = 1.0 - math.exp(-beta * sus * age * dt / degree * infected_sum)
        survival *= 1.0 - p
        assert daily[t, 0].item() == pytest.approx(1.0 - survival, abs=1e-6)
    assert risk[0].item() == pytest.approx(1.0 - survival, abs=1e-6)


def test_project_sir_agrees() -> None:
    """One day, baseline option: risk and ∂risk/∂β equal simulation.models.sir's p_i and
    closed-form ∂p_i/∂β with Σ_j I_j = Σ_l c_l π_l (several devices, incl. n_i = 0 and S = 0)."""
    from simulation.models.sir import infection_probability, infection_probability_dbeta

    model = PersonalForecast()
    beta, dt = 0.45, 0.7
    prevalence = torch.tensor([[0.1, 0.2, 0.3]])
    theta = torch.tensor([beta, dt])
    zeros = torch.zeros(1)
    for contacts, susceptible in (
        ([1.0, 4.0, 5.0], 1.0),
        ([0.0, 0.0, 0.0], 1.0),
        ([2.0, 0.0, 9.0], 0.0),
        ([6.0, 1.0, 0.5], 1.0),
    ):
        c = torch.tensor([contacts])
        degree = float(c.sum())
        state = torch.tensor([susceptible, 1.0, degree])
        risk, _, drisk, _ = _run(
            model, (state, c, zeros, zeros, prevalence, theta, torch.zeros(1, 0, 1))
        )
        args = (
            torch.tensor([float((c[0] * prevalence[0]).sum())]),
            torch.tensor([susceptible]),
            torch.tensor([degree]),
            torch.tensor(beta),
            dt,
        )
        assert risk[0].item() == pytest.approx(infection_probability(*args).item(), abs=1e-6)
        assert drisk[0].item() == pytest.approx(infection_probability_dbeta(*args).item(), abs=1e-6)


def test_protective_factors() -> None:
    model = PersonalForecast()
    prevalence = torch.full((7, 3), 0.1)
    state = torch.tensor([1.0, 1.0, 10.0])
    contacts = torch.tensor([[3.0, 4.0, 3.0]] * 4)
    isolation = torch.tensor([0.0, 1.0, 0.0, 0.0])
    mask = torch.tensor([0.0, 0.0, 1.0, 0.5])
    risk, *_ = _run(
        model,
        (state, contacts, isolation, mask, prevalence, Theta().as_tensor(), torch.zeros(7, 0, 4)),
    )
    # full isolation keeps only household contacts (3 of 10 exposure units)
    only_household = 1 - math.exp(-7 * 0.5 * 0.1 * 3 / 10)
    assert risk[1].item() == pytest.approx(only_household, abs=1e-6)
    assert risk[2].item() == 0.0  # a perfect mask
    assert 0 < risk[3] < risk[0]
    # not susceptible, or no usual contacts (SIR guard n = 0): no risk
    for bad_state in (torch.tensor([0.0, 1.0, 10.0]), torch.tensor([1.0, 1.0, 0.0])):
        r, *_ = _run(
            model,
            (
                bad_state,
                contacts,
                isolation,
                mask,
                prevalence,
                Theta().as_tensor(),
                torch.zeros(7, 0, 4),
            ),
        )
        assert torch.equal(r, torch.zeros(4))


@pytest.mark.parametrize("horizon", [1, 7, 20])
def test_closed_form_gradient_matches_autograd_and_finite_differences(horizon: int) -> None:
    model = PersonalForecast().double()
    state, contacts, isolation, mask, prevalence, theta, uniforms = (
        t.double() for t in example_inputs(horizon, 6, 0, seed=horizon)
    )
    theta = theta.clone().requires_grad_(True)
    risk, daily, drisk, _ = model(state, contacts, isolation, mask, prevalence, theta, uniforms)
    autograd = torch.stack(
        [torch.autograd.grad(risk[k], theta, retain_graph=True)[0][0] for k in range(6)]
    )
    torch.testing.assert_close(drisk, autograd, atol=1e-12, rtol=1e-10)
    h = 1e-6
    with torch.no_grad():
        up = model(
            state, contacts, isolation, mask, prevalence, theta + torch.tensor([h, 0.0]), uniforms
        )[0]
        down = model(
            state, contacts, isolation, mask, prevalence, theta - torch.tensor([h, 0.0]), uniforms
        )[0]
    torch.testing.assert_close(drisk.detach(), (up - down) / (2 * h), atol=1e-8, rtol=1e-6)
    assert torch.all(daily[1:] >= daily[:-1])
    torch.testing.assert_close(daily[-1], risk)


def test_monte_carlo_mode() -> None:
    model = PersonalForecast()
    state, contacts, isolation, mask, prevalence, theta, _ = example_inputs(7, 8, 0, seed=3)
    uniforms = torch.rand(7, 20_000, 8, generator=torch.Generator().manual_seed(1))
    risk, _, _, day = _run(model, (state, contacts, isolation, mask, prevalence, theta, uniforms))
    infected = day >= 0
    assert set(day.unique().tolist()) <= set(range(-1, 7))
    mc = infected.double().mean(0)
    sigma = torch.sqrt(risk.double() * (1 - risk.double()) / 20_000)
    assert torch.all((mc - risk.double()).abs() <= 5 * sigma + 1e-12)
    # the first day with u < p is the infection day (recomputed by hand for one sample)
    p = 1 - torch.exp(
        -theta[0] * model.hazard_slope(state, contacts, isolation, mask, prevalence, theta[1])
    )
    hits = uniforms[:, 0, :] < p
    first = torch.where(hits.any(0), hits.float().argmax(0), torch.tensor(-1))
    assert torch.equal(day[0].long(), first)

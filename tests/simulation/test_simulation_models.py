"""Model semantics pinned by issue 15: mean-field update S·q, stage durations with the stated
means, and the event form ``state · event(q, u)`` (same events, exact state derivative)."""

import pytest
import torch

from simulation.engine import simulate
from simulation.estimators import get_estimator
from simulation.kernels import NeighbourSum
from simulation.models import SEIRM, SIR, infection_probability
from simulation.population import random_contact_graph
from simulation.substeps import StepContext


def _ctx(n, graph, estimator="expected", streams=2, day=0):
    layer = graph.merged()
    return StepContext(day=day, dt=1.0, uniforms=torch.rand(streams, n, generator=torch.Generator().manual_seed(1)),
                       estimator=get_estimator(estimator), neighbour_sum=NeighbourSum(layer),
                       degree=layer.degree().float(), attributes={"age_band": torch.zeros(n, dtype=torch.int8)})


def test_mean_field_update_is_s_times_one_minus_exp():
    """Fractional S (mean field): new = S (1 − exp(−β h)), not 1 − exp(−β S h)."""
    n = 2000
    g = random_contact_graph(n, 10, seed=0)
    s = torch.full((n,), 0.5)
    i = torch.full((n,), 0.3)
    state = {"S": s.clone(), "I": i.clone(), "R": 0.2 * torch.ones(n), "new_infections": torch.zeros(n)}
    ctx = _ctx(n, g)
    out = SIR(beta=0.8, gamma=0.1).step(state, ctx)
    h = NeighbourSum(g.merged()).plain(i) / g.merged().degree().float().clamp(min=1)
    expect = s * -torch.expm1(-0.8 * h)
    assert torch.allclose(out["new_infections"], expect, atol=1e-6)
    wrong = -torch.expm1(-0.8 * s * h)
    assert not torch.allclose(out["new_infections"], wrong, atol=1e-3)
    assert torch.allclose(infection_probability(h * g.merged().degree().float(), s, g.merged().degree().float(), 0.8),
                          expect, atol=1e-6)


@pytest.mark.parametrize(("stage", "days"), [("E", 3.0), ("I", 7.0), ("E", 5.0)])
def test_seirm_stage_durations_have_the_stated_mean(stage, days):
    """Everyone starts in one stage with β = 0; Σ_days stage count / N is the mean stay."""
    n = 100_000
    g = random_contact_graph(n, 4, seed=0)
    kwargs = {"latent_days": days} if stage == "E" else {"infectious_days": days}
    model = SEIRM(beta=0.0, **kwargs)
    zeros = torch.zeros(n)
    state = {k: zeros.clone() for k in ("S", "E", "I", "R", "M", "isolated", "behaviour", "vaccinated",
                                         "tested_positive", "new_infections", "new_deaths")}
    state[stage] = torch.ones(n)
    with torch.no_grad():
        tr = simulate(model, g, 120, seed=3, initial_state=state)
    mean_stay = tr[stage].sum().item() / n  # day 0 counts as the first day in the stage
    se = (days * (days - 1)) ** 0.5 / n**0.5  # sd of a geometric(1/m) stay is sqrt(m(m − 1))
    assert abs(mean_stay - days) < 5 * se + 0.01, mean_stay
    old = 1 / (1 - torch.exp(torch.tensor(-1 / days))).item()  # the old 1 − e^{−1/m} rate
    assert abs(mean_stay - old) > 0.3


def test_stage_duration_below_one_day_is_rejected():
    with pytest.raises(ValueError, match="days"):
        SEIRM(latent_days=0.5)


def test_event_form_keeps_the_events_and_differentiates_the_state():
    """Binary states: every estimator gives the same events; the smoothed derivative of an
    event that happened is zero and of one that did not is 1/(1 − q)."""
    g = random_contact_graph(3000, 10, seed=1)
    runs = [simulate(SIR(0.4, 0.15), g, 25, seed=2, estimator=e) for e in
            ("smoothed", "straight_through", "relaxed")]
    for tr in runs[1:]:
        assert torch.equal(tr["I"], runs[0]["I"])
    q = torch.tensor([0.2, 0.2, 0.6], requires_grad=True)
    u = torch.tensor([0.1, 0.5, 0.9])
    x = get_estimator("smoothed")(q, u)
    x.sum().backward()
    assert x.tolist() == [1.0, 0.0, 0.0]
    assert torch.allclose(q.grad, torch.tensor([0.0, 1 / 0.8, 1 / 0.4]))

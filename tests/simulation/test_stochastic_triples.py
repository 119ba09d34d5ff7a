"""The 'triples' estimator: exact primal, exact coupled alternative paths, unbiased derivative."""

# ruff: noqa: E741  (S, I are the epidemiological names)

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from simulation.engine import SimulationError, simulate, step_uniforms
from simulation.fused_sir import run_sir_nonbacktracking
from simulation.kernels import NeighbourSum
from simulation.models.seirm import SEIRM
from simulation.models.sir import SIR
from simulation.population import CSRLayer, random_contact_graph, synthesize
from simulation.rng import counter_uniforms
from simulation.stochastic_triples import StochasticTripleError, primal_path, run_sir_triples
from simulation.stochastic_triples_seirm import SEIRM_PARAMS, SERIES, seirm_path
from simulation.substeps import Substep


def _layer(n: int, degree: float, seed: int = 0) -> CSRLayer:
    return random_contact_graph(n, degree, seed=seed).merged()


def _start(n: int, seed: int, frac: float = 0.02) -> tuple[torch.Tensor, torch.Tensor]:
    infected = (torch.rand(n, generator=torch.Generator().manual_seed(seed)) < frac).float()
    return 1.0 - infected, infected


def _brute_force(layer: CSRLayer, S0, I0, beta, gamma, days, seed, force=None) -> np.ndarray:
    """Plain numpy SIR over the same counter-based uniforms; ``force`` = (day, agent, param)
    makes that event happen. Returns [days + 1, 3] (S, I, new) totals."""
    n = layer.n
    indptr, indices = layer.indptr.numpy(), layer.indices.numpy()
    rows = np.repeat(np.arange(n), np.diff(indptr))
    deg = np.maximum(np.diff(indptr).astype(np.float64), 1.0)
    S, I = S0.numpy().astype(np.int64), I0.numpy().astype(np.int64)
    out = [(S.sum(), I.sum(), I.sum())]
    r = -math.expm1(-gamma)
    for day in range(days):
        u = counter_uniforms(seed, day, n, torch.device("cpu"), 2).numpy()
        c = np.bincount(rows, weights=I[indices], minlength=n)
        x = ((S == 1) & (c > 0) & (u[0] < 1.0 - np.exp(-beta * c / deg))).astype(np.int64)
        y = ((I == 1) & (u[1] < r)).astype(np.int64)
        if force is not None and force[0] == day:
            (x if force[2] == "beta" else y)[force[1]] = 1
        S, I = S - x, I + x - I * y
        out.append((S.sum(), I.sum(), x.sum()))
    return np.array(out, np.float64)


def test_primal_equals_the_fused_forward():
    layer = _layer(3000, 8.0)
    for seed in (0, 1):
        S0, I0 = _start(layer.n, seed)
        fused, *_ = run_sir_nonbacktracking(layer, S0, I0, 0.4, 0.15, 30, seed, tangents=False)
        series, jac, *_ = run_sir_triples(layer, S0, I0, 0.4, 0.15, 30, seed, flips=50)
        assert np.array_equal(series, fused)
        assert np.abs(jac).sum() > 0


@pytest.mark.parametrize("param", ["beta", "gamma"])
def test_coupled_alternative_paths_equal_a_full_rerun_with_the_event_forced(param):
    layer = _layer(1500, 6.0, seed=3)
    S0, I0 = _start(layer.n, 5)
    beta, gamma, days, seed = 0.35, 0.12, 25, 11
    path = primal_path(layer, S0, I0, beta, gamma, days, seed)
    primal = _brute_force(layer, S0, I0, beta, gamma, days, seed)
    assert np.array_equal(path.series()[:, [0, 1, 3]], primal)
    fday, fagent, _ = path.sample(param, 40, np.random.default_rng(0))
    effects = path.coupled_effects(fday, fagent, param)
    moved = 0
    for k, (d, a) in enumerate(zip(fday, fagent, strict=True)):
        alt = _brute_force(layer, S0, I0, beta, gamma, days, seed, force=(int(d), int(a), param))
        assert np.array_equal(effects[k], alt - primal), (d, a)
        moved += int(np.abs(alt - primal).sum() > 0)
    assert moved == len(fday)  # every drawn event changes the path (it did not happen in the primal)


def _exact_expected_total(adjacency: list[list[int]], infected0: tuple[int, ...], beta, gamma, days):
    """E[total infections] of the SIR day by enumerating every event outcome (tiny graphs)."""
    n = len(adjacency)
    deg = [max(len(a), 1) for a in adjacency]
    r = -torch.expm1(-gamma)
    dist = {(tuple(1 - i for i in infected0), infected0): torch.tensor(1.0, dtype=torch.float64)}
    expected = torch.tensor(float(sum(infected0)), dtype=torch.float64)
    for _ in range(days):
        nxt: dict = {}
        for (S, I), prob in dist.items():
            probs = []
            for m in range(n):
                if S[m]:
                    c = sum(I[j] for j in adjacency[m])
                    probs.append(-torch.expm1(-beta * c / deg[m]))
                elif I[m]:
                    probs.append(r)
                else:
                    probs.append(torch.tensor(0.0, dtype=torch.float64))
            for events in itertools.product((0, 1), repeat=n):
                p = prob
                for m, e in enumerate(events):
                    p = p * (probs[m] if e else 1 - probs[m])
                S2 = tuple(S[m] - (events[m] if S[m] else 0) for m in range(n))
                I2 = tuple(I[m] + (events[m] if S[m] else 0) - (events[m] if I[m] else 0) for m in range(n))
                expected = expected + p * sum(events[m] for m in range(n) if S[m])
                nxt[(S2, I2)] = nxt.get((S2, I2), 0) + p
        dist = nxt
    return expected


def test_the_estimate_is_unbiased_against_the_exact_derivative_of_the_expectation():
    """Triangle plus a pendant agent, 4 days: E[total] by enumeration, differentiated exactly;
    the flip estimate averaged over 3000 seeds (fresh uniforms each) lands within 4 se."""
    adjacency = [[1, 2], [0, 2, 3], [0, 1], [1]]
    indptr = torch.tensor([0, 2, 5, 7, 8], dtype=torch.int64)
    indices = torch.tensor([j for a in adjacency for j in a], dtype=torch.int32)
    layer = CSRLayer(indptr, indices)
    beta0, gamma0, days = 0.9, 0.3, 4
    beta = torch.tensor(beta0, dtype=torch.float64, requires_grad=True)
    gamma = torch.tensor(gamma0, dtype=torch.float64, requires_grad=True)
    exact = torch.autograd.grad(_exact_expected_total(adjacency, (1, 0, 0, 0), beta, gamma, days), (beta, gamma))
    S0, I0 = torch.tensor([0.0, 1, 1, 1]), torch.tensor([1.0, 0, 0, 0])
    est = np.array([[s.value for s in run_sir_triples(layer, S0, I0, beta0, gamma0, days, seed, flips=8)[5].values()]
                    for seed in range(3000)])
    mean, se = est.mean(0), est.std(0, ddof=1) / math.sqrt(len(est))
    for k, name in enumerate(("beta", "gamma")):
        assert abs(mean[k] - float(exact[k])) < 4 * se[k], (name, mean[k], float(exact[k]), se[k])
        assert se[k] < 0.1 * abs(float(exact[k]))  # the check has power


def test_backward_through_simulate_is_the_jacobian_transpose():
    pop = random_contact_graph(2000, 8.0, seed=1)
    model = SIR(beta=0.4, gamma=0.15, initial_infected=0.02)
    traj = simulate(model, pop, 20, seed=4, estimator="triples")
    g = torch.linspace(0.0, 1.0, 21)
    (traj.series["new_infections"] * g).sum().backward()
    S0, I0 = _start(pop.n, 4)
    state = model.initial_state(pop.n, torch.Generator().manual_seed(4), torch.device("cpu"))
    _, jac, *_ = run_sir_triples(pop.merged(), state["S"], state["I"], 0.4, 0.15, 20, 4)
    expect = (g.double()[:, None] * torch.from_numpy(jac[:, 3, :])).sum(0)
    assert float(model.beta.grad) == pytest.approx(float(expect[0]), rel=1e-5)
    assert float(model.gamma.grad) == pytest.approx(float(expect[1]), rel=1e-5)
    with torch.no_grad():
        plain = simulate(SIR(beta=0.4, gamma=0.15, initial_infected=0.02), pop, 20, seed=4)
    assert torch.equal(plain.series["new_infections"], traj.series["new_infections"].detach())


def test_clear_errors_where_the_estimator_does_not_apply():
    layer = _layer(200, 4.0)
    weighted = CSRLayer(layer.indptr, layer.indices, torch.full((layer.nnz,), 0.5))
    S0, I0 = _start(layer.n, 0, 0.1)
    with pytest.raises(StochasticTripleError, match="unit-weight"):
        run_sir_triples(weighted, S0, I0, 0.3, 0.1, 5, 0)
    with pytest.raises(StochasticTripleError, match="flips"):
        run_sir_triples(layer, S0, I0, 0.3, 0.1, 5, 0, flips=0)
    with pytest.raises(StochasticTripleError, match="unknown parameters"):
        run_sir_triples(layer, S0, I0, 0.3, 0.1, 5, 0, wrt=("delta",))
    pop = random_contact_graph(200, 4.0, seed=0)
    extended = SEIRM()
    extended.add_substep("noop", Substep(), after="progression")
    with pytest.raises(SimulationError, match="triples"):
        simulate(extended, pop, 3, estimator="triples").total_infections.backward()


def _seirm() -> SEIRM:
    return SEIRM(beta=0.5, latent_days=3.0, infectious_days=6.0, test_rate=0.1)  # testing: isolation moves


@pytest.mark.parametrize("param", SEIRM_PARAMS)
def test_seirm_alternative_paths_equal_engine_reruns_with_the_event_forced(param):
    """The primal path is the engine's run; each coupled path by difference equals the
    engine's own run with that one uniform moved (u = 0 forces an infection, u = 1
    suppresses an onset, an exit or, for the isolation efficacy, an infection), on the
    NYC-like population with isolation."""
    pop = synthesize("nyc", seed=0, scale=0.001)
    graph = pop.graph.merged()
    days, seed = 20, 3
    with torch.no_grad():
        ref = simulate(_seirm(), pop, days, seed, estimator="smoothed")
    path = seirm_path(_seirm(), graph, pop.attributes, days, seed, NeighbourSum(graph), graph.degree().float())
    base = np.stack([ref.series[c].double().numpy() for c in SERIES], 1)
    assert np.array_equal(path.series(), base)
    p = SEIRM_PARAMS.index(param)
    fday, fagent, _ = path.sample(p, 8, np.random.default_rng(1))
    effects = path.coupled_effects(fday, fagent, p)
    for k, (d, a) in enumerate(zip(fday.tolist(), fagent.tolist(), strict=True)):
        def moved(day, streams, d=d, a=a):
            u = step_uniforms(seed, day, graph.n, "cpu", streams)
            if day == d:
                stream = {"beta": 0, "latent_days": 1, "infectious_days": 2, "efficacy": 0}[param]
                u[stream, a] = 0.0 if param == "beta" else 1.0  # force an infection; suppress the others
            return u

        with torch.no_grad():
            alt = simulate(_seirm(), pop, days, seed, estimator="smoothed", uniforms=moved)
        assert np.array_equal(effects[k], np.stack([alt.series[c].double().numpy() for c in SERIES], 1) - base)


def test_seirm_backward_reaches_the_four_parameters():
    pop = synthesize("nyc", seed=0, scale=0.001)
    model = _seirm()
    with pytest.raises(StochasticTripleError, match="freeze"):  # susceptibility, IFR, test rate
        simulate(model, pop, 20, seed=2, estimator="triples")
    for name, p in model.named_parameters():
        p.requires_grad_(name.rsplit(".", 1)[-1] in SEIRM_PARAMS)
    traj = simulate(model, pop, 20, seed=2)  # "auto" picks triples when only these need gradients
    assert traj.meta["estimator"] == "triples"
    traj.total_infections.backward()
    tr, pg = model.substeps["infection"], model.substeps["progression"]
    assert float(tr.beta.grad) > 0 and float(pg.infectious_days.grad) > 0 and float(pg.latent_days.grad) < 0
    assert float(model.substeps["isolation"].efficacy.grad) < 0
    with torch.no_grad():
        plain = simulate(_seirm(), pop, 20, seed=2, estimator="triples")
    assert plain.meta["estimator"] == "smoothed"  # nothing to differentiate: the plain forward
    assert torch.equal(plain.series["new_infections"], traj.series["new_infections"].detach())

"""Forward-mode tangents (dual numbers) through the partitioned engine: ``simulate`` on a
PartitionedPopulation under ``forward_sensitivity`` gives the single-process run's d(series)/dβ
(real processes over gloo on 127.0.0.1). The halo exchange sends values and tangents in one
all_to_all (``DistributedNeighbourSum.dual``); the series' tangents are summed over ranks."""

from __future__ import annotations

import pytest
import torch

from simulation.calibration.sensitivity import forward_sensitivity
from simulation.distributed.launch import spawn_local
from simulation.models import SEIRM, SIR
from simulation.population import synthesize

N, DAYS, SEED = 5_000, 12, 2


def _model(kind: str):
    return SIR(beta=0.6, gamma=0.1, initial_infected=0.02) if kind == "sir" else \
        SEIRM(beta=1.2, initial_infected=0.02)


def _name(model) -> str:
    return next(n for n, _ in model.named_parameters() if n.endswith("beta"))


def _sensitivity(kind: str, pop, counter: dict | None = None, days: int = DAYS
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    from simulation.engine import simulate
    model = _model(kind)
    name = _name(model)

    def series() -> torch.Tensor:
        return simulate(model, pop, days, SEED, estimator="straight_through")["new_infections"]

    with torch.no_grad():
        values = series()
    if counter is not None:
        counter["exchanges"] = 0  # count the forward-mode run's exchanges only
    return values, forward_sensitivity(model, series, [name])[name]


def _ranked(rank: int, world: int, kind: str, n: int = N, days: int = DAYS):
    from simulation.distributed import PartitionedPopulation
    torch.set_num_threads(1)
    pop = PartitionedPopulation(synthesize("oxford", seed=1, scale=n / 150_000))
    counter = {"exchanges": 0}
    import simulation.distributed.halo as halo
    real = halo._exchange

    def counted(*a, **k):
        counter["exchanges"] += 1
        return real(*a, **k)

    halo._exchange = counted
    values, tangents = _sensitivity(kind, pop, counter, days)
    # plain lists: tensors would travel as shared memory the exiting worker takes along
    return values.tolist(), tangents.tolist(), counter["exchanges"]


def _check(kind: str, n: int, days: int, worlds: tuple[int, ...]) -> None:
    torch.set_num_threads(1)
    pop = synthesize("oxford", seed=1, scale=n / 150_000)
    ref_v, ref_t = _sensitivity(kind, pop, days=days)
    assert float(ref_t.abs().sum()) > 0 and float(ref_v.sum()) > 50
    calls_per_day = 1 if kind == "sir" else None
    for world in worlds:
        for values, tangents, exchanges in spawn_local(_ranked, world, kind, n, days,
                                                       timeout=600):
            values, tangents = torch.tensor(values), torch.tensor(tangents)
            assert torch.equal(values, ref_v), world  # identical events
            # the per-agent tangents are bit-identical (same rows, same column order); the
            # series sum them in float32 per rank, then over ranks: float32 re-association
            rel = float(((tangents - ref_t).abs() / ref_t.abs().clamp(min=1e-3)).max())
            print(f"{kind} n={n} world {world}: series tangents max rel diff {rel:.2g}")
            assert rel < 1e-5, (world, rel)
            if calls_per_day is not None:  # one exchange per neighbour sum, not two
                assert exchanges == days * calls_per_day, exchanges


@pytest.mark.parametrize("world", [2, pytest.param(3, marks=pytest.mark.slow)])
@pytest.mark.parametrize("kind", [pytest.param("sir", marks=pytest.mark.slow), "seirm"])
def test_partitioned_forward_tangents_equal_single_process(kind, world):
    _check(kind, N, DAYS, (world,))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sir", "seirm"])
def test_partitioned_forward_tangents_at_100k(kind):
    _check(kind, 100_000, 30, (2, 3))

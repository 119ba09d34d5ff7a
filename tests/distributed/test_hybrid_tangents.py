"""The coordinator's hybrid run with forward-mode tangents ∂state/∂β (``tangents=True``, the
full-path calibration's input) on 2 and 3 ranks equals the 1-rank run (real processes over
gloo on 127.0.0.1; simulation.distributed.hybrid_stepper), in fleet and remote mode:

* every agent's state and tangent bit for bit (the tangents travel beside the values: one
  halo exchange of [x, ẋ], one cross scatter of [sum, dsum], one boundary gather);
* the daily counts bit for bit; the daily tangent totals (float64 sums of float32 per-agent
  tangents, per rank and then over ranks) within 1e-12 relative of the 1-rank run's one sum;
* the partitioned tangents equal a central finite difference of the same partitioned run.
"""

from __future__ import annotations

import pytest
import torch

from coordinator.hybrid import TANGENT_BOUND, HybridSimulation
from simulation.distributed.launch import spawn_local
from simulation.models import SIR
from simulation.population import random_contact_graph, synthesize

DAYS, SEED, BETA = 8, 3, 0.9
TOTALS = ("d_new_dbeta", "d_new_dbeta_physical", "d_new_dbeta_synthetic", "one_step_dbeta")


def _population(kind: str):
    # "random": 2,000 agents, mean degree 10 (METIS cuts ~500 edges: the halo is exercised);
    # "tiny": the preset (households, classes, areas)
    if kind == "tiny20k":  # 20,000 agents
        return synthesize("tiny", scale=20.0, seed=0)
    return random_contact_graph(2000, 10.0, seed=1) if kind == "random" else \
        synthesize("tiny", seed=0)


def _hybrid(pop, every: int, estimator: str, beta: float = BETA, **kw) -> HybridSimulation:
    return HybridSimulation(SIR(beta=beta, gamma=0.1, initial_infected=0.05), pop,
                            torch.arange(0, pop.n, every), SEED, tangents=True,
                            estimator=estimator, frac_bits=40, **kw)


def _full(sim: HybridSimulation) -> dict[str, list]:
    """This rank's agents (global ids) with their state and tangent, as plain lists."""
    ids = sim._stepper.owned if sim._stepper is not None else torch.arange(sim.split.n)
    return {"ids": ids.tolist(),
            **{f"s_{k}": v.tolist() for k, v in sim.state.items()},
            **{f"t_{k}": v.tolist() for k, v in sim.tangent.items()}}


def _assemble(parts: list[dict[str, list]], n: int) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for part in parts:
        ids = torch.tensor(part["ids"])
        for k, v in part.items():
            if k != "ids":
                out.setdefault(k, torch.full((n,), float("nan")))[ids] = torch.tensor(v)
    return out


def _fleet(rank: int, world: int, kind: str, every: int, estimator: str, beta: float = BETA,
           change_day: int | None = 4):
    torch.set_num_threads(1)
    pop = _population(kind)
    sim = _hybrid(pop, every, estimator, beta, procs_group=True if world > 1 else None)
    rows = []
    for day in range(DAYS):
        if rank == 0 and day == change_day:
            sim.model.beta.data.mul_(0.8)  # a calibration step on the coordinator only
        rows.append(sim.step())
    return rows, _full(sim)


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-300) if a != b else 0.0


def _compare(rows, want) -> float:
    """Counts bit for bit, tangent totals: the largest relative difference (returned)."""
    worst = 0.0
    for r, w in zip(rows, want, strict=True):
        assert set(r) == set(w)
        for key, v in w.items():
            if key in TOTALS:
                worst = max(worst, _rel(r[key], v))
            else:
                assert r[key] == v, key
    return worst


@pytest.mark.parametrize("kind,every,estimator,world", [
    ("random", 50, "straight_through", 2),
    pytest.param("random", 50, "straight_through", 3, marks=pytest.mark.slow),
    pytest.param("tiny", 17, "expected", 2, marks=pytest.mark.slow),
    pytest.param("tiny", 17, "expected", 3, marks=pytest.mark.slow),
    pytest.param("tiny20k", 200, "straight_through", 3, marks=pytest.mark.slow)])
def test_fleet_mode_tangents_equal_one_rank(kind, every, estimator, world):
    one_rows, one_full = _fleet(0, 1, kind, every, estimator)
    assert sum(r["new_infections"] for r in one_rows) > 20
    assert all(r["d_new_dbeta"] != 0.0 for r in one_rows[1:])
    ref = _assemble([one_full], len(one_full["ids"]))
    out = spawn_local(_fleet, world, kind, every, estimator, timeout=180)
    worst = _compare(out[0][0], one_rows)
    print(f"{kind} {estimator} world {world}: tangent totals max rel diff {worst:.3g}")
    assert worst <= 1e-12, (world, worst)
    for r in range(1, world):  # every rank returns the same aggregates
        assert out[r][0] == out[0][0]
    got = _assemble([o[1] for o in out], len(one_full["ids"]))
    for k, v in ref.items():  # every agent's state and tangent: bit for bit
        assert torch.equal(got[k], v), (world, k)


EPS = 5e-3


def _three_runs(rank: int, world: int) -> dict[float, list] | None:
    """The same 2-rank run at β − ε, β, β + ε (one process group, three runs in turn)."""
    out = {b: _fleet(rank, world, "tiny", 17, "expected", b, None)[0]
           for b in (BETA - EPS, BETA, BETA + EPS)}
    return out if rank == 0 else None


def test_partitioned_tangents_equal_a_central_finite_difference():
    """d(new infections)/dβ carried by the 2-rank run = (run(β+ε) − run(β−ε)) / 2ε of the
    same 2-rank run (``expected`` estimator: smooth in β), to the 1-rank tests' tolerance."""
    eps = EPS
    runs = spawn_local(_three_runs, 2, timeout=300)[0]
    d_new = torch.tensor([r["d_new_dbeta"] for r in runs[BETA]], dtype=torch.float64)
    new = {b: torch.tensor([r["new_infections"] for r in rows], dtype=torch.float64)
           for b, rows in runs.items()}
    fd = (new[BETA + eps] - new[BETA - eps]) / (2 * eps)
    assert float(d_new.abs().max()) > 1.0
    assert torch.allclose(d_new, fd, rtol=1e-3, atol=1e-2), (d_new, fd)


# --- remote (Flower) mode: rank 0 holds the devices' cross sums of values and tangents -------

def _remote(rank: int, world: int, every: int, estimator: str):
    """Remote mode with tangents on ``world`` ranks. Rank 0 also runs the 1-rank remote run
    (``one``) and plays the devices with a fleet-mode 1-rank run (``ref``): each day both
    protocol rounds read the synthetic cross boundary's I and ∂I/∂β from
    ``cross_infected()``/``cross_tangent()`` and the devices' from ``ref``."""
    torch.set_num_threads(1)
    pop = _population("tiny")
    sim = _hybrid(pop, every, estimator, remote=True, procs_group=True)
    if rank:
        for _ in range(DAYS):
            sim.step()  # a worker: no cross sums, rank 0 scatters them
        return _full(sim)
    one, ref = _hybrid(pop, every, estimator, remote=True), _hybrid(pop, every, estimator)
    phys = sim.split.physical
    ends = torch.zeros(pop.n, dtype=torch.bool)
    ends[torch.unique(sim.split.cross.indices.long())] = True
    bad, worst, rows, b = [], 0.0, [], TANGENT_BOUND
    for day in range(DAYS):
        if day == 4:
            for s in (sim, one, ref):
                s.model.beta.data.mul_(0.8)
        seen, dseen = sim.cross_infected().clone(), sim.cross_tangent().clone()
        if not (torch.equal(seen[ends], one.cross_infected()[ends]) and
                torch.equal(dseen[ends], one.cross_tangent()[ends])):
            bad.append((day, "cross boundary"))
        seen[phys], dseen[phys] = ref.state["I"][phys], ref.tangent["I"][phys]  # devices'
        fleet = ref._fleet_sum()
        cross = fleet.step(seen.double(), round=2 * day).sums
        enc = fleet.step((dseen.double() + b) / (2 * b), round=2 * day + 1).sums
        dcross = 2 * b * torch.nan_to_num(enc, nan=0.0).double() - b * ref._cross_wsum
        row = sim.step(cross_sums=cross, cross_dsums=dcross)
        row1 = one.step(cross_sums=cross, cross_dsums=dcross)
        want = ref.step()
        worst = max(worst, _compare([row], [row1]))
        if not torch.equal(sim.last_synthetic_hazard, one.last_synthetic_hazard):
            bad.append((day, "hazard"))
        if not torch.equal(sim.last_synthetic_susceptible, one.last_synthetic_susceptible):
            bad.append((day, "susceptible"))  # gathered beside the hazards (calibration)
        syn = want["d_new_dbeta_synthetic"]  # = the fleet-mode run's synthetic part
        worst = max(worst, _rel(row["d_new_dbeta_synthetic"], syn))
        rows.append(row)
    return bad, worst, rows, _full(sim), _full(one)


@pytest.mark.slow  # remote mode on 2 ranks without tangents stays in the default run
@pytest.mark.parametrize("world", [2, 3])
def test_remote_mode_tangents_equal_one_rank(world):
    out = spawn_local(_remote, world, 17, "straight_through", timeout=180)
    bad, worst, rows, full0, one = out[0]
    assert bad == [] and worst <= 1e-12, (bad, worst)
    assert sum(r["new_infections"] for r in rows) > 20
    assert all(r["d_new_dbeta"] != 0.0 for r in rows[1:])
    got = _assemble([full0, *out[1:]], len(one["ids"]))
    for k, v in _assemble([one], len(one["ids"])).items():
        assert torch.equal(got[k], v), k


# --- traffic: the tangents ride in the same messages (one halo exchange, not two) -----------

_COLLECTIVES = ("all_to_all_single", "all_reduce", "broadcast", "all_gather", "gather",
                "scatter", "all_gather_into_tensor", "reduce_scatter_tensor", "send", "recv",
                "reduce", "monitored_barrier", "barrier")


def _count(rank: int, counter: dict[str, int]) -> None:
    """Wrap torch.distributed's collectives: bytes arriving at this rank, and calls."""
    import torch.distributed as dist

    def wrap(name, fn):
        def counted(*args, **kwargs):
            counter["calls"] += 1
            t = args[0] if args else next(iter(kwargs.values()), None)
            tensors = t if isinstance(t, list) else [t]
            src = kwargs.get("src", args[1] if len(args) > 1 else None)
            if not (name == "broadcast" and src == rank):
                counter["bytes"] += sum(x.numel() * x.element_size() for x in tensors
                                        if isinstance(x, torch.Tensor))
            return fn(*args, **kwargs)
        return counted

    for name in _COLLECTIVES:
        setattr(dist, name, wrap(name, getattr(dist, name)))


def _counted(rank: int, world: int) -> list[dict]:
    """The same run without and with tangents (one process group, in turn)."""
    from simulation.distributed.partition import cut_stats
    torch.set_num_threads(1)
    counter = {"bytes": 0, "calls": 0}
    _count(rank, counter)
    pop = _population("random")
    out = []
    for tangents in (False, True):
        sim = HybridSimulation(SIR(beta=BETA, gamma=0.1, initial_infected=0.05), pop,
                               torch.arange(0, pop.n, 50), SEED, tangents=tangents,
                               frac_bits=40, procs_group=True)
        counter.update(bytes=0, calls=0)  # setup is paid once, not per day
        for _ in range(DAYS):
            sim.step()
        st = sim._stepper
        out.append({**counter, "halo": st.shard.n_halo, "boundary": st.sizes,
                    "cut": cut_stats(sim.split.central, st.partition)["cut_edges"]})
    return out


@pytest.mark.slow
def test_tangent_days_send_both_columns_in_the_same_messages():
    """Per day and rank, with tangents: the same number of collectives as without, and
    ≤ 8 B × (its halo + its cross boundary) + the header (twice the 4 B of a value-only day
    per agent); all ranks together ≤ 16 B per cut edge + 16 B per boundary agent + headers."""
    from simulation.distributed.hybrid_stepper import HEADER_BYTES
    both = spawn_local(_counted, 2, timeout=180)
    plain, tan = [r[0] for r in both], [r[1] for r in both]
    assert tan[0]["cut"] > 100 and tan[0]["halo"] > 0  # the halo is exercised
    total = 0
    for rank, (p, r) in enumerate(zip(plain, tan, strict=True)):
        assert r["calls"] == p["calls"], (rank, r["calls"], p["calls"])  # no extra exchange
        cross = sum(r["boundary"][1:]) if rank == 0 else r["boundary"][rank]
        assert r["bytes"] <= DAYS * (8 * (r["halo"] + cross) + HEADER_BYTES), (rank, r)
        assert r["bytes"] <= 2 * p["bytes"]
        total += r["bytes"]
    bound = DAYS * (16 * tan[0]["cut"] + 16 * sum(tan[0]["boundary"]) + 2 * HEADER_BYTES)
    assert total <= bound, (total, bound)


def _noisy(rank: int, world: int):
    """A noisy protocol policy (noise per agent id over all n: rank 0 keeps the full-length
    protocol for both rounds); the fleet secret given, so 1 and 2 processes draw alike."""
    from protocols.neighbourhood import NeighbourhoodPolicy
    torch.set_num_threads(1)
    pop = _population("tiny")
    sim = _hybrid(pop, 17, "straight_through", policy=NeighbourhoodPolicy(noise_scale=0.01),
                  secret=b"a public test secret, not a key!!",
                  procs_group=True if world > 1 else None)
    return [sim.step() for _ in range(6)]


@pytest.mark.slow
def test_noisy_policy_tangents_two_ranks_equal_one():
    one = _noisy(0, 1)
    assert all(r["d_new_dbeta"] != 0.0 for r in one[1:])
    assert _compare(spawn_local(_noisy, 2, timeout=180)[0], one) <= 1e-12

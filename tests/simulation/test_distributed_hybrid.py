"""The coordinator's hybrid run (fleet mode) on 2 ranks equals the 1-rank run exactly
(real processes over gloo on 127.0.0.1; simulation.distributed.hybrid_stepper)."""

from __future__ import annotations

import pytest
import torch

from coordinator.hybrid import HybridSimulation
from simulation.distributed.launch import spawn_local
from simulation.models import SIR
from simulation.population import synthesize

DAYS, SEED = 10, 3


def _run(rank: int, world: int, preset: str, scale: float | None, every: int):
    torch.set_num_threads(1)
    pop = synthesize(preset, seed=0) if scale is None else synthesize(preset, scale=scale, seed=0)
    sim = HybridSimulation(SIR(beta=0.9, gamma=0.1, initial_infected=0.05), pop,
                           torch.arange(0, pop.n, every), SEED,
                           procs_group=True if world > 1 else None)
    rows = []
    for day in range(DAYS):
        if rank == 0 and day == 4:
            sim.model.beta.data.mul_(0.8)  # a calibration step on the coordinator only
        rows.append(sim.step())
    return rows if rank == 0 else None


def _check(preset: str, scale: float | None, every: int, worlds=(2,)) -> None:
    one = _run(0, 1, preset, scale, every)  # the 1-rank run: plain code, in this process
    assert len(one) == DAYS and sum(r["new_infections"] for r in one) > 20
    for w in worlds:  # daily counts, exposure, the simulated devices' reports: bit for bit
        assert spawn_local(_run, w, preset, scale, every, timeout=120)[0] == one, w


def test_hybrid_two_ranks_equal_one_tiny():
    _check("tiny", None, 17)  # 1000 agents, 59 simulated devices


def _dies(rank: int, world: int):
    import os
    torch.set_num_threads(1)
    pop = synthesize("tiny", seed=0)
    sim = HybridSimulation(SIR(beta=0.9, gamma=0.1, initial_infected=0.05), pop,
                           torch.arange(0, pop.n, 17), SEED, procs_group=True)
    for day in range(DAYS):
        if rank == 1 and day == 3:
            os._exit(1)  # a worker killed mid-run
        sim.step()


def test_dead_worker_is_named_not_a_hang():
    import time

    from simulation.distributed.partition import DistributedError
    t0 = time.monotonic()
    with pytest.raises(DistributedError) as err:
        spawn_local(_dies, 2, timeout=90)
    assert time.monotonic() - t0 < 80
    assert "Rank 1 failed to pass monitoredBarrier" in str(err.value)


@pytest.mark.slow  # 37 s at load 5.5
def test_hybrid_two_and_three_ranks_equal_one_20k():
    _check("tiny", 20.0, 1000, worlds=(2, 3))  # 20,000 agents, 20 simulated devices


# --- traffic: a rank receives its halo and cross boundary, not the state (issue 16) ---------

_COLLECTIVES = ("all_to_all_single", "all_reduce", "broadcast", "all_gather", "gather",
                "scatter", "all_gather_into_tensor", "reduce_scatter_tensor", "send", "recv",
                "reduce")


def _count_received(rank: int, counter: list[int]) -> None:
    """Wrap torch.distributed's collectives so that the bytes arriving at this rank count."""
    import torch.distributed as dist

    def wrap(name, fn):
        def counted(*args, **kwargs):
            t = args[0] if args else next(iter(kwargs.values()))
            tensors = t if isinstance(t, list) else [t]
            src = kwargs.get("src", args[1] if len(args) > 1 else None)
            if not (name == "broadcast" and src == rank):
                counter[0] += sum(x.numel() * x.element_size() for x in tensors
                                  if isinstance(x, torch.Tensor))
            return fn(*args, **kwargs)
        return counted

    for name in _COLLECTIVES:
        setattr(dist, name, wrap(name, getattr(dist, name)))


def _population(kind: str):
    from simulation.population import random_contact_graph
    # "random": 2,000 agents, mean degree 10, no areas (METIS cuts edges; tiny's households
    # and classes fall apart into components that METIS separates with no cut at all)
    return random_contact_graph(2000, 10.0, seed=1) if kind == "random" else \
        synthesize("tiny", seed=0)


def _run_counted(rank: int, world: int, kind: str, every: int):
    from simulation.distributed.partition import cut_stats
    torch.set_num_threads(1)
    counter = [0]
    _count_received(rank, counter)
    pop = _population(kind)

    def hybrid(**kw):
        return HybridSimulation(SIR(beta=0.9, gamma=0.1, initial_infected=0.05), pop,
                                torch.arange(0, pop.n, every), SEED, **kw)

    sim = hybrid(procs_group=True)
    counter[0] = 0  # setup (the owner array, the split counts) is paid once, not per day
    rows = [sim.step() for _ in range(DAYS)]
    received = counter[0]
    one = hybrid() if rank == 0 else None  # the 1-rank run (no collectives), same process
    st = sim._stepper
    return {"received": received, "halo": st.shard.n_halo, "boundary": st.sizes,
            "cut": cut_stats(sim.split.central, st.partition)["cut_edges"],
            "own_count": st.bytes_received, "n": pop.n,
            "equal": one is None or rows == [one.step() for _ in range(DAYS)]}


@pytest.mark.parametrize("kind", ["random", pytest.param("tiny", marks=pytest.mark.slow)])
def test_hybrid_ranks_receive_only_the_boundary(kind):
    """Per day a rank receives 4 B × (its halo + its cross boundary) + a fixed header, and
    all ranks together ≤ 8 B per cut edge + 8 B per boundary agent + headers: no O(n)
    state (the first cut all-reduced 5 × n float64 a day: 44 kB/day at rank 0 on tiny)."""
    from simulation.distributed.hybrid_stepper import HEADER_BYTES
    out = spawn_local(_run_counted, 2, kind, 50, timeout=120)
    assert out[0]["equal"]  # the daily aggregates equal the 1-rank run's bit for bit
    n, total = out[0]["n"], 0
    if kind == "random":
        assert out[0]["cut"] > 100 and out[0]["halo"] > 0  # the halo is exercised
    for rank, r in enumerate(out):
        cross = sum(r["boundary"][1:]) if rank == 0 else r["boundary"][rank]
        per_day = 4 * (r["halo"] + cross) + HEADER_BYTES
        assert r["received"] <= DAYS * per_day, (rank, r["received"], per_day)
        assert r["own_count"] <= r["received"]  # the stepper's own meter sees the traffic
        total += r["received"]
    bound = DAYS * (8 * out[0]["cut"] + 8 * sum(out[0]["boundary"]) + 2 * HEADER_BYTES)
    assert total <= bound, (total, bound)
    assert total / DAYS < 5 * 8 * n / 4  # a quarter of what one rank received a day before


# --- remote (Flower) mode: rank 0 holds the devices' cross sums -------------------------------

def _run_remote(rank: int, world: int, every: int):
    """Remote mode on ``world`` ranks. Rank 0 also runs the 1-rank remote run (``one``) and
    plays the devices with a fleet-mode 1-rank run (``ref``): each day the protocol reads
    the synthetic cross boundary's I from ``cross_infected()`` and the physical agents' I
    from the devices (``ref``); returns the days where anything differed."""
    torch.set_num_threads(1)
    pop = synthesize("tiny", seed=0)
    phys = torch.arange(0, pop.n, every)

    def hybrid(**kw):
        return HybridSimulation(SIR(beta=0.9, gamma=0.1, initial_infected=0.05), pop, phys,
                                SEED, **kw)

    sim = hybrid(remote=True, procs_group=True)
    if rank:
        for _ in range(DAYS):
            sim.step()  # a worker: no cross sums, rank 0 scatters them
        return None
    one, ref = hybrid(remote=True), hybrid()
    ends = torch.zeros(pop.n, dtype=torch.bool)  # the cross edges' endpoints
    ends[torch.unique(sim.split.cross.indices.long())] = True
    bad, infections = [], 0.0
    for day in range(DAYS):
        if day == 4:  # a calibration step on the coordinator (and on the devices)
            for s in (sim, one, ref):
                s.model.beta.data.mul_(0.8)
        seen = sim.cross_infected().clone()
        if not torch.equal(seen[ends], one.cross_infected()[ends]):
            bad.append((day, "cross_infected"))
        seen[phys] = ref.state["I"][phys]  # the devices' contributions
        cross = ref._fleet_sum().step(seen, round=day).sums
        row, row1, want = sim.step(cross_sums=cross), one.step(cross_sums=cross), ref.step()
        if row != row1:
            bad.append((day, "aggregates"))
        if not torch.equal(sim.last_synthetic_hazard, one.last_synthetic_hazard):
            bad.append((day, "hazard"))
        if not torch.equal(sim.last_synthetic_susceptible, one.last_synthetic_susceptible):
            bad.append((day, "susceptible"))  # gathered beside the hazards (calibration)
        for c in ("S", "I", "R", "new_infections"):  # synthetic = fleet run − its devices
            if row[c] != want[c] - float(ref.state[c][phys].sum()):
                bad.append((day, c))
        infections += float(row["new_infections"])
    return bad, infections


def test_remote_mode_two_ranks_equal_one():
    """Remote mode: the devices' cross sums arrive at rank 0 only; 2 ranks == 1 rank (daily
    synthetic aggregates, the boundary I the protocol reads, and the hazard bases the
    calibration reads, gathered at rank 0), and == the fleet-mode run minus its devices."""
    bad, infections = spawn_local(_run_remote, 2, 17, timeout=120)[0]
    assert bad == [] and infections > 20


def test_metis_shares_give_rank_zero_less():
    """The hybrid's rank 0 also runs the protocol: METIS target shares size its part."""
    from simulation.distributed import partition_graph
    from simulation.distributed.partition import DistributedError
    from simulation.population import random_contact_graph
    g = random_contact_graph(4000, 10.0, seed=1).merged()
    even, small = partition_graph(g, 2).sizes(), partition_graph(g, 2, shares=[1, 3]).sizes()
    assert abs(even[0] - 2000) < 100 and 800 < small[0] < 1300, (even, small)
    with pytest.raises(DistributedError, match="shares"):
        partition_graph(g, 2, "block", shares=[1, 3])


def _run_resumed(rank: int, world: int):
    """5 days, checkpoint (collective: rank 0 gets the bytes), a fresh run loads it on every
    rank and steps 5 more days; rank 0 returns those days' aggregates."""
    import torch.distributed as dist
    torch.set_num_threads(1)
    pop = synthesize("tiny", seed=0)

    def hybrid():
        return HybridSimulation(SIR(beta=0.9, gamma=0.1, initial_infected=0.05), pop,
                                torch.arange(0, pop.n, 17), SEED, procs_group=True)

    sim = hybrid()
    for _ in range(5):
        sim.step()
    blob = [sim.state_bytes()]
    assert (blob[0] == b"") == (rank != 0)
    dist.broadcast_object_list(blob, 0)  # the store hands every rank the same checkpoint
    again = hybrid()
    again.load_state(blob[0])
    rows = [again.step() for _ in range(5)]  # every rank steps (collective)
    return rows if rank == 0 else None


def test_checkpoint_resume_on_two_ranks_equals_one_uninterrupted():
    rows = spawn_local(_run_resumed, 2, timeout=120)[0]
    pop = synthesize("tiny", seed=0)
    one = HybridSimulation(SIR(beta=0.9, gamma=0.1, initial_infected=0.05), pop,
                           torch.arange(0, pop.n, 17), SEED)
    want = [one.step() for _ in range(10)][5:]
    assert rows == want

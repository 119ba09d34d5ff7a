"""Partitioned simulation (simulation.distributed): partitioning, shards, halo exchange and
equality with the single-process run over real gloo processes on 127.0.0.1."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from simulation.distributed import DistributedError, build_shard, cut_stats, partition_graph
from simulation.distributed.halo import _sorted_rows
from simulation.distributed.launch import spawn_local
from simulation.distributed.selfcheck import Case, compare, reference, run_cases
from simulation.kernels import NeighbourSum
from simulation.population import random_contact_graph, synthesize
from simulation.rng import counter_uniforms, counter_uniforms_at


@pytest.fixture(scope="module")
def pop():
    return synthesize("oxford", seed=1, scale=4_000 / 150_000)


def test_uniforms_at_global_ids_equal_the_full_draw():
    full = counter_uniforms(7, 3, 5_000, torch.device("cpu"), 6)
    ids = torch.randperm(5_000, generator=torch.Generator().manual_seed(0))[:1_234]
    assert torch.equal(counter_uniforms_at(7, 3, ids, 5_000, torch.device("cpu"), 6), full[:, ids])
    ids32 = ids.to(torch.int32)  # shards store ids as int32 below 2^31 agents
    assert torch.equal(counter_uniforms_at(7, 3, ids32, 5_000, torch.device("cpu"), 6), full[:, ids])
    from simulation.rng import _torch_fill_at, day_key  # the non-CPU (int64 torch) path

    assert torch.equal(_torch_fill_at(day_key(7, 3), ids, 5_000, 6), full[:, ids])


@pytest.mark.parametrize("parts", [2, 3, 8])
def test_metis_and_locality_cut_far_fewer_edges_than_random(pop, parts):
    layer = pop.graph.merged()
    cut = {m: cut_stats(layer, partition_graph(layer, parts, m, attributes=pop.attributes))
           for m in ("metis", "locality", "block", "random")}
    assert cut["metis"]["cut_fraction"] < 0.7 * cut["random"]["cut_fraction"]
    assert cut["locality"]["cut_fraction"] < 0.7 * cut["random"]["cut_fraction"]
    assert cut["random"]["imbalance"] < 1.01
    # METIS balances what a rank stores (agents and their neighbour entries) within 1 %, so
    # a rank with many high-degree agents holds fewer of them (agent counts may differ more)
    assert cut["metis"]["memory_imbalance"] < 1.011
    assert cut["random"]["memory_imbalance"] > cut["metis"]["memory_imbalance"]
    assert cut["metis"]["imbalance"] < 1.3


def test_locality_keeps_households_together(pop):
    part = partition_graph(pop.graph.merged(), 3, "locality", attributes=pop.attributes)
    hh = pop.attributes["household"].numpy()
    for h in np.unique(hh)[:500]:
        assert np.unique(part.parts[hh == h]).size == 1


def test_bad_partition_settings_raise_project_errors(pop):
    layer = pop.graph.merged()
    with pytest.raises(DistributedError, match="unknown partition method"):
        partition_graph(layer, 2, "spectral")
    with pytest.raises(DistributedError, match="n_parts"):
        partition_graph(layer, 0)
    part = partition_graph(layer, 2, "block")
    with pytest.raises(DistributedError, match="rank 2"):
        build_shard(layer, part, 2)
    with pytest.raises(DistributedError, match="agents"):
        cut_stats(random_contact_graph(10, 2).merged(), part)


@pytest.mark.parametrize("method", ["metis", "random"])
def test_shards_reproduce_the_global_neighbour_sum_and_halo_bytes_bound(pop, method):
    layer = pop.graph.merged()
    part = partition_graph(layer, 3, method, attributes=pop.attributes)
    x = (torch.rand(layer.n, generator=torch.Generator().manual_seed(2)) < 0.3).float()
    want = NeighbourSum(layer)(x)
    shards = [build_shard(layer, part, r) for r in range(3)]
    sent = 0
    for sh in shards:
        ext = torch.cat([x[sh.owned], x[sh.halo]])
        got = NeighbourSum(sh.layer)(ext)[: sh.n_local]
        assert torch.equal(got, want[sh.owned])  # same kernel, same row order: bit-identical
        resorted = NeighbourSum(_sorted_rows(sh.layer))(ext)[: sh.n_local]  # the CUDA layout
        assert torch.equal(resorted, want[sh.owned])  # 0/1 inputs: order-free integer sums
        sent += sh.halo_bytes()
        for q, other in enumerate(shards):  # what r sends q is what q expects from r
            assert sh.send_counts[q] == other.recv_counts[sh.rank]
            lo = sum(other.recv_counts[: sh.rank])
            start = sum(sh.send_counts[:q])
            sent_ids = sh.owned[sh.send_index[start : start + sh.send_counts[q]]]
            assert torch.equal(sent_ids, other.halo[lo : lo + other.recv_counts[sh.rank]])
    assert sent <= 8 * cut_stats(layer, part)["cut_edges"]


def test_without_a_process_group_it_is_the_engine_run():
    from simulation.distributed import simulate as dsim
    from simulation.engine import simulate
    from simulation.models import SIR

    g = random_contact_graph(2_000, 8, seed=4)
    a = dsim(SIR(), g, 10, 5, estimator="straight_through")
    b = simulate(SIR(), g, 10, 5, estimator="straight_through")
    assert torch.equal(a["new_infections"], b["new_infections"])


def _assert_equal_runs(cases: list[Case], world: int) -> None:
    refs = [reference(c) for c in cases]
    for r, per_rank in enumerate(spawn_local(run_cases, world, cases)):
        for case, ref, got in zip(cases, refs, per_rank, strict=True):
            diff = compare(ref, got)
            assert diff["series_max_abs_diff"] == 0.0, (case, r, diff)  # identical events
            # gradients: same up to float32 re-association of the per-agent sums
            assert diff["grad_max_rel_diff"] < 1e-5, (case, r, diff)
            assert got["meta"]["world"] == world and ref["total"] > 50
            g = got["grads"]["substeps.infection.beta"]
            assert g is not None and abs(float(g)) > 0


@pytest.mark.parametrize("world", [2, 3])
def test_partitioned_run_equals_single_process_sir_and_seirm(world):
    # per-event estimators (the engine's fused run-level "nonbacktracking" one is single-process)
    cases = [Case("sir", n=5_000, days=15, estimator="smoothed"),
             Case("seirm", n=5_000, days=15, beta=1.2, estimator="straight_through")]
    if world == 2:  # recomputation in the backward pass re-runs the exchanges in step
        cases.append(Case("sir", n=5_000, days=15, method="locality", checkpoint_days=4,
                          estimator="smoothed"))
    _assert_equal_runs(cases, world)


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_partitioned_run_equals_single_process_at_100k(world):
    _assert_equal_runs(
        [Case("sir", n=100_000, days=30, estimator="smoothed"),
         Case("seirm", n=100_000, days=30, beta=1.2, estimator="straight_through")], world
    )

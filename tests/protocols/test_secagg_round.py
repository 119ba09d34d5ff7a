"""SecAgg+ end to end (one key epoch + one day through the multi-round state machines):
exact integer sums, floats within the quantisation bound, dropouts at every stage (below
threshold → exact sum of survivors; beyond → clean abort before anything is revealed),
headroom, the public graph, Shamir, config and state round trips."""

from __future__ import annotations

import os

import pytest
import torch

from protocols.secagg import InputError, InputSpec, SecAggAbortError
from protocols.secagg.epoch_client import EpochStage
from protocols.secagg.epoch_server import EpochServerStage
from protocols.secagg.errors import StageError
from protocols.secagg.graph import neighbour_graph, neighbours_of
from protocols.secagg.local import DAY_STAGES, make_round, run_epoch_day
from protocols.secagg.shamir import ShamirError, reconstruct_secret, share_secret

STAGES = ("advertise", *DAY_STAGES)

N, DEG, T = 24, 6, 4


def _ints(n: int, length: int, bound: int = 1000, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)  # test data only, not masks
    return [torch.randint(-bound, bound + 1, (length,), generator=g) for _ in range(n)]


def _safe_dropouts(graph: list[tuple[int, ...]], m: int, slack: int) -> list[int]:
    """m pairwise non-adjacent clients such that nobody loses more than ``slack``
    neighbours (a depth-first search: a greedy pick fails on ~2 % of random graphs)."""
    lost = [0] * len(graph)
    chosen: list[int] = []

    def extend(start: int) -> bool:
        if len(chosen) == m:
            return True
        for c in range(start, len(graph)):
            if all(lost[j] < slack for j in graph[c]) and not set(graph[c]) & set(chosen):
                chosen.append(c)
                for j in graph[c]:
                    lost[j] += 1
                if extend(c + 1):
                    return True
                chosen.pop()
                for j in graph[c]:
                    lost[j] -= 1
        return False

    assert extend(0), f"no {m} safe dropouts in this graph"
    return chosen


def test_integer_sum_exact() -> None:
    setup = make_round(N, InputSpec("int", 33, 10**6), degree=DEG, threshold=T)
    xs = _ints(N, 33, 10**6)
    res = run_epoch_day(setup, xs)
    assert torch.equal(res.total, torch.stack(xs).sum(0))
    assert res.survivors == frozenset(range(N))


def test_integer_sum_exact_at_the_declared_bound() -> None:
    bound = (2**63 - 1) // 8
    setup = make_round(8, InputSpec("int", 4, bound), degree=4, threshold=3)
    xs = [torch.full((4,), bound if i % 2 else -bound, dtype=torch.int64) for i in range(7)]
    xs.append(torch.tensor([bound, bound, -bound, 0]))
    res = run_epoch_day(setup, xs)
    expect = [sum(int(x[k]) for x in xs) for k in range(4)]
    assert res.total.tolist() == expect


def test_float_sum_within_quantisation_bound_and_clipping() -> None:
    spec = InputSpec("float", 50, bound=2.0, frac_bits=16)
    setup = make_round(N, spec, degree=DEG, threshold=T)
    g = torch.Generator().manual_seed(1)
    xs = [torch.rand(50, generator=g, dtype=torch.float64) * 6 - 3 for _ in range(N)]
    total = run_epoch_day(setup, xs).total
    clipped = torch.stack([x.clamp(-2, 2) for x in xs]).sum(0)
    err = (total - clipped).abs().max().item()
    assert err <= spec.error_bound(N)
    assert spec.error_bound(N) == N * 2.0**-17
    # clipping was really applied: the unclipped sum is far away
    assert (total - torch.stack(xs).sum(0)).abs().max().item() > 0.5


def test_complete_graph_small_round() -> None:
    setup = make_round(3, InputSpec("int", 5, 100))
    assert setup.config.degree == 2
    xs = _ints(3, 5, 100, seed=4)
    assert torch.equal(run_epoch_day(setup, xs).total, torch.stack(xs).sum(0))


@pytest.mark.parametrize("stage", STAGES)
def test_dropouts_below_threshold_give_exact_sum_of_survivors(stage: str) -> None:
    setup = make_round(N, InputSpec("int", 16, 1000), degree=DEG, threshold=T)
    graph = neighbour_graph(setup.config.graph_seed, N, DEG)
    drop = _safe_dropouts(graph, 4, DEG - T)
    xs = _ints(N, 16)
    res = run_epoch_day(setup, xs, {stage: set(drop)})
    # clients dropping after their masked input (consistency, unmask) still count
    late = stage in ("consistency", "unmask")
    expected = set(range(N)) if late else set(range(N)) - set(drop)
    assert res.survivors == expected
    assert torch.equal(res.total, torch.stack([xs[i] for i in sorted(expected)]).sum(0))


def test_dropouts_at_every_stage_at_once() -> None:
    setup = make_round(40, InputSpec("int", 16, 1000), degree=8, threshold=5)
    graph = neighbour_graph(setup.config.graph_seed, 40, 8)
    drop = _safe_dropouts(graph, 6, 8 - 5)
    plan = {"advertise": set(drop[0:2]), "masked_input": set(drop[2:4]),
            "consistency": {drop[4]}, "unmask": {drop[5]}}
    xs = _ints(40, 16, seed=2)
    res = run_epoch_day(setup, xs, plan)
    gone = plan["advertise"] | plan["masked_input"]
    assert res.survivors == frozenset(set(range(40)) - gone)
    assert torch.equal(res.total, torch.stack([xs[i] for i in sorted(res.survivors)]).sum(0))


def test_dropout_beyond_threshold_at_masked_input_aborts_before_any_share_is_revealed() -> None:
    setup = make_round(N, InputSpec("int", 16, 1000), degree=DEG, threshold=T)
    victim = 5
    nbrs = neighbours_of(setup.config.graph_seed, N, DEG, victim)
    silent = set(nbrs[: DEG - T + 1])  # victim keeps T-1 live share holders
    xs = _ints(N, 16)
    server, clients = setup.agreed()
    server.open_day(0)
    for i, c in enumerate(clients):
        if i not in silent:
            server.receive(i, c.masked_input(0, xs[i]))
    with pytest.raises(SecAggAbortError):
        for i, b in server.advance().items():  # the victim is pruned or the day aborts
            server.receive(i, clients[i].sign_survivors(b))
        server.advance()
        raise AssertionError("the day should have aborted before unmasking")
    assert server.stage is EpochServerStage.READY and server.result is None
    with pytest.raises(StageError):
        server.decoded(0)
    # no client was asked to reveal: none left the consistency/unmask stages
    assert all(c.stage in (EpochStage.CONSISTENCY, EpochStage.UNMASK)
               for i, c in enumerate(clients) if i not in silent)


def test_dropout_beyond_threshold_at_unmasking_aborts_without_result() -> None:
    setup = make_round(N, InputSpec("int", 16, 1000), degree=DEG, threshold=T)
    nbrs = neighbours_of(setup.config.graph_seed, N, DEG, 3)
    with pytest.raises(SecAggAbortError, match="shares of client|did not reveal"):
        run_epoch_day(setup, _ints(N, 16), {"unmask": set(nbrs[: DEG - T + 1])})


@pytest.mark.parametrize("stage", ["advertise", "masked_input"])
def test_too_few_clients_abort(stage: str) -> None:
    setup = make_round(10, InputSpec("int", 4, 10), degree=4, threshold=3, min_survivors=6)
    with pytest.raises(SecAggAbortError):
        run_epoch_day(setup, _ints(10, 4, 10), {stage: set(range(5))})


def test_headroom_is_checked_for_the_whole_sum() -> None:
    with pytest.raises(InputError, match="does not fit the ring"):
        make_round(256, InputSpec("float", 4, bound=2.0**40, frac_bits=16))
    with pytest.raises(InputError):
        make_round(16, InputSpec("int", 4, bound=2**60))
    make_round(8, InputSpec("int", 4, bound=2**59))  # 8 · 2^59 < 2^63 fits


def test_graph_is_regular_symmetric_and_public() -> None:
    seed = os.urandom(32)
    g = neighbour_graph(seed, 200, 8)
    assert all(len(nb) == 8 and i not in nb for i, nb in enumerate(g))
    assert all(i in g[j] for i in range(200) for j in g[i])
    assert g == neighbour_graph(seed, 200, 8)
    assert all(neighbours_of(seed, 200, 8, i) == g[i] for i in range(0, 200, 17))
    assert g != neighbour_graph(os.urandom(32), 200, 8)
    with pytest.raises(ValueError):
        neighbour_graph(seed, 10, 3)


def test_shamir_threshold() -> None:
    secret = os.urandom(32)
    xs = [2, 5, 7, 11, 13]
    shares = share_secret(secret, xs, 3)
    for subset in ([0, 1, 2], [2, 3, 4], [0, 2, 4]):
        assert reconstruct_secret({xs[k]: shares[k] for k in subset}, 3) == secret
    with pytest.raises(ShamirError):
        reconstruct_secret({xs[0]: shares[0], xs[1]: shares[1]}, 3)
    # two shares used as if the threshold were 2: not the secret
    try:
        wrong = reconstruct_secret({xs[0]: shares[0], xs[1]: shares[1]}, 2)
    except ShamirError:
        wrong = None
    assert wrong != secret
    # fresh randomness every time
    assert share_secret(secret, xs, 3) != shares


def test_config_round_trips_through_bytes() -> None:
    from protocols.secagg import MalformedMessageError, RoundConfig

    setup = make_round(6, InputSpec("float", 4, 1.0), degree=4, threshold=3)
    cfg = setup.config
    assert RoundConfig.from_bytes(cfg.to_bytes()) == cfg
    with pytest.raises(MalformedMessageError):
        RoundConfig.from_bytes(b"{not json")

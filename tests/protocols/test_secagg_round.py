"""SecAgg+ end to end: exact integer sums, floats within the quantisation bound, dropouts at
every stage (below threshold → exact sum of survivors; beyond → clean abort), input checks."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from protocols.secagg import InputError, InputSpec, ProtocolViolationError, SecAggAbortError
from protocols.secagg.client import ClientStage
from protocols.secagg.errors import StageError
from protocols.secagg.graph import neighbour_graph, neighbours_of
from protocols.secagg.local import STAGES, make_round, run_round
from protocols.secagg.server import ServerStage
from protocols.secagg.shamir import ShamirError, reconstruct_secret, share_secret

N, DEG, T = 24, 6, 4


def _ints(n: int, length: int, bound: int = 1000, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)  # test data only, not masks
    return [torch.randint(-bound, bound + 1, (length,), generator=g) for _ in range(n)]


def _safe_dropouts(graph: list[tuple[int, ...]], m: int, slack: int) -> list[int]:
    """m clients such that nobody loses more than ``slack`` neighbours."""
    lost = [0] * len(graph)
    chosen: list[int] = []
    for c in range(len(graph)):
        if len(chosen) == m:
            break
        if all(lost[j] < slack for j in graph[c]):
            chosen.append(c)
            for j in graph[c]:
                lost[j] += 1
    assert len(chosen) == m
    return chosen


def test_integer_sum_exact() -> None:
    setup = make_round(N, InputSpec("int", 33, 10**6), degree=DEG, threshold=T)
    xs = _ints(N, 33, 10**6)
    res = run_round(setup, xs)
    assert torch.equal(res.total, torch.stack(xs).sum(0))
    assert res.survivors == frozenset(range(N))


def test_integer_sum_exact_at_the_declared_bound() -> None:
    bound = (2**63 - 1) // 8
    setup = make_round(8, InputSpec("int", 4, bound), degree=4, threshold=3)
    xs = [torch.full((4,), bound if i % 2 else -bound, dtype=torch.int64) for i in range(7)]
    xs.append(torch.tensor([bound, bound, -bound, 0]))
    res = run_round(setup, xs)
    expect = [sum(int(x[k]) for x in xs) for k in range(4)]
    assert res.total.tolist() == expect


def test_float_sum_within_quantisation_bound_and_clipping() -> None:
    spec = InputSpec("float", 50, bound=2.0, frac_bits=16)
    setup = make_round(N, spec, degree=DEG, threshold=T)
    g = torch.Generator().manual_seed(1)
    xs = [torch.rand(50, generator=g, dtype=torch.float64) * 6 - 3 for _ in range(N)]
    res = run_round(setup, xs)
    clipped = torch.stack([x.clamp(-2, 2) for x in xs]).sum(0)
    err = (res.total - clipped).abs().max().item()
    assert err <= spec.error_bound(N)
    assert spec.error_bound(N) == N * 2.0**-17
    # clipping was really applied: the unclipped sum is far away
    assert (res.total - torch.stack(xs).sum(0)).abs().max().item() > 0.5


def test_complete_graph_small_round() -> None:
    setup = make_round(3, InputSpec("int", 5, 100))
    assert setup.config.degree == 2
    xs = _ints(3, 5, 100, seed=4)
    assert torch.equal(run_round(setup, xs).total, torch.stack(xs).sum(0))


@pytest.mark.parametrize("stage", STAGES)
def test_dropouts_below_threshold_give_exact_sum_of_survivors(stage: str) -> None:
    setup = make_round(N, InputSpec("int", 16, 1000), degree=DEG, threshold=T)
    graph = neighbour_graph(setup.config.graph_seed, N, DEG)
    drop = _safe_dropouts(graph, 4, DEG - T)
    xs = _ints(N, 16)
    res = run_round(setup, xs, {stage: set(drop)})
    # clients dropping only at unmasking already sent their masked input: they count
    expected_survivors = set(range(N)) if stage == "unmask" else set(range(N)) - set(drop)
    assert res.survivors == expected_survivors
    assert torch.equal(res.total, torch.stack([xs[i] for i in sorted(expected_survivors)]).sum(0))
    if stage == "masked_input":
        assert res.server is not None and res.server.dropped == frozenset(drop)


def test_dropouts_at_every_stage_at_once() -> None:
    setup = make_round(40, InputSpec("int", 16, 1000), degree=8, threshold=5)
    graph = neighbour_graph(setup.config.graph_seed, 40, 8)
    drop = _safe_dropouts(graph, 8, 8 - 5)
    plan = {s: set(drop[2 * k : 2 * k + 2]) for k, s in enumerate(STAGES)}
    xs = _ints(40, 16, seed=2)
    res = run_round(setup, xs, plan)
    gone = plan["advertise"] | plan["share_keys"] | plan["masked_input"]
    assert res.survivors == frozenset(set(range(40)) - gone)
    assert torch.equal(res.total, torch.stack([xs[i] for i in sorted(res.survivors)]).sum(0))


def _drive_until_masked(setup, xs, silent: set[int]):  # type: ignore[no-untyped-def]
    server, clients = setup.server(), setup.clients()
    for i, c in enumerate(clients):
        server.receive(i, c.advertise_keys())
    for i, m in server.advance().items():
        server.receive(i, clients[i].share_keys(m))
    deliveries = server.advance()
    for i, m in deliveries.items():
        if i not in silent:
            server.receive(i, clients[i].masked_input(m, xs[i]))
    return server, clients


def test_dropout_beyond_threshold_at_masked_input_aborts_before_any_share_is_revealed() -> None:
    setup = make_round(N, InputSpec("int", 16, 1000), degree=DEG, threshold=T)
    victim = 5
    nbrs = neighbours_of(setup.config.graph_seed, N, DEG, victim)
    silent = set(nbrs[: DEG - T + 1])  # victim keeps T-1 live share holders
    xs = _ints(N, 16)
    server, clients = _drive_until_masked(setup, xs, silent)
    with pytest.raises(SecAggAbortError, match="aborting before unmasking"):
        server.advance()
    assert server.stage is ServerStage.ABORTED
    assert server.result is None
    with pytest.raises(StageError):
        server.decoded()
    # no client was asked for a share: all survivors still wait in the unmask stage
    assert all(c.stage is ClientStage.UNMASK for i, c in enumerate(clients) if i not in silent)


def test_dropout_beyond_threshold_at_unmasking_aborts_without_result() -> None:
    setup = make_round(N, InputSpec("int", 16, 1000), degree=DEG, threshold=T)
    nbrs = neighbours_of(setup.config.graph_seed, N, DEG, 3)
    with pytest.raises(SecAggAbortError, match="shares for client"):
        run_round(setup, _ints(N, 16), {"unmask": set(nbrs[: DEG - T + 1])})


@pytest.mark.parametrize("stage", ["advertise", "share_keys", "masked_input"])
def test_too_few_clients_abort(stage: str) -> None:
    setup = make_round(10, InputSpec("int", 4, 10), degree=4, threshold=3, min_survivors=6)
    with pytest.raises(SecAggAbortError):
        run_round(setup, _ints(10, 4, 10), {stage: set(range(5))})


def test_headroom_is_checked_for_the_whole_sum() -> None:
    with pytest.raises(InputError, match="does not fit the ring"):
        make_round(256, InputSpec("float", 4, bound=2.0**40, frac_bits=16))
    with pytest.raises(InputError):
        make_round(16, InputSpec("int", 4, bound=2**60))
    make_round(8, InputSpec("int", 4, bound=2**59))  # 8 · 2^59 < 2^63 fits


def test_bad_client_input_is_rejected_and_state_unchanged() -> None:
    setup = make_round(6, InputSpec("int", 4, 100), degree=4, threshold=3)
    xs = _ints(6, 4, 100)
    server, clients = setup.server(), setup.clients()
    for i, c in enumerate(clients):
        server.receive(i, c.advertise_keys())
    for i, m in server.advance().items():
        server.receive(i, clients[i].share_keys(m))
    deliveries = server.advance()
    bad = [torch.zeros(5, dtype=torch.int64), torch.zeros(4), torch.tensor([0, 0, 0, 101]),
           np.zeros((2, 2), dtype=np.int64)]
    for x in bad:
        with pytest.raises(InputError):
            clients[0].masked_input(deliveries[0], x)
        assert clients[0].stage is ClientStage.MASKED_INPUT
    fspec = InputSpec("float", 2, 1.0)
    with pytest.raises(InputError, match="NaN"):
        fspec.encode(torch.tensor([float("nan"), 0.0]))
    for i, m in deliveries.items():
        server.receive(i, clients[i].masked_input(m, xs[i]))
    for i, m in server.advance().items():
        server.receive(i, clients[i].unmask(m))
    server.advance()
    assert torch.equal(server.decoded(), torch.stack(xs).sum(0))


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


def test_unmask_request_cannot_ask_for_both_shares_of_a_peer() -> None:
    from protocols.secagg.messages import Header, MsgType, UnmaskRequest, add_mac

    setup = make_round(6, InputSpec("int", 4, 100), degree=4, threshold=3)
    xs = _ints(6, 4, 100)
    server, clients = _drive_until_masked(setup, xs, set())
    reqs = server.advance()
    c = clients[0]
    peers = sorted(c.neighbours)
    hdr = Header(MsgType.UNMASK_REQUEST, "run", 0, 0xFFFFFFFF, 0)
    both = UnmaskRequest(hdr, 6, tuple(sorted({0, *peers})), (peers[0],)).encode()
    with pytest.raises(ProtocolViolationError, match="both"):
        c.unmask(add_mac(c._mac, both))
    not_me = UnmaskRequest(hdr, 6, tuple(peers), ()).encode()
    with pytest.raises(ProtocolViolationError, match="not listed"):
        c.unmask(add_mac(c._mac, not_me))
    partial = UnmaskRequest(hdr, 6, (0, *peers[1:]), ()).encode()
    with pytest.raises(ProtocolViolationError, match="partition"):
        c.unmask(add_mac(c._mac, partial))
    assert c.stage is ClientStage.UNMASK
    reply = c.unmask(reqs[0])
    with pytest.raises(StageError):  # a second request is refused: one kind per peer, once
        c.unmask(reqs[0])
    assert reply


def test_cached_context_encoding_matches_message_context() -> None:
    from protocols.secagg import masks
    from protocols.secagg.messages import Step

    setup = make_round(5, InputSpec("int", 4, 10), run_id="r-é", round_=9)
    ctxs = masks.Contexts(setup.config)
    for step in Step:
        for a, b in ((0, 4), (3, -1), (-1, 2), (1, 1)):
            assert ctxs.info(step, a, b) == masks.context(setup.config, step, a, b).to_bytes()


def test_client_state_and_config_round_trip_through_bytes() -> None:
    from protocols.secagg import MalformedMessageError, RoundConfig
    from protocols.secagg.client import SecAggClient

    setup = make_round(6, InputSpec("float", 4, 1.0), degree=4, threshold=3)
    cfg = setup.config
    assert RoundConfig.from_bytes(cfg.to_bytes()) == cfg
    with pytest.raises(MalformedMessageError):
        RoundConfig.from_bytes(b"{not json")
    server, clients = setup.server(), setup.clients()
    reg = setup.registry

    def reload(i: int) -> None:
        blob = clients[i].export_state()
        clients[i] = SecAggClient.restore(cfg, i, setup.identities[i], reg, blob)

    xs = [torch.linspace(-1, 1, 4, dtype=torch.float64) * i / 6 for i in range(6)]
    for i, c in enumerate(clients):
        server.receive(i, c.advertise_keys())
        reload(i)
    deliveries = {}
    for i, m in server.advance().items():
        server.receive(i, clients[i].share_keys(m))
        reload(i)
    deliveries = server.advance()
    for i, m in deliveries.items():
        server.receive(i, clients[i].masked_input(m, xs[i]))
        reload(i)
    with pytest.raises(StageError):  # a restored client still refuses a replayed delivery
        clients[0].masked_input(deliveries[0], xs[0])
    for i, m in server.advance().items():
        server.receive(i, clients[i].unmask(m))
    server.advance()
    assert (server.decoded() - torch.stack(xs).sum(0)).abs().max() <= cfg.spec.error_bound(6)

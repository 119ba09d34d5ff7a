"""Multi-round SecAgg+ (keys once per epoch, one sum per day, consistency round): exact daily
sums with dropouts, day binding, replay and reuse refused, persistence, aborts that leave the
epoch usable."""

from __future__ import annotations

import pytest
import torch

from protocols.secagg import (
    ConfigError,
    InputError,
    InputSpec,
    ProtocolViolationError,
    SecAggAbortError,
    StageError,
    StaleMessageError,
)
from protocols.secagg.epoch_client import EpochClient, EpochStage
from protocols.secagg.epoch_server import EpochServerStage
from protocols.secagg.local import make_round, run_days, run_epoch_day

N, K, T, L = 24, 6, 4, 8


def _xs(n: int, seed: int, length: int = L) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)  # test data only
    return [torch.randint(-1000, 1001, (length,), generator=g) for _ in range(n)]


def _sum(xs: list[torch.Tensor], members: frozenset[int]) -> torch.Tensor:
    return torch.stack([xs[i] for i in sorted(members)]).sum(0)


def test_daily_sums_exact_with_dropouts_and_returning_clients() -> None:
    setup = make_round(N, InputSpec("int", L, 1000), degree=K, threshold=T)
    days = [_xs(N, d) for d in range(4)]
    drops = [{}, {"masked_input": {3}}, {"consistency": {7}}, {"unmask": {11}}]
    run = run_days(setup, days, drops, days=[5, 6, 9, 10])
    assert [d.day for d in run.days] == [5, 6, 9, 10]
    assert run.days[0].survivors == frozenset(range(N))
    assert 3 not in run.days[1].survivors and 3 in run.days[2].survivors  # came back
    assert 7 in run.days[2].survivors  # signed nothing, but its input is in the sum
    for d, xs in zip(run.days, days, strict=True):
        assert d.error is None and d.total is not None
        assert torch.equal(d.total, _sum(xs, d.survivors))
    assert run.setup_bytes_up > 0 and all(d.bytes_up > 0 for d in run.days)


def test_keys_are_agreed_once_and_day_masks_differ() -> None:
    setup = make_round(8, InputSpec("int", 4, 10), degree=4, threshold=3)
    server, clients = setup.agreed()
    zero = torch.zeros(4, dtype=torch.int64)
    seen = []
    for day in (0, 1):
        blob = clients[0].masked_input(day, zero)  # day 0 abandoned by moving on
        seen.append(blob[-32:])
        with pytest.raises(StageError):
            clients[0].advertise_keys()  # no re-keying between days
    assert seen[0] != seen[1]
    with pytest.raises(StaleMessageError):
        clients[0].masked_input(1, zero)  # a day is used once
    with pytest.raises(StaleMessageError):
        clients[0].masked_input(0, zero)


def test_day_of_a_message_is_checked() -> None:
    setup = make_round(8, InputSpec("int", 4, 10), degree=4, threshold=3)
    server, clients = setup.agreed()
    server.open_day(3)
    with pytest.raises(StaleMessageError):
        server.receive(0, clients[0].masked_input(2, torch.zeros(4, dtype=torch.int64)))
    with pytest.raises(StageError):
        server.open_day(4)  # day 3 is still open
    for bad in (True, -1, 2**63, 1.0, "4"):
        with pytest.raises(ConfigError):
            clients[1].masked_input(bad, torch.zeros(4, dtype=torch.int64))  # type: ignore[arg-type]


def test_abort_leaves_the_epoch_usable() -> None:
    setup = make_round(N, InputSpec("int", L, 1000), degree=K, threshold=T, min_survivors=20)
    days = [_xs(N, d) for d in range(3)]
    drops = [{"masked_input": set(range(6))}, {"unmask": set(range(0, N, 2))}, {}]
    run = run_days(setup, days, drops)
    assert isinstance(run.days[0].error, SecAggAbortError) and run.days[0].total is None
    assert isinstance(run.days[1].error, SecAggAbortError)
    assert run.days[2].error is None
    assert torch.equal(run.days[2].total, _sum(days[2], frozenset(range(N))))  # type: ignore[arg-type]
    assert run.server.stage is EpochServerStage.READY


def test_abort_before_unmasking_reveals_nothing() -> None:
    """Dropouts known at the consistency stage abort before any unmask request is sent."""
    setup = make_round(N, InputSpec("int", L, 1000), degree=K, threshold=T)
    server, clients = setup.agreed()
    server.open_day(0)
    xs = _xs(N, 0)
    for i, c in enumerate(clients):
        server.receive(i, c.masked_input(0, xs[i]))
    out = server.advance()
    nb = sorted(server._nbrs[0])
    for i, b in out.items():
        if i not in nb[:3]:  # three neighbours of client 0 never sign
            server.receive(i, clients[i].sign_survivors(b))
    with pytest.raises(SecAggAbortError, match="before unmasking"):
        server.advance()
    assert all(c.stage is EpochStage.UNMASK for i, c in enumerate(clients) if i not in nb[:3])


def test_single_day_round_matches_plain_sum_at_the_bounds() -> None:
    bound = (2**63 - 1) // 8
    setup = make_round(8, InputSpec("int", 3, bound), degree=4, threshold=3)
    xs = [torch.tensor([bound, -bound, (-1) ** i * bound]) for i in range(8)]
    res = run_epoch_day(setup, xs)
    assert res.total.tolist() == [8 * bound, -8 * bound, 0]
    fspec = InputSpec("float", 5, 2.0)
    setup = make_round(6, fspec, degree=4, threshold=3)
    g = torch.Generator().manual_seed(1)
    xf = [torch.rand(5, generator=g, dtype=torch.float64) * 6 - 3 for _ in range(6)]
    res = run_epoch_day(setup, xf)
    assert (res.total - torch.stack([x.clamp(-2, 2) for x in xf]).sum(0)).abs().max() <= \
        fspec.error_bound(6)


def test_state_round_trips_between_every_message() -> None:
    setup = make_round(8, InputSpec("int", 4, 10), degree=4, threshold=3)
    server, clients = setup.epoch_server(), setup.epoch_clients()
    reg = setup.registry

    def cycle(i: int) -> EpochClient:
        c = EpochClient.restore(setup.config, i, setup.identities[i], reg,
                                clients[i].export_state())
        clients[i] = c
        return c

    for i in range(8):
        server.receive(i, cycle(i).advertise_keys())
    for i, b in server.advance().items():
        cycle(i).accept_roster(b)
    xs = _xs(8, 2, 4)
    xs = [x.clamp(-10, 10) for x in xs]
    for day in (0, 1):
        server.open_day(day)
        for i in range(8):
            server.receive(i, cycle(i).masked_input(day, xs[i]))
        for stage in ("sign", "unmask"):
            for i, b in server.advance().items():
                c = cycle(i)
                server.receive(i, c.sign_survivors(b) if stage == "sign" else c.unmask(b))
        server.advance()
        assert torch.equal(server.decoded(day), torch.stack(xs).sum(0))
    assert b'"c": ""' in clients[0].export_state()  # the long-term private keys are gone


def test_bad_input_leaves_client_ready() -> None:
    setup = make_round(6, InputSpec("int", 4, 100), degree=4, threshold=3)
    server, clients = setup.agreed()
    for x in (torch.zeros(5, dtype=torch.int64), torch.tensor([0, 0, 0, 101]), "x", None):
        with pytest.raises(InputError):
            clients[0].masked_input(0, x)  # type: ignore[arg-type]
        assert clients[0].stage is EpochStage.READY and clients[0].last_day is None


def test_unmask_refuses_too_few_or_forged_neighbour_tags() -> None:
    from protocols.secagg import BadSignatureError
    from protocols.secagg.epoch_messages import DayUnmaskRequest, EHeader, EMsg
    from protocols.secagg.messages import SERVER, add_mac

    setup = make_round(N, InputSpec("int", L, 1000), degree=K, threshold=T)
    server, clients = setup.agreed()
    server.open_day(0)
    xs = _xs(N, 0)
    for i, c in enumerate(clients):
        server.receive(i, c.masked_input(0, xs[i]))
    for i, b in server.advance().items():
        server.receive(i, clients[i].sign_survivors(b))
    reqs = server.advance()
    cfg = setup.config
    good = DayUnmaskRequest.decode(reqs[0][:-32], N, K)
    assert len(good.tags) == K  # every live neighbour's tag is forwarded
    hdr = EHeader(EMsg.UNMASK_REQUEST, cfg.run_id, cfg.round, 0, SERVER, 0)

    def req(tags: tuple) -> bytes:  # type: ignore[type-arg]
        return add_mac(server._macs[0], DayUnmaskRequest(hdr, tags, good.envelopes).encode())

    with pytest.raises(ProtocolViolationError):
        clients[0].unmask(req(good.tags[: T - 1]))
    outsider = next(j for j in range(N) if j not in clients[0].neighbours and j != 0)
    with pytest.raises(ProtocolViolationError):
        clients[0].unmask(req(((outsider, bytes(32)),) + good.tags[1:]))
    forged = tuple((j, bytes(32)) for j, _ in good.tags[: K - T + 1]) + good.tags[K - T + 1:]
    with pytest.raises(BadSignatureError):  # T - 1 valid tags on this set
        clients[0].unmask(req(forged))
    assert clients[0].stage is EpochStage.UNMASK
    # one bad tag (a corrupt neighbour) cannot block the day: K - 1 >= T valid ones remain
    server.receive(0, clients[0].unmask(req(((good.tags[0][0], bytes(32)),) + good.tags[1:])))


def test_a_wrong_self_mask_share_is_detected_not_summed() -> None:
    from protocols.secagg.epoch_messages import DayUnmaskResponse, RevealKind
    from protocols.secagg.messages import add_mac, strip_mac

    setup = make_round(N, InputSpec("int", L, 1000), degree=K, threshold=T)
    server, clients = setup.agreed()
    server.open_day(0)
    xs = _xs(N, 0)
    for i, c in enumerate(clients):
        server.receive(i, c.masked_input(0, xs[i]))
    for i, b in server.advance().items():
        server.receive(i, clients[i].sign_survivors(b))
    for i, b in server.advance().items():
        blob = clients[i].unmask(b)
        if i == 0:  # client 0 deviates: one share it reveals is off by one
            msg = DayUnmaskResponse.decode(strip_mac(server._macs[0], blob, 10**6), N, K)
            j, kind, share = msg.reveals[0]
            assert kind is RevealKind.SELF_MASK_SHARE
            bad = share[:-1] + bytes([share[-1] ^ 1])
            msg = DayUnmaskResponse(msg.header, ((j, kind, bad),) + msg.reveals[1:])
            blob = add_mac(server._macs[0], msg.encode())
        server.receive(i, blob)
    with pytest.raises(ProtocolViolationError, match="inconsistent|reconstruction failed"):
        server.advance()
    assert server.stage is EpochServerStage.UNMASK and server.result is None


@pytest.mark.parametrize("seed", range(4))
def test_tagged_survivor_dying_next_to_a_pre_input_dropout_does_not_fail_the_day(
        seed: int) -> None:
    """A neighbour D of T drops before input; T masks (with its day key with D), tags the
    survivor set and dies before unmasking. T revealed its day keys with neighbours outside
    S with its tags, so the day completes over the survivors, T's input included. (Before
    2026-11-28 session 3 the key was revealed only at unmask: no-one could supply it and the
    federated run failed.)"""
    from protocols.secagg.graph import neighbour_graph

    setup = make_round(N, InputSpec("int", L, 1000), degree=K, threshold=T)
    cfg = setup.config
    nbrs = neighbour_graph(cfg.graph_seed, cfg.n, cfg.degree)
    dropped = seed
    dying = sorted(nbrs[dropped])[0]
    days = [_xs(N, 10 + seed) for _ in range(2)]
    drops = [{"masked_input": {dropped}, "unmask": {dying}}, {}]
    run = run_days(setup, days, drops)
    first = run.days[0]
    assert first.error is None, first.error
    assert dropped not in first.survivors and dying in first.survivors
    assert torch.equal(first.total, _sum(days[0], first.survivors))  # type: ignore[arg-type]
    assert run.days[1].error is None  # the epoch goes on, both back
    assert torch.equal(run.days[1].total, _sum(days[1], frozenset(range(N))))  # type: ignore[arg-type]


def test_a_dropout_reveals_nothing_usable_for_its_input_on_another_day() -> None:
    """D drops before input on day 0: the coordinator collects every day-0 key of D (its
    live neighbours send them with their tags). On day 1 D reports and survives, so the
    coordinator also legitimately rebuilds D's day-1 self mask. Those day-0 keys still do
    not strip D's day-1 pairwise masks (day keys are HKDF-Expand outputs bound to the day,
    not the epoch root): D's day-1 input stays masked; with the true day-1 keys (read from
    the clients, a positive control) the same computation recovers it exactly."""
    from protocols.keys import ring_keystream
    from protocols.secagg.shamir import reconstruct_secret

    setup = make_round(N, InputSpec("int", L, 1000), degree=K, threshold=T)
    server, clients = setup.agreed()
    d, ctx, t = 5, server._ctx, server.config.threshold
    nbrs = server.neighbours(d)
    captured: dict[int, dict] = {}
    for day, absent in ((0, {d}), (1, set())):
        xs = _xs(N, 40 + day)
        server.open_day(day)
        for i, c in enumerate(clients):
            if i not in absent:
                server.receive(i, c.masked_input(day, xs[i]))
        out = server.advance()
        for i, blob in out.items():
            server.receive(i, clients[i].sign_survivors(blob))
        out = server.advance()
        for i, blob in out.items():
            server.receive(i, clients[i].unmask(blob))
        captured[day] = {"keys": dict(server._day_keys), "xs": xs,
                         "inputs": {i: m.vector.clone() for i, m in server._inputs.items()},
                         "responses": dict(server._responses)}
        server.advance()
        assert server.survivors[day] == frozenset(range(N)) - absent
    day0_keys = {j: key for (j, i), key in captured[0]["keys"].items() if i == d}
    assert set(day0_keys) == set(nbrs)  # the coordinator holds all of D's day-0 keys
    day1 = captured[1]
    shares = {h + 1: data for h, msg in day1["responses"].items()
              for j, _, data in msg.reveals if j == d}
    seed = reconstruct_secret(shares, t)
    buf = torch.empty(L, dtype=torch.int64)

    def strip(keys: dict[int, bytes]) -> torch.Tensor:
        y = day1["inputs"][d].clone()
        ring_keystream(ctx.self_mask_key(seed, d, 1), L, out=buf)
        y.sub_(buf)
        for j, key in keys.items():
            ring_keystream(key, L, out=buf)
            y.sub_(buf) if d < j else y.add_(buf)
        return y

    true1 = {j: clients[j]._ctx.day_pair_key(clients[j]._roots[d], 1, j, d) for j in nbrs}
    assert torch.equal(strip(true1), day1["xs"][d])  # positive control
    assert not set(day0_keys.values()) & set(true1.values())
    assert not torch.equal(strip(day0_keys), day1["xs"][d])
    assert (strip(day0_keys) - day1["xs"][d]).abs().min() > 2**20  # masked, not nearly

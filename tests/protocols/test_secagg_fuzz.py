"""Boundary validation of SecAgg+ messages, property-based: tampered, truncated, extended,
random, oversized, replayed, misrouted, stale and wrong-stage messages are rejected with a
SecAggError subclass, the receiving state machine is unchanged, and the round still completes
with the exact sum afterwards."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocols.secagg import (
    InputSpec,
    MisroutedMessageError,
    ReplayedMessageError,
    SecAggError,
    StageError,
    StaleMessageError,
    TamperedShareError,
)
from protocols.secagg.errors import MalformedMessageError, OversizedMessageError
from protocols.secagg.local import make_round
from protocols.secagg.messages import MAC_BYTES, add_mac

N, L = 6, 8
FUZZ = settings(max_examples=60, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


def _state(obj: object) -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in vars(obj).items():
        if isinstance(v, dict):
            out[k] = tuple(sorted(v))
        elif k == "_guard":
            out[k] = len(v)
        elif isinstance(v, torch.Tensor):
            out[k] = v.clone()
        else:
            out[k] = v
    return out


def _same(a: dict[str, object], b: dict[str, object]) -> bool:
    if a.keys() != b.keys():
        return False
    for k in a:
        x, y = a[k], b[k]
        if isinstance(x, torch.Tensor):
            if not (isinstance(y, torch.Tensor) and torch.equal(x, y)):
                return False
        elif x != y:
            return False
    return True


class Staged:
    """A round paused with every genuine message of every stage recorded."""

    def __init__(self) -> None:
        self.setup = make_round(N, InputSpec("int", L, 1000), run_id="fuzz", round_=3,
                                degree=4, threshold=3)
        g = torch.Generator().manual_seed(7)
        self.xs = [torch.randint(-1000, 1001, (L,), generator=g) for _ in range(N)]
        self.server = self.setup.server()
        self.clients = self.setup.clients()
        self.up: dict[str, dict[int, bytes]] = {}
        self.down: dict[str, dict[int, bytes]] = {}

    def advertise(self) -> None:
        self.up["advertise"] = {i: c.advertise_keys() for i, c in enumerate(self.clients)}

    def deliver(self, stage: str) -> None:
        for i, m in self.up[stage].items():
            self.server.receive(i, m)

    def step(self, stage: str) -> None:
        out = self.server.advance()
        self.down[stage] = out
        cs = self.clients
        if stage == "share_keys":
            self.up[stage] = {i: cs[i].share_keys(m) for i, m in out.items()}
        elif stage == "masked_input":
            self.up[stage] = {i: cs[i].masked_input(m, self.xs[i]) for i, m in out.items()}
        else:
            self.up[stage] = {i: cs[i].unmask(m) for i, m in out.items()}

    def finish(self) -> None:
        self.server.advance()
        assert torch.equal(self.server.decoded(), torch.stack(self.xs).sum(0))


def _mutate(blob: bytes, data: st.DataObject) -> bytes:
    kind = data.draw(st.sampled_from(["flip", "truncate", "extend", "random", "splice"]))
    if kind == "flip":
        pos = data.draw(st.integers(0, len(blob) - 1))
        bit = data.draw(st.integers(0, 7))
        return blob[:pos] + bytes([blob[pos] ^ (1 << bit)]) + blob[pos + 1 :]
    if kind == "truncate":
        return blob[: data.draw(st.integers(0, len(blob) - 1))]
    if kind == "extend":
        return blob + data.draw(st.binary(min_size=1, max_size=64))
    if kind == "random":
        out = data.draw(st.binary(min_size=0, max_size=len(blob) + 8))
        return out if out != blob else out + b"\0"
    pos = data.draw(st.integers(0, len(blob) - 1))
    junk = data.draw(st.binary(min_size=1, max_size=16))
    out = blob[:pos] + junk + blob[pos + len(junk) :]
    return out if out != blob else blob[:-1]


STAGE_ORDER = ["advertise", "share_keys", "masked_input", "unmask"]


def _server_at(stage: str) -> Staged:
    s = Staged()
    s.advertise()
    for prev in STAGE_ORDER[: STAGE_ORDER.index(stage)]:
        s.deliver(prev)
        s.step(STAGE_ORDER[STAGE_ORDER.index(prev) + 1])
    return s


@pytest.mark.parametrize("stage", STAGE_ORDER)
def test_server_rejects_mutated_client_messages(stage: str) -> None:
    s = _server_at(stage)

    @FUZZ
    @given(data=st.data())
    def check(data: st.DataObject) -> None:
        sender = data.draw(st.integers(0, N - 1))
        bad = _mutate(s.up[stage][sender], data)
        before = _state(s.server)
        with pytest.raises(SecAggError):
            s.server.receive(sender, bad)
        assert _same(before, _state(s.server))

    check()
    s.deliver(stage)
    for nxt in STAGE_ORDER[STAGE_ORDER.index(stage) + 1 :]:
        s.step(nxt)
        s.deliver(nxt)
    s.finish()


def _client_at(stage: str) -> tuple[Staged, dict[int, bytes]]:
    """Clients waiting for the server's ``stage`` message, and those messages."""
    s = Staged()
    s.advertise()
    k = STAGE_ORDER.index(stage)
    for prev, nxt in zip(STAGE_ORDER[: k - 1], STAGE_ORDER[1:k], strict=True):
        s.deliver(prev)
        s.step(nxt)
    s.deliver(STAGE_ORDER[k - 1])
    return s, s.server.advance()


@pytest.mark.parametrize("stage", ["share_keys", "masked_input", "unmask"])
def test_client_rejects_mutated_server_messages(stage: str) -> None:
    s, msgs = _client_at(stage)

    def call(i: int, blob: bytes) -> bytes:
        c = s.clients[i]
        if stage == "masked_input":
            return c.masked_input(blob, s.xs[i])
        return c.share_keys(blob) if stage == "share_keys" else c.unmask(blob)

    @FUZZ
    @given(data=st.data())
    def check(data: st.DataObject) -> None:
        i = data.draw(st.sampled_from(sorted(msgs)))
        bad = _mutate(msgs[i], data)
        before = _state(s.clients[i])
        with pytest.raises(SecAggError):
            call(i, bad)
        assert _same(before, _state(s.clients[i]))

    @FUZZ
    @given(data=st.data())
    def check_remaced(data: st.DataObject) -> None:
        """A key holder (the server) sending garbage: the MAC verifies, the content is
        still validated. Unmask requests are excluded: a semi-honest server's request is
        trusted within the partition/disjointness checks tested elsewhere."""
        i = data.draw(st.sampled_from(sorted(msgs)))
        body = msgs[i][:-MAC_BYTES]
        bad = add_mac(s.clients[i]._mac, _mutate(body, data))
        before = _state(s.clients[i])
        with pytest.raises(SecAggError):
            call(i, bad)
        assert _same(before, _state(s.clients[i]))

    check()
    if stage != "unmask":
        check_remaced()
    # the genuine messages still work and the round completes exactly
    up = {i: call(i, m) for i, m in msgs.items()}
    for i, m in up.items():
        s.server.receive(i, m)
    for nxt in STAGE_ORDER[STAGE_ORDER.index(stage) + 1 :]:
        s.step(nxt)
        s.deliver(nxt)
    s.finish()


def _fresh_masked_stage() -> Staged:
    s = Staged()
    s.advertise()
    s.deliver("advertise")
    s.step("share_keys")
    s.deliver("share_keys")
    s.down["masked_input"] = s.server.advance()
    return s


def test_misrouted_replayed_stale_and_wrong_stage_messages() -> None:
    s = _fresh_masked_stage()
    d = s.down["masked_input"]
    c0, c1 = s.clients[0], s.clients[1]
    # misrouted by the transport: another client's MAC key
    with pytest.raises(SecAggError):
        c1.masked_input(d[0], s.xs[1])
    # misrouted by a key holder (re-MACed for client 1): header names client 0
    body = d[0][:-MAC_BYTES]
    with pytest.raises(MisroutedMessageError):
        c1.masked_input(add_mac(c1._mac, body), s.xs[1])
    # a sender claiming another index
    y0 = c0.masked_input(d[0], s.xs[0])
    with pytest.raises(SecAggError):
        s.server.receive(1, y0)
    s.server.receive(0, y0)
    with pytest.raises(ReplayedMessageError):
        s.server.receive(0, y0)
    # wrong stage on both sides
    with pytest.raises(StageError):
        c0.masked_input(d[0], s.xs[0])
    with pytest.raises(StageError):
        c0.share_keys(d[0])
    # stale: the same bytes re-MACed but from another round
    hdr_round = body.replace(b"fuzz" + (3).to_bytes(8, "big"), b"fuzz" + (2).to_bytes(8, "big"))
    assert hdr_round != body
    with pytest.raises(StaleMessageError):
        c1.masked_input(add_mac(c1._mac, hdr_round.replace(
            (0xFFFFFFFF).to_bytes(4, "big") + (0).to_bytes(4, "big"),
            (0xFFFFFFFF).to_bytes(4, "big") + (1).to_bytes(4, "big"))), s.xs[1])
    assert c1.stage.value == "masked_input"


def test_envelope_moved_to_another_client_or_round_is_rejected() -> None:
    from protocols.secagg.messages import Delivery, Header, MsgType

    s = _fresh_masked_stage()
    d = s.down["masked_input"]
    cfg = s.setup.config
    body0 = Delivery.decode(d[0][:-MAC_BYTES], N, cfg.degree)
    c = s.clients[0]
    # a key holder swaps the senders of two envelopes: context binding rejects it
    (a, ea), (b, eb), *rest = body0.envelopes
    swapped = Delivery(body0.header, ((a, eb), (b, ea), *rest)).encode()
    with pytest.raises(TamperedShareError):
        c.masked_input(add_mac(c._mac, swapped), s.xs[0])
    # one flipped ciphertext bit
    tampered = Delivery(Header(MsgType.DELIVERY, "fuzz", 3, 0xFFFFFFFF, 0),
                      ((a, ea[:-1] + bytes([ea[-1] ^ 1])), (b, eb), *rest)).encode()
    with pytest.raises(TamperedShareError):
        c.masked_input(add_mac(c._mac, tampered), s.xs[0])
    assert c.stage.value == "masked_input"
    s.server.receive(0, c.masked_input(d[0], s.xs[0]))


def test_oversized_and_non_bytes_are_rejected() -> None:
    s = _fresh_masked_stage()
    c = s.clients[0]
    with pytest.raises(OversizedMessageError):
        c.masked_input(b"\0" * 10_000_000, s.xs[0])
    with pytest.raises(MalformedMessageError):
        c.masked_input("not bytes", s.xs[0])  # type: ignore[arg-type]
    with pytest.raises(OversizedMessageError):
        s.server.receive(0, b"\0" * 10_000_000)
    assert c.stage.value == "masked_input"


def test_parsers_raise_only_malformed_on_arbitrary_bytes() -> None:
    from protocols.secagg.messages import (
        Advertise,
        Delivery,
        MaskedInput,
        Roster,
        ShareBundle,
        UnmaskRequest,
        UnmaskResponse,
    )

    parsers = [
        lambda b: Advertise.decode(b, N),
        lambda b: Roster.decode(b, N, 4),
        lambda b: ShareBundle.decode(b, N, 4),
        lambda b: Delivery.decode(b, N, 4),
        lambda b: MaskedInput.decode(b, N, L),
        lambda b: UnmaskRequest.decode(b, N, 5),
        lambda b: UnmaskResponse.decode(b, N, 4),
    ]
    s = _server_at("unmask")
    samples = [m for stage in s.up.values() for m in stage.values()]
    samples += [m for stage in s.down.values() for m in stage.values()]

    @settings(max_examples=150, deadline=None)
    @given(data=st.data())
    def check(data: st.DataObject) -> None:
        blob = data.draw(st.sampled_from(samples))
        body = blob if blob[4] == 1 else blob[:-MAC_BYTES]
        bad = _mutate(body, data)
        for p in parsers:
            try:
                p(bad)
            except MalformedMessageError:
                pass

    check()


def test_state_snapshot_helper_detects_changes() -> None:
    s = Staged()
    before = _state(s.clients[0])
    s.clients[0].advertise_keys()
    assert not _same(before, _state(s.clients[0]))
    assert dataclasses.is_dataclass(s.setup.config)


def test_low_order_public_key_is_rejected_at_the_server() -> None:
    from protocols.secagg import ProtocolViolationError, masks
    from protocols.secagg.messages import SERVER, Advertise, Header, MsgType

    s = Staged()
    cfg = s.setup.config
    zero = bytes(32)  # low-order X25519 point: the shared secret would be all zeros
    ok = s.clients[1].advertise_keys()
    s_pk = Advertise.decode(ok, N).s_pk
    sig = s.setup.identities[1].sign(masks.signed_key_statement(cfg, 1, zero, s_pk))
    bad = Advertise(Header(MsgType.ADVERTISE, cfg.run_id, cfg.round, 1, SERVER), zero, s_pk,
                    sig).encode()
    before = _state(s.server)
    with pytest.raises(ProtocolViolationError):
        s.server.receive(1, bad)
    assert _same(before, _state(s.server))
    s.server.receive(1, ok)

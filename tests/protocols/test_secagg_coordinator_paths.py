"""The SecAgg+ coordinator's fast paths against their references: MACs from precomputed
HMAC pad states (= HMAC-SHA256), the strided reveal check (= the exact pattern), pruning to
the threshold-core in bulk (= one member at a time), and messages that only the strict
decoders accept (entries in another order than the canonical encoding) kept and summed
exactly like canonical ones."""

from __future__ import annotations

import hashlib
import hmac
import os
import random
import struct

import pytest
import torch

from protocols.secagg import InputSpec
from protocols.secagg.epoch_messages import (
    _REVEALS,
    DayInput,
    DayUnmaskResponse,
    SurvivorTags,
    reveals_ok,
)
from protocols.secagg.errors import TamperedMessageError
from protocols.secagg.local import make_round
from protocols.secagg.messages import MAC_BYTES, MacKey, add_mac, strip_mac
from protocols.secagg.shamir import PRIME

N, L, K, T = 24, 5, 6, 4


@pytest.mark.parametrize("key_len", [0, 1, 31, 32, 33, 63, 64, 65, 200])
def test_mac_key_tags_are_hmac_sha256(key_len: int) -> None:
    key = os.urandom(key_len)
    mk = MacKey(key)
    for size in (0, 1, 55, 56, 63, 64, 65, 119, 120, 1000):
        body = os.urandom(size)
        ref = hmac.new(key, body, hashlib.sha256).digest()
        assert mk.tag(body) == ref
        assert add_mac(mk, body) == add_mac(key, body) == body + ref
        assert mk.verify(body + ref)
        assert strip_mac(mk, body + ref, 2000) == body
        bad = body + bytes([ref[0] ^ 1]) + ref[1:]
        assert not mk.verify(bad)
        with pytest.raises(TamperedMessageError):
            strip_mac(mk, bad, 2000)
    assert not mk.verify(b"\x00" * (MAC_BYTES - 1))


def _element(rng: random.Random, kind: str) -> bytes:
    value = {"low": rng.randrange(0, 1 << 120), "top": rng.randrange(0x7F << 120, PRIME),
             "p-1": PRIME - 1, "p": PRIME, "above": rng.randrange(PRIME + 1, 1 << 128),
             "p-2": PRIME - 2}[kind]
    return value.to_bytes(16, "big")


def test_strided_reveal_check_equals_the_exact_pattern() -> None:
    rng = random.Random(5)  # test data only
    kinds = ["low"] * 6 + ["top", "p-1", "p-2", "p", "above"]
    for _ in range(3000):
        count = rng.randint(0, 5)
        rows = b"".join(
            struct.pack(">I", rng.randrange(1 << 32))
            + bytes([0 if rng.random() < 0.9 else rng.randrange(1, 256)])
            + b"".join(_element(rng, rng.choice(kinds)) for _ in range(3))
            for _ in range(count))
        pad = os.urandom(rng.randint(0, 9))
        blob = pad + rows + os.urandom(rng.randint(0, 9))
        assert reveals_ok(blob, len(pad), count) == (_REVEALS.fullmatch(rows) is not None)


def _prune_one_by_one(nbrs: list[frozenset[int]], alive: set[int], t: int) -> frozenset[int]:
    alive = set(alive)
    changed = True
    while changed:
        changed = False
        for i in sorted(alive):
            if len(nbrs[i] & alive) < t:
                alive.discard(i)
                changed = True
    return frozenset(alive)


def test_bulk_pruning_equals_one_at_a_time() -> None:
    rng = random.Random(11)  # test data only
    setup = make_round(60, InputSpec("int", L, 1000), degree=8, threshold=5)
    server = setup.epoch_server()
    nbrs = [server.neighbours(i) for i in range(60)]
    for _ in range(300):
        alive = {i for i in range(60) if rng.random() < rng.choice([0.5, 0.8, 0.95])}
        assert server._prune(alive) == _prune_one_by_one(nbrs, alive, 5)


def _reordered(mac: bytes, blob: bytes, kind: str) -> bytes:
    """The same message with its entry lists reversed (valid, not the canonical order),
    MAC'd again under the client's key."""
    body = strip_mac(mac, blob, 10**6)
    if kind == "input":
        m = DayInput.decode(body, N, K, L)
        new = DayInput(m.header, m.envelopes[::-1], m.vector)
    elif kind == "tags":
        t = SurvivorTags.decode(body, N, K)
        new = SurvivorTags(t.header, t.tags[::-1], t.day_keys[::-1])  # type: ignore[assignment]
    else:
        r = DayUnmaskResponse.decode(body, N, K)
        new = DayUnmaskResponse(r.header, r.reveals[::-1])  # type: ignore[assignment]
    out = new.encode()
    assert out != body and sorted(out) == sorted(body)
    return add_mac(mac, out)


@pytest.mark.parametrize("absent", [frozenset(), frozenset({3})])
def test_non_canonical_entry_order_is_accepted_and_summed_exactly(absent: frozenset[int]
                                                                  ) -> None:
    """Every third client sends every message with its entries reversed (which only the
    strict decoders accept): kept as received like canonical ones, they give the exact sum
    (clients check the unmask requests built from them). Canonical messages as control."""
    for reorder in (False, True):
        setup = make_round(N, InputSpec("int", L, 1000), degree=K, threshold=T)
        server, clients = setup.agreed()
        g = torch.Generator().manual_seed(3)  # test data only
        xs = [torch.randint(-1000, 1001, (L,), generator=g) for _ in range(N)]
        server.open_day(0)

        def send(i: int, blob: bytes, kind: str, reorder: bool = reorder,
                 server: object = server) -> None:
            if reorder and i % 3 == 0:
                blob = _reordered(server._macs[i], blob, kind)  # type: ignore[attr-defined]
            server.receive(i, blob)  # type: ignore[attr-defined]

        for i, c in enumerate(clients):
            if i not in absent:
                send(i, c.masked_input(0, xs[i]), "input")
        out = server.advance()
        for i, blob in out.items():
            send(i, clients[i].sign_survivors(blob), "tags")
        for i, blob in server.advance().items():
            send(i, clients[i].unmask(blob), "unmask")
        server.advance()
        surv = sorted(server.survivors[0])
        assert surv == sorted(set(range(N)) - absent)
        assert torch.equal(server.decoded(0), torch.stack([xs[i] for i in surv]).sum(0))

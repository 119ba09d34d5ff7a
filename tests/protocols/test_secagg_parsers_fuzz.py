"""Property-based fuzzing of every SecAgg+ parser: random bytes and mutations of valid
encodings (bit flips, truncation, extension, splicing, overwritten slices) raise only the
project's exceptions. The default run draws a few hundred inputs per parser; the ``slow``
run draws 10,000 per parser (``pytest -m slow -k parsers_fuzz``).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocols.envelope import EnvelopeError, open_envelope
from protocols.keys import InvalidKeyError
from protocols.secagg import InputSpec, RoundConfig, SecAggError
from protocols.secagg import epoch_messages as em
from protocols.secagg import messages as m
from protocols.secagg.epoch_client import EpochClient
from protocols.secagg.local import make_round
from protocols.secagg.shamir import ShamirError, decode_share

QUICK, FULL = 60, 10_000
N, K, L = 6, 4, 5


@functools.lru_cache(maxsize=1)
def corpus() -> dict[str, list[bytes]]:
    """Valid encodings of every message type, captured from one real epoch (MACs
    stripped where a parser sees the body)."""
    setup = make_round(N, InputSpec("int", L, 100), degree=K, threshold=3)
    server, clients = setup.epoch_server(), setup.epoch_clients()
    got: dict[str, list[bytes]] = {}

    def keep(name: str, blob: bytes, mac: bool = True) -> None:
        got.setdefault(name, []).append(blob[: -m.MAC_BYTES] if mac else blob)

    for i, c in enumerate(clients):
        adv = c.advertise_keys()
        keep("e_advertise", adv, mac=False)
        server.receive(i, adv)
    for i, b in server.advance().items():
        keep("e_roster", b)
        clients[i].accept_roster(b)
    server.open_day(0)
    for i, c in enumerate(clients):
        b = c.masked_input(0, torch.arange(L) - i)
        keep("e_input", b)
        server.receive(i, b)
    for i, b in server.advance().items():
        keep("e_survivors", b)
        s = clients[i].sign_survivors(b)
        keep("e_signature", s)
        server.receive(i, s)
    for i, b in server.advance().items():
        keep("e_request", b)
        r = clients[i].unmask(b)
        keep("e_response", r)
        server.receive(i, r)
    server.advance()
    got["e_state"] = [clients[0].export_state()]
    _SETUP.append(setup)
    got["config"] = [setup.config.to_bytes()]
    return got


_SETUP: list = []  # the epoch the corpus came from (client 0 restores its own state)


def _restore_epoch(blob: bytes) -> object:
    corpus()
    setup = _SETUP[0]
    return EpochClient.restore(setup.config, 0, setup.identities[0], setup.registry, blob)


PARSERS: dict[str, tuple[str, Callable[[bytes], object]]] = {
    # name: (corpus key, parser)
    "epoch_advertise": ("e_advertise", lambda b: em.EpochAdvertise.decode(b, N)),
    "epoch_roster": ("e_roster", lambda b: em.EpochRoster.decode(b, N, K)),
    "day_input": ("e_input", lambda b: em.DayInput.decode(b, N, K, L)),
    "survivor_set": ("e_survivors", lambda b: em.SurvivorSet.decode(b, N)),
    "survivor_tags": ("e_signature", lambda b: em.SurvivorTags.decode(b, N, K)),
    "day_unmask_request": ("e_request", lambda b: em.DayUnmaskRequest.decode(b, N, K)),
    "day_unmask_response": ("e_response", lambda b: em.DayUnmaskResponse.decode(b, N, K)),
    "epoch_header": ("e_input", em.parse_eheader),
    "bitmap": ("e_survivors", lambda b: em.decode_bitmap(b[-1:], N)),
    "share_payload_v2": ("e_input", lambda b: em.SharePayload.decode(b[:em.SHARE_PAYLOAD_BYTES])),
    "epoch_state": ("e_state", _restore_epoch),
    "round_config": ("config", RoundConfig.from_bytes),
    "strip_mac": ("e_input", lambda b: m.strip_mac(bytes(32), b, 1000)),
    "shamir_share": ("e_advertise", lambda b: decode_share(b[:48])),
    "envelope": ("e_input", lambda b: open_envelope(bytes(32), b"aad", b)),
}
PROJECT_ERRORS = (SecAggError, ShamirError, EnvelopeError, InvalidKeyError)


@functools.lru_cache(maxsize=1)
def _pool() -> list[bytes]:
    return [s for v in corpus().values() for s in v]


def mutate(seed_blob: bytes, recipe: int, extra: bytes) -> bytes:
    """Damage a valid encoding 1–3 times (flip, truncate, extend, splice, overwrite, insert);
    ``recipe`` drives the choices (hypothesis shrinks it like any integer)."""
    data = bytearray(seed_blob)
    pool = _pool()
    for _ in range(1 + recipe % 3):
        recipe //= 3
        op, recipe = recipe % 6, recipe // 6
        pos = recipe % (len(data) + 1)
        recipe //= 1024
        if op == 0 and data:
            data[min(pos, len(data) - 1)] ^= 1 << (recipe % 8)
        elif op == 1:
            del data[pos:]
        elif op == 2:
            data += extra or b"\x00"
        elif op == 3:
            other = pool[recipe % len(pool)]
            data = data[:pos] + bytearray(other[(recipe // 7) % (len(other) + 1):])
        elif op == 4:
            data[pos : pos + len(extra)] = extra
        else:
            data[pos:pos] = extra[:8]
    return bytes(data)


def inputs(key: str) -> st.SearchStrategy[bytes]:
    seeds = corpus()[key]
    damaged = st.builds(mutate, st.sampled_from(seeds), st.integers(0, 2**40),
                        st.binary(max_size=24))
    return st.one_of(st.binary(max_size=600), damaged, damaged, damaged)


def _check(name: str, blob: bytes) -> None:
    _, parse = PARSERS[name]
    try:
        parse(blob)
    except PROJECT_ERRORS:
        pass


def _run(name: str, examples: int) -> None:
    key, _ = PARSERS[name]
    corpus()

    @settings(max_examples=examples, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(inputs(key))
    def prop(blob: bytes) -> None:
        _check(name, blob)

    prop()


def test_corpus_parses_cleanly() -> None:
    """Positive control: every captured encoding parses (so the mutations start from
    valid messages and the harness can tell parse failures from harness failures)."""
    for name, (key, parse) in PARSERS.items():
        if name in ("strip_mac", "envelope", "bitmap", "share_payload_v1",
                    "share_payload_v2", "shamir_share"):
            continue
        for blob in corpus()[key]:
            parse(blob)


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_parser_raises_only_project_errors(name: str) -> None:
    _run(name, QUICK)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(PARSERS))
def test_parser_raises_only_project_errors_10k(name: str) -> None:
    _run(name, FULL)


@settings(max_examples=QUICK, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
                    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(), c,
                                                                        max_size=4),
                    max_leaves=12))
def test_round_config_json_of_any_shape(value: object) -> None:
    """JSON documents of every shape (not only mutated bytes) give MalformedMessageError."""
    base = json.loads(corpus()["config"][0])
    for key in list(base)[:3]:
        doc = dict(base, **{key: value})
        try:
            RoundConfig.from_bytes(json.dumps(doc).encode())
        except SecAggError:
            pass

"""Property-based fuzzing of every neighbourhood-sum parser (envelopes, payloads, plans):
random and mutated inputs raise only the project's exceptions. Default run: a few dozen
inputs per parser; ``slow``: 10,000 per parser."""

from __future__ import annotations

import functools
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocols.envelope import EnvelopeError, MessageContext
from protocols.keys import InvalidKeyError
from protocols.neighbourhood import AgentPlan, Envelope, Neighbourhood, NeighbourhoodError
from protocols.neighbourhood.messages import (
    decode_element,
    decode_mask_sum,
    decode_tagged,
    encode_element,
    encode_mask_sum,
    encode_tagged,
)

QUICK, FULL = 60, 10_000
PROJECT_ERRORS = (NeighbourhoodError, EnvelopeError, InvalidKeyError)


@functools.lru_cache(maxsize=1)
def corpus() -> dict[str, list[bytes]]:
    ctx = MessageContext("lpm-nbhd-peer/1", "run", 3, 5, "alice", "bob")
    return {
        "envelope": [Envelope(ctx, bytes(range(40))).to_bytes(),
                     Envelope(ctx.reply(), b"").to_bytes()],
        "tagged": [encode_tagged([("t1", 5), ("t2", -(2**63))]), encode_tagged([])],
        "element": [encode_element(-1), encode_element(2**63 - 1)],
        "mask_sum": [encode_mask_sum(7, ["a", "b", "c"])],
    }


PARSERS: dict[str, tuple[str, Callable[[bytes], object]]] = {
    "envelope": ("envelope", Envelope.from_bytes),
    "tagged": ("tagged", decode_tagged),
    "element": ("element", decode_element),
    "mask_sum": ("mask_sum", decode_mask_sum),
}


@st.composite
def mutated(draw: st.DrawFn, key: str) -> bytes:
    data = bytearray(draw(st.sampled_from(corpus()[key])))
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["flip", "truncate", "extend", "overwrite", "insert"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "truncate":
            del data[pos:]
        elif op == "extend":
            data += draw(st.binary(min_size=1, max_size=64))
        elif op == "overwrite":
            chunk = draw(st.binary(min_size=1, max_size=16))
            data[pos : pos + len(chunk)] = chunk
        else:
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
    return bytes(data)


def _run(name: str, examples: int) -> None:
    key, parse = PARSERS[name]

    @settings(max_examples=examples, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.one_of(st.binary(max_size=300), mutated(key), mutated(key)))
    def prop(blob: bytes) -> None:
        try:
            parse(blob)
        except PROJECT_ERRORS:
            pass

    prop()


# JSON-like values of any shape, for the plan parser (a transport record)
JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
    max_leaves=16,
)
GOOD_PLAN = AgentPlan(2, 1, Neighbourhood("a", ("b", "c", "dummy:a:0"), 2),
                      (Neighbourhood("b", ("a", "c", "d"), 3),)).to_dict()


@st.composite
def plans(draw: st.DrawFn) -> object:
    """Valid plans with one field replaced by an arbitrary JSON value, or anything."""
    if draw(st.booleans()):
        return draw(JSONISH)
    plan = dict(GOOD_PLAN)
    key = draw(st.sampled_from(sorted(plan)))
    if key in ("own", "memberships") and draw(st.booleans()):
        hood = dict(GOOD_PLAN["own"])
        hood[draw(st.sampled_from(sorted(hood)))] = draw(JSONISH | st.integers(2**62, 2**70))
        plan[key] = hood if key == "own" else [hood]
    else:
        plan[key] = draw(JSONISH | st.integers(2**62, 2**70))
    return plan


def _run_plans(examples: int) -> None:
    @settings(max_examples=examples, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(plans())
    def prop(doc: object) -> None:
        try:
            AgentPlan.from_dict(doc)  # type: ignore[arg-type]
        except PROJECT_ERRORS:
            pass
        try:
            Neighbourhood.from_dict(doc)  # type: ignore[arg-type]
        except PROJECT_ERRORS:
            pass

    prop()


def test_corpus_parses_and_good_plan_round_trips() -> None:
    for key, parse in PARSERS.values():
        for blob in corpus()[key]:
            parse(blob)
    assert AgentPlan.from_dict(GOOD_PLAN).to_dict() == GOOD_PLAN


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_parser_raises_only_project_errors(name: str) -> None:
    _run(name, QUICK)


def test_plan_parser_raises_only_project_errors() -> None:
    _run_plans(QUICK)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(PARSERS))
def test_parser_raises_only_project_errors_10k(name: str) -> None:
    _run(name, FULL)


@pytest.mark.slow
def test_plan_parser_raises_only_project_errors_10k() -> None:
    _run_plans(FULL)

"""Property-based fuzzing of every parser of the institutional MPC: the query and control
messages, the dealer's request header, the query policy and the cell map. Every input either
parses or raises an MPCError subclass; nothing else escapes. Round-trips are exact.

Default profile: 100 examples per parser (``LPM_FUZZ_EXAMPLES`` overrides); the slow
profile (``pytest -m slow``) runs the same properties with 10,000 examples each."""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocols.mpc.dealer import HEADER_LEN, _decode_header, _out_size
from protocols.mpc.errors import MPCError
from protocols.mpc.party import parse_cells
from protocols.mpc.query import QueryPolicy
from protocols.mpc.wire import (
    _HEADER,
    MAGIC,
    VERSION,
    Query,
    decode_control,
    decode_query,
    encode_query,
)

EXAMPLES = int(os.environ.get("LPM_FUZZ_EXAMPLES", "100"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
SLOW = settings(max_examples=10_000, deadline=None, suppress_health_check=list(HealthCheck))

finite = st.floats(allow_nan=False, allow_infinity=False, width=64, min_value=-1e12, max_value=1e12)
any_float = st.floats(width=64)


@st.composite
def queries(draw) -> Query:
    c, t, p = draw(st.integers(1, 3)), draw(st.integers(1, 5)), draw(st.integers(1, 4))
    vals = draw(st.lists(finite, min_size=p + c * t + c * t * p, max_size=p + c * t + c * t * p))
    body = torch.tensor(vals, dtype=torch.float64)
    return Query(draw(st.integers(0, 2**32 - 1)), body[:p], body[p:p + c * t].reshape(c, t),
                 body[p + c * t:].reshape(c, t, p))


@st.composite
def near_queries(draw) -> bytes:
    """Valid queries, then mutated: truncated, extended, bytes flipped, header fields rewritten."""
    data = bytearray(encode_query(draw(queries())))
    kind = draw(st.sampled_from(["truncate", "extend", "flip", "header", "nan"]))
    if kind == "truncate":
        return bytes(data[: draw(st.integers(0, len(data) - 1))])
    if kind == "extend":
        return bytes(data + draw(st.binary(min_size=1, max_size=64)))
    if kind == "flip":
        i = draw(st.integers(0, len(data) - 1))
        data[i] ^= draw(st.integers(1, 255))
        return bytes(data)
    if kind == "header":
        fields = [MAGIC, VERSION, *(draw(st.integers(0, 2**32 - 1)) for _ in range(4))]
        return _HEADER.pack(*fields) + bytes(data[_HEADER.size:])
    at = draw(st.integers(0, (len(data) - _HEADER.size) // 8 - 1))
    struct.pack_into("<d", data, _HEADER.size + 8 * at, draw(st.sampled_from([float("nan"), float("inf")])))
    return bytes(data)


def _parse_or_project_error(fn, *args) -> object:
    try:
        return fn(*args)
    except MPCError:
        return None


def check_query_round_trips_exactly(q):
    back = decode_query(encode_query(q))
    assert back.round == q.round and back.shape == q.shape
    assert torch.equal(back.theta, q.theta) and torch.equal(back.y_hat, q.y_hat) and torch.equal(back.jac, q.jac)
    assert back.digest() == q.digest()


def check_query_parser(data):
    q = _parse_or_project_error(decode_query, data)
    if q is not None:
        assert encode_query(q) == data  # anything accepted is canonical


def check_control_parser(values, dtype):
    header = torch.tensor(values, dtype=torch.int64).to(dtype)
    _parse_or_project_error(decode_control, header)


def check_dealer_header_parser(values):
    parsed = _parse_or_project_error(_decode_header, torch.tensor(values, dtype=torch.int64))
    if parsed is not None:
        op, _, size0, size1 = parsed
        _parse_or_project_error(_out_size, op, size0, size1)


def check_policy_parser(text):
    _parse_or_project_error(QueryPolicy.from_json, text)


def check_cell_map_parser(text, k):
    cells = _parse_or_project_error(parse_cells, text, k)
    if cells is not None:
        assert len(cells) == k and sorted(set(cells)) == list(range(max(cells) + 1))


policy_fields = st.dictionaries(
    st.sampled_from(["max_rounds", "theta_low", "theta_high", "tolerance_ulps", "count_bound", "dp_epsilon",
                     "dp_delta", "other"]),
    st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), any_float, st.text(max_size=5),
              st.lists(st.integers(), max_size=2)))
int64 = st.integers(-(2**63), 2**63 - 1)

PROPERTIES = {
    "query_round_trip": (check_query_round_trips_exactly, (queries(),)),
    "query_parser": (check_query_parser, (st.one_of(near_queries(), st.binary(max_size=256)),)),
    "control_parser": (check_control_parser, (st.lists(int64, min_size=0, max_size=4),
                                              st.sampled_from([torch.int64, torch.int32, torch.float64]))),
    "dealer_header_parser": (check_dealer_header_parser,
                             (st.lists(int64, min_size=HEADER_LEN, max_size=HEADER_LEN)
                              | st.lists(st.integers(-3, 12), min_size=HEADER_LEN, max_size=HEADER_LEN),)),
    "policy_parser": (check_policy_parser, (st.one_of(policy_fields.map(json.dumps), st.text(max_size=40)),)),
    "cell_map_parser": (check_cell_map_parser, (st.text(max_size=20), st.integers(1, 6))),
}


@pytest.mark.parametrize("name", sorted(PROPERTIES))
def test_parser_property(name):
    check, strategies = PROPERTIES[name]
    FUZZ(given(*strategies)(check))()


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(PROPERTIES))
def test_parser_property_ten_thousand_examples(name):
    check, strategies = PROPERTIES[name]
    SLOW(given(*strategies)(check))()

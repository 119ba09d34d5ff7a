"""Attacks on SecAgg+ found by review (issue 13), each pinned as a test: a deviating
server, a deviating client and unsafe configurations.

Every test here failed on the code before the fix (the attack succeeded or a bare,
non-project exception escaped); see the commit that added it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from protocols.secagg import (
    ConfigError,
    InputError,
    InputSpec,
    ProtocolViolationError,
    RoundConfig,
    SecAggError,
    masks,
)
from protocols.secagg.local import make_round
from protocols.secagg.messages import SERVER, Advertise, Header, MsgType

# Encodings of the X25519 points of small order (and non-canonical twins): every shared
# secret with them is all zeros or fixed, i.e. known to everybody.
LOW_ORDER = [
    bytes(32),
    (1).to_bytes(32, "little"),
    bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),
    bytes.fromhex("5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157"),
    (2**255 - 19 - 1).to_bytes(32, "little"),
    (2**255 - 19).to_bytes(32, "little"),
    (2**255 - 19 + 1).to_bytes(32, "little"),
]


# -- range checks -------------------------------------------------------------------------
def test_int64_minimum_is_rejected_not_wrapped() -> None:
    spec = InputSpec("int", 4, 1000)
    with pytest.raises(InputError):
        spec.encode(torch.tensor([-(2**63), 0, 0, 0], dtype=torch.int64))
    with pytest.raises(InputError):
        spec.encode(np.array([-(2**63), 0, 0, 0], dtype=np.int64))


@pytest.mark.parametrize("dtype", [np.uint64, np.uint32])
def test_unsigned_values_beyond_the_bound_are_rejected_not_wrapped(dtype: type) -> None:
    spec = InputSpec("int", 2, 1000)
    big = np.iinfo(dtype).max
    with pytest.raises(InputError):
        spec.encode(np.array([big, 0], dtype=dtype))
    # in-range unsigned values are accepted exactly
    assert spec.encode(np.array([7, 1000], dtype=dtype)).tolist() == [7, 1000]


def test_uint64_torch_tensor_is_rejected_not_wrapped() -> None:
    spec = InputSpec("int", 2, 1000)
    with pytest.raises(InputError):
        spec.encode(torch.tensor([2**64 - 1, 0], dtype=torch.uint64))


@pytest.mark.parametrize(
    "bad",
    ["abcd", object(), None, [2**70, 0], [1, 2], torch.empty(2, device="meta", dtype=torch.int64),
     [True, False], np.array(["a", "b"]), np.array([object(), object()]), 3],
)
def test_bad_input_types_raise_input_error(bad: object) -> None:
    spec = InputSpec("int", 2, 1000)
    if isinstance(bad, list) and bad == [1, 2]:
        assert spec.encode(bad).tolist() == [1, 2]  # a plain list of small ints is fine
        return
    with pytest.raises(InputError):
        spec.encode(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", ["x", None, object(), [2**70, 0],
                                 torch.empty(2, device="meta")])
def test_bad_float_input_types_raise_input_error(bad: object) -> None:
    spec = InputSpec("float", 2, 1.0)
    with pytest.raises(InputError):
        spec.encode(bad)  # type: ignore[arg-type]


# -- key validation at the server -----------------------------------------------------------
@pytest.mark.parametrize("which", ["c_pk", "s_pk"])
@pytest.mark.parametrize("point", range(len(LOW_ORDER)))
def test_low_order_public_keys_are_rejected_at_the_server(which: str, point: int) -> None:
    setup = make_round(6, InputSpec("int", 2, 10), degree=4, threshold=3)
    server, clients = setup.server(), setup.clients()
    ok = clients[1].advertise_keys()
    adv = Advertise.decode(ok, 6)
    keys = {"c_pk": adv.c_pk, "s_pk": adv.s_pk, which: LOW_ORDER[point]}
    cfg = setup.config
    sig = setup.identities[1].sign(
        masks.signed_key_statement(cfg, 1, keys["c_pk"], keys["s_pk"])
    )
    bad = Advertise(Header(MsgType.ADVERTISE, cfg.run_id, cfg.round, 1, SERVER),
                    keys["c_pk"], keys["s_pk"], sig).encode()
    with pytest.raises(ProtocolViolationError, match="low-order|invalid"):
        server.receive(1, bad)
    server.receive(1, ok)  # the honest advertisement is still accepted


# -- configuration validator ----------------------------------------------------------------
def _cfg(**kw: object) -> RoundConfig:
    base: dict[str, object] = dict(
        run_id="run", round=0, client_ids=tuple(f"c{i}" for i in range(20)),
        spec=InputSpec("int", 2, 10), graph_seed=bytes(32), server_pk=bytes(range(32)),
        degree=6,
    )
    base.update(kw)
    return RoundConfig(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kw",
    [
        {"threshold": 1},  # one curious neighbour rebuilds a secret from one share
        {"threshold": 2},  # t <= k/2
        {"threshold": 3},  # t == k/2
        {"min_survivors": 1},  # the "sum" of one input is that input
        {"min_survivors": 2, "threshold": 4},  # below the documented floor
        {"degree": 2},  # too few neighbours for any safe threshold
        {"round": True},
        {"round": -1},
        {"round": 2**63},
        {"round": 1.0},
        {"run_id": "r" * 256},
        {"run_id": "é" * 128},
        {"run_id": 5},
        {"client_ids": ("a", "a")},
        {"client_ids": ("a",)},
        {"client_ids": ("a", 3)},
        {"graph_seed": b"short"},
        {"server_pk": "not bytes"},
        {"degree": True},
        {"threshold": 4.0},
        {"spec": "int"},
    ],
)
def test_config_validator_refuses_unsafe_or_malformed_settings(kw: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        _cfg(**kw)


def test_config_validator_accepts_the_documented_defaults() -> None:
    cfg = _cfg()
    assert cfg.threshold == 4 and cfg.threshold * 2 > cfg.degree
    assert cfg.min_survivors >= cfg.threshold + 1
    assert isinstance(ConfigError("x"), SecAggError)
    for n in (3, 5, 8, 50, 200, 1000):
        c = _cfg(client_ids=tuple(str(i) for i in range(n)), degree=0)
        assert 2 * c.threshold > c.degree


def test_input_spec_validation_raises_config_error() -> None:
    for args in [("int", 0, 10), ("bool", 2, 1.0), ("int", 2, float("nan")), ("int", True, 10),
                 ("float", 2, 1.0, 80), ("int", 2, 1.5), ("int", 2**40, 1)]:
        with pytest.raises(ConfigError):
            InputSpec(*args)  # type: ignore[arg-type]

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
)
from protocols.secagg.epoch_keys import EpochContexts
from protocols.secagg.epoch_messages import EHeader, EMsg, EpochAdvertise
from protocols.secagg.local import make_round
from protocols.secagg.messages import SERVER

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
    server, clients = setup.epoch_server(), setup.epoch_clients()
    ok = clients[1].advertise_keys()
    adv = EpochAdvertise.decode(ok, 6)
    keys = {"c_pk": adv.c_pk, "s_pk": adv.s_pk, which: LOW_ORDER[point]}
    cfg = setup.config
    sig = setup.identities[1].sign(
        EpochContexts(cfg).advertise_statement(1, keys["c_pk"], keys["s_pk"]))
    bad = EpochAdvertise(EHeader(EMsg.ADVERTISE, cfg.run_id, cfg.round, 0, 1, SERVER),
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


# -- a server that equivocates about the survivor set (multi-round protocol) ----------------
def _day_after_inputs(n: int, k: int, t: int, seed: int = 0):  # type: ignore[no-untyped-def]
    """Setup plus honest day-0 inputs; returns the parties right before the survivor set."""
    setup = make_round(n, InputSpec("int", 8, 1000), degree=k, threshold=t)
    server, clients = setup.agreed()
    server.open_day(0)
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randint(-1000, 1001, (8,), generator=g) for _ in range(n)]
    for i, c in enumerate(clients):
        server.receive(i, c.masked_input(0, xs[i]))
    return setup, server, clients, xs


class EquivocatingServer:
    """A deviating coordinator: shows each client the survivor set of its choosing, forwards
    every signature it holds that could convince a client, and collects whatever is revealed.
    It uses the honest server object only as its own memory (MAC keys, inputs, envelopes)."""

    def __init__(self, setup, server, clients) -> None:  # type: ignore[no-untyped-def]
        self.setup, self.server, self.clients = setup, server, clients
        self.cfg = setup.config
        self.nbrs = server._nbrs
        self.refused: dict[int, str] = {}
        self.shares: dict[int, dict[int, bytes]] = {}
        self.day_keys: dict[frozenset[int], bytes] = {}
        self.revealed: dict[int, dict[int, set[str]]] = {}  # client -> {neighbour: kinds}

    def _mac(self, i: int, msg: bytes) -> bytes:
        from protocols.secagg.messages import add_mac
        return add_mac(self.server._macs[i], msg)

    def run(self, views: dict[int, frozenset[int]]) -> None:
        from protocols.secagg.epoch_messages import (
            DayUnmaskRequest,
            DayUnmaskResponse,
            EHeader,
            EMsg,
            RevealKind,
            SurvivorSet,
            SurvivorTags,
            encode_bitmap,
        )
        from protocols.secagg.messages import strip_mac

        cfg, n = self.cfg, self.cfg.n

        def hdr(t: EMsg, i: int) -> EHeader:
            return EHeader(t, cfg.run_id, cfg.round, 0, SERVER, i)

        sigs: dict[int, tuple[bytes, dict[int, bytes]]] = {}  # signer -> (bitmap, tags)
        for i, view in views.items():
            bm = encode_bitmap(view, n)
            try:
                blob = self.clients[i].sign_survivors(
                    self._mac(i, SurvivorSet(hdr(EMsg.SURVIVORS, i), bm).encode()))
            except SecAggError as exc:
                self.refused[i] = type(exc).__name__
                continue
            msg = SurvivorTags.decode(strip_mac(self.server._macs[i], blob, 10**6), n,
                                      cfg.degree)
            sigs[i] = (bm, dict(msg.tags))
            for j, key in msg.day_keys:  # revealed with the tags, before any unmask check
                self.day_keys[frozenset((i, j))] = key
                self.revealed.setdefault(i, {}).setdefault(j, set()).add("day key")
        for i in sigs:
            bm = sigs[i][0]
            good = tuple((j, sigs[j][1][i]) for j in sorted(self.nbrs[i])
                         if j in sigs and sigs[j][0] == bm and i in sigs[j][1])
            envs = tuple((j, dict(self.server._inputs[j].envelopes)[i])
                         for j in sorted(self.nbrs[i] & views[i]))
            req = DayUnmaskRequest(hdr(EMsg.UNMASK_REQUEST, i), good, envs)
            try:
                blob = self.clients[i].unmask(self._mac(i, req.encode()))
            except SecAggError as exc:
                self.refused[i] = type(exc).__name__
                continue
            resp = DayUnmaskResponse.decode(strip_mac(self.server._macs[i], blob, 10**6), n,
                                            cfg.degree)
            for j, kind, data in resp.reveals:
                assert kind is RevealKind.SELF_MASK_SHARE
                self.shares.setdefault(j, {})[i + 1] = data
                self.revealed.setdefault(i, {}).setdefault(j, set()).add("share")

    def strip(self, members: frozenset[int]) -> torch.Tensor | None:
        """Σ_{i∈members} y_i with every mask removed, or None if something is missing."""
        from protocols.keys import ring_keystream
        from protocols.secagg.shamir import reconstruct_secret

        ctx, t = self.server._ctx, self.cfg.threshold
        total = torch.zeros(8, dtype=torch.int64)
        buf = torch.empty(8, dtype=torch.int64)
        for i in members:
            total.add_(self.server._inputs[i].vector)
            if len(self.shares.get(i, {})) < t:
                return None
            seed = reconstruct_secret(self.shares[i], t)
            ring_keystream(ctx.self_mask_key(seed, i, 0), 8, out=buf)
            total.sub_(buf)
            for j in self.nbrs[i] - members:
                key = self.day_keys.get(frozenset((i, j)))
                if key is None:
                    return None
                ring_keystream(key, 8, out=buf)
                total.sub_(buf) if i < j else total.add_(buf)
        return total


N_ATT, K_ATT, T_ATT, TARGET = 20, 6, 4, 0


def test_attack_harness_recovers_the_honest_sum() -> None:
    """Positive control: with one consistent set the same harness strips every mask."""
    setup, server, clients, xs = _day_after_inputs(N_ATT, K_ATT, T_ATT)
    everyone = frozenset(range(N_ATT))
    att = EquivocatingServer(setup, server, clients)
    att.run({i: everyone for i in range(N_ATT)})
    assert not att.refused
    total = att.strip(everyone)
    assert total is not None and torch.equal(total, torch.stack(xs).sum(0))
    assert att.strip(frozenset({TARGET})) is None  # a single input stays masked


def test_equivocated_survivor_sets_do_not_reveal_a_chosen_input() -> None:
    """The review's attack (n=20, k=6, t=4): every client is told that it and the target
    survived and that the target's other neighbours dropped. Each honest neighbour of the
    target then holds a different set, cannot collect t signatures on it, and reveals
    nothing; the target's input stays masked."""
    setup, server, clients, xs = _day_after_inputs(N_ATT, K_ATT, T_ATT)
    nbrs = server._nbrs[TARGET]
    everyone = frozenset(range(N_ATT))
    views = {m: (everyone - nbrs) | {m, TARGET} for m in range(N_ATT)}
    att = EquivocatingServer(setup, server, clients)
    att.run(views)
    assert att.strip(frozenset({TARGET})) is None
    assert nbrs <= set(att.refused)  # each honest neighbour refused to unmask
    assert set(att.refused.values()) <= {"ProtocolViolationError", "SecAggAbortError"}


@pytest.mark.parametrize("seed", range(12))
def test_two_view_splits_never_isolate_one_input(seed: int) -> None:
    """Split views: a random part of the clients sees everyone survive, the rest sees a
    random group of the target's neighbours dropped (the dropped ones always see themselves
    in). Many clients reveal, yet the server strips the masks of no single input."""
    setup, server, clients, xs = _day_after_inputs(N_ATT, K_ATT, T_ATT, seed)
    g = np.random.default_rng(seed)  # the adversary's choices only, not protocol randomness
    everyone = frozenset(range(N_ATT))
    nbrs = sorted(server._nbrs[TARGET])
    cut = frozenset(int(j) for j in g.choice(nbrs, size=int(g.integers(1, 4)), replace=False))
    views = {m: everyone if (m in cut or g.random() < 0.5) else everyone - cut
             for m in range(N_ATT)}
    att = EquivocatingServer(setup, server, clients)
    att.run(views)
    revealed = sum(len(v) for v in att.shares.values()) + len(att.day_keys)
    assert revealed > 0 or len(att.refused) == N_ATT
    for i in range(N_ATT):
        assert att.strip(frozenset({i})) is None, f"input of {i} isolated"
    for size in (2, 3):  # nor any small group
        for start in range(N_ATT):
            group = frozenset((start + d) % N_ATT for d in range(size))
            assert att.strip(group) is None


def test_claiming_a_live_client_dropped_yields_its_day_keys_but_never_its_self_mask() -> None:
    """Day keys with a neighbour outside S are revealed with the tags (before any tag is
    checked). The coordinator tells every neighbour of the target that the target dropped
    (it did send its input) and everyone else that all survived: it collects all the
    target's day keys, but no neighbour holds a set with the target in it, so no share of
    the target's self mask is revealed and its input stays masked, alone or in small groups."""
    setup, server, clients, xs = _day_after_inputs(N_ATT, K_ATT, T_ATT)
    nbrs = server._nbrs[TARGET]
    everyone = frozenset(range(N_ATT))
    views = {m: everyone - {TARGET} if m in nbrs else everyone for m in range(N_ATT)}
    att = EquivocatingServer(setup, server, clients)
    att.run(views)
    assert {frozenset((TARGET, j)) for j in nbrs} <= set(att.day_keys)  # all of them
    assert len(att.shares.get(TARGET, {})) < T_ATT
    assert att.strip(frozenset({TARGET})) is None
    for j in nbrs:
        assert att.strip(frozenset({TARGET, j})) is None


def _views(kind: str, seed: int, nbrs: frozenset[int]) -> dict[int, frozenset[int]]:
    everyone = frozenset(range(N_ATT))
    g = np.random.default_rng(seed)  # the adversary's choices only
    if kind == "claim-dropped":
        return {m: everyone - {TARGET} if m in nbrs else everyone for m in range(N_ATT)}
    if kind == "equivocate":
        return {m: (everyone - nbrs) | {m, TARGET} for m in range(N_ATT)}
    # two random views, each missing 1-4 random clients (a client always sees itself)
    cuts = [frozenset(int(j) for j in g.choice(N_ATT, size=int(g.integers(1, 5)),
                                               replace=False)) for _ in range(2)]
    return {m: (everyone - cuts[int(g.integers(2))]) | {m} for m in range(N_ATT)}


@pytest.mark.parametrize(("kind", "seed"), [("claim-dropped", 0), ("equivocate", 0)]
                         + [("random", s) for s in range(6)])
def test_no_client_reveals_both_a_day_key_and_a_self_mask_share_of_one_neighbour(
        kind: str, seed: int) -> None:
    """The invariant behind "a coordinator that claims a device dropped learns nothing of its
    input": whatever survivor sets a deviating coordinator shows, an honest client reveals
    for a neighbour on a day either the day key (with its tags) or the share of its self mask
    (at unmask), never both; so no input ever has all k day keys and t shares revealed."""
    setup, server, clients, xs = _day_after_inputs(N_ATT, K_ATT, T_ATT, seed)
    att = EquivocatingServer(setup, server, clients)
    att.run(_views(kind, seed, server._nbrs[TARGET]))
    kinds = {k for per in att.revealed.values() for ks in per.values() for k in ks}
    assert "day key" in kinds  # the attack got clients to reveal something
    if kind != "random":  # (random splits on a random graph may get no share at all)
        assert kinds == {"day key", "share"}
    for i, per in att.revealed.items():
        for j, kinds in per.items():
            assert len(kinds) == 1, f"client {i} revealed {kinds} for neighbour {j}"
    for i in range(N_ATT):
        assert att.strip(frozenset({i})) is None, f"input of {i} isolated"

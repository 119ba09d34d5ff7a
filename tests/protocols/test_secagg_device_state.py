"""A SecAgg+ device's per-message state is O(k) (k = its neighbours), and keeping less does
not let the coordinator choose its neighbours: the neighbour set always comes from the
config's graph seed (cached per process by the exact (seed, n)), the registry kept is only
the device's own key and its neighbours', the persisted state holds its live neighbours in
the day's survivor set (not the whole set), and a restored state must agree with the config
and with itself. The batched derivations a device's day uses equal the single ones."""

from __future__ import annotations

import json
import os

import pytest
import torch

from protocols.keys import IdentityKey, InvalidKeyError, ring_keystream
from protocols.secagg import (
    BadSignatureError,
    ConfigError,
    InputSpec,
    MalformedMessageError,
    ProtocolViolationError,
)
from protocols.secagg.epoch_client import EpochClient, EpochStage
from protocols.secagg.epoch_keys import EpochContexts
from protocols.secagg.epoch_messages import (
    SERVER,
    EHeader,
    EMsg,
    EpochAdvertise,
    EpochRoster,
    RosterEntry,
)
from protocols.secagg.graph import _placement, neighbour_graph, neighbours_of
from protocols.secagg.keystream import BATCH_MAX_BLOCKS, BATCH_MIN_KEYS, ring_keystreams
from protocols.secagg.local import RoundSetup, make_round
from protocols.secagg.messages import add_mac

N, K, T, L = 16, 4, 3, 4


def _adverts(setup: RoundSetup, clients: list[EpochClient]) -> dict[int, EpochAdvertise]:
    return {i: EpochAdvertise.decode(c.advertise_keys(), setup.config.n)
            for i, c in enumerate(clients)}


def _roster(setup: RoundSetup, ads: dict[int, EpochAdvertise], to: int,
            names: list[int]) -> bytes:
    """A roster for client ``to`` naming ``names``, MAC'd as the coordinator does (the
    coordinator holds the server key: it can send any roster it likes)."""
    cfg = setup.config
    mac = EpochContexts(cfg).server_mac_key(setup.server_key, to, ads[to].c_pk)
    entries = tuple(RosterEntry(j, ads[j].c_pk, ads[j].s_pk, ads[j].signature)
                    for j in sorted(names))
    head = EHeader(EMsg.ROSTER, cfg.run_id, cfg.round, 0, SERVER, to)
    return add_mac(mac, EpochRoster(head, entries).encode())


def _outsider(setup: RoundSetup, i: int) -> int:
    nb = neighbours_of(setup.config.graph_seed, setup.config.n, setup.config.degree, i)
    return next(j for j in range(setup.config.n) if j != i and j not in nb)


def _clients(setup: RoundSetup, registry: dict[int, bytes] | None = None) -> list[EpochClient]:
    reg = setup.registry
    return [EpochClient(setup.config, i, k, registry if registry is not None and i == 0 else reg)
            for i, k in enumerate(setup.identities)]


def test_forged_roster_control_is_accepted() -> None:
    """Positive control for the attacks below: the test's roster forging is the server's."""
    setup = make_round(N, InputSpec("int", L, 100), degree=K, threshold=T)
    clients = _clients(setup)
    ads = _adverts(setup, clients)
    clients[0].accept_roster(_roster(setup, ads, 0, sorted(clients[0].neighbours)))
    assert clients[0].stage is EpochStage.READY


@pytest.mark.parametrize("extra_key", [True, False])
def test_coordinator_cannot_add_a_non_neighbour(extra_key: bool) -> None:
    """The coordinator sends the colluder's identity key with the registry (or not) and names
    it in the roster with its genuine signed advertisement: refused, it is no neighbour."""
    setup = make_round(N, InputSpec("int", L, 100), degree=K, threshold=T)
    c = _outsider(setup, 0)
    nb = neighbours_of(setup.config.graph_seed, N, K, 0)
    reg = {0: setup.registry[0], **{j: setup.registry[j] for j in nb}}
    if extra_key:
        reg[c] = setup.registry[c]
    clients = _clients(setup, reg)
    assert set(clients[0].registry) == {0, *nb}  # the colluder's key is not even kept
    ads = _adverts(setup, clients)
    for names in ([*nb[:-1], c], [*nb[:T], c], [c]):
        with pytest.raises(ProtocolViolationError, match="not a neighbour"):
            clients[0].accept_roster(_roster(setup, ads, 0, names))
        assert clients[0].stage is EpochStage.ROSTER  # unchanged: the honest roster still works
    clients[0].accept_roster(_roster(setup, ads, 0, list(nb)))


def test_coordinator_cannot_substitute_another_neighbourhood() -> None:
    """The registry the coordinator sends is another device's neighbourhood, and the roster
    too: the device's neighbours come from the graph seed, so the roster is refused."""
    setup = make_round(N, InputSpec("int", L, 100), degree=K, threshold=T)
    nb0 = set(neighbours_of(setup.config.graph_seed, N, K, 0))
    other = next(i for i in range(1, N) if 0 not in
                 neighbours_of(setup.config.graph_seed, N, K, i)
                 and set(neighbours_of(setup.config.graph_seed, N, K, i)) - nb0)
    theirs = [j for j in neighbours_of(setup.config.graph_seed, N, K, other) if j != 0]
    reg = {0: setup.registry[0], **{j: setup.registry[j] for j in theirs}}
    clients = _clients(setup, reg)
    assert clients[0].neighbours == nb0
    ads = _adverts(setup, clients)
    with pytest.raises(ProtocolViolationError, match="not a neighbour"):
        clients[0].accept_roster(_roster(setup, ads, 0, theirs))
    # its true neighbours cannot be verified without their keys: refused, not trusted
    with pytest.raises(BadSignatureError, match="no identity key"):
        clients[0].accept_roster(_roster(setup, ads, 0, sorted(nb0)))
    assert clients[0].stage is EpochStage.ROSTER


def test_registry_mapping_keeps_own_and_neighbours_only() -> None:
    setup = make_round(N, InputSpec("int", L, 100), degree=K, threshold=T)
    full = dict(enumerate(setup.registry))
    c = EpochClient(setup.config, 3, setup.identities[3], full)
    assert set(c.registry) == {3, *c.neighbours}
    assert c.registry == {j: setup.registry[j] for j in c.registry}
    with pytest.raises(ConfigError, match="own key"):
        EpochClient(setup.config, 3, setup.identities[3],
                    {j: k for j, k in full.items() if j != 3})
    with pytest.raises(ConfigError, match="does not match"):
        EpochClient(setup.config, 3, setup.identities[4], full)
    with pytest.raises(ConfigError, match="one key per roster client"):
        EpochClient(setup.config, 3, setup.identities[3], setup.registry[:-1])


def test_graph_cache_is_keyed_by_seed_and_size() -> None:
    """Interleaved configs in one process (a device host serving two epochs, or a
    coordinator sending a second config with the same run and epoch): each gets the
    neighbours of its own graph seed and size, as computed without any cache."""
    seeds = [os.urandom(32) for _ in range(3)]
    fresh = {}
    for s in seeds:
        for n in (30, 31):
            _placement.cache_clear()
            fresh[s, n] = neighbour_graph(s, n, 6)
    for _ in range(2):
        for s in seeds:
            for n in (30, 31):
                assert [neighbours_of(s, n, 6, i) for i in range(n)] == fresh[s, n]
                assert neighbour_graph(s, n, 6) == fresh[s, n]
    order, pos = _placement(seeds[0], 30)
    with pytest.raises(ValueError):
        order[0] = 1  # shared arrays are read-only
    assert sorted(order.tolist()) == list(range(30))
    assert all(order[pos[i]] == i for i in range(30))


def _day_state(n: int) -> tuple[bytes, EpochClient, RoundSetup]:
    """Client 0's exported state after it tagged a day's survivor set (all survive)."""
    setup = make_round(n, InputSpec("int", L, 100), degree=8, threshold=5)
    server, clients = setup.agreed()
    server.open_day(0)
    x = torch.zeros(L, dtype=torch.int64)
    for i, c in enumerate(clients):
        server.receive(i, c.masked_input(0, x))
    out = server.advance()
    clients[0].sign_survivors(out[0])
    return clients[0].export_state(), clients[0], setup


def test_exported_state_does_not_grow_with_the_roster() -> None:
    """Only the day's survivor bitmap (n bits) grows with n; the old state listed every
    survivor (O(n) integers parsed on every message)."""
    small, _, _ = _day_state(20)
    big, c, setup = _day_state(200)
    bitmap_growth = 2 * (-(-200 // 8) - -(-20 // 8))  # hex
    index_digits = 2 * 8  # the peers' indices in live_in have more digits at n = 200
    assert len(big) - len(small) <= bitmap_growth + index_digits
    d = json.loads(big)
    assert set(d["live_in"]) <= c.neighbours
    back = EpochClient.restore(setup.config, 0, None, setup.registry, big)
    assert back.export_state() == big


def test_restore_checks_state_against_config_and_itself() -> None:
    blob, c, setup = _day_state(20)
    d = json.loads(blob)
    other = _outsider(setup, 0)
    bad_live = {**d, "live_in": [*d["live_in"][:-1]]}  # a live neighbour in S left out
    no_set = {**d, "bitmap": ""}
    short_map = {**d, "bitmap": d["bitmap"][:-2]}
    peer_out = {**d, "peers": (bytes.fromhex(d["peers"])[:-100]
                               + other.to_bytes(4, "big") + bytes(96)).hex()}
    unsorted = {**d, "peers": (bytes.fromhex(d["peers"])[100:200]
                               + bytes.fromhex(d["peers"])[:100]).hex()}
    for bad in (bad_live, no_set, short_map, peer_out, unsorted, {**d, "v": 5},
                {**d, "peers": d["peers"][:-2]}):
        with pytest.raises(MalformedMessageError):
            EpochClient.restore(setup.config, 0, None, setup.registry, json.dumps(bad).encode())
    # a client that has not advertised yet needs its identity to be restored
    fresh = EpochClient(setup.config, 1, setup.identities[1], setup.registry)
    with pytest.raises(ConfigError, match="identity"):
        EpochClient.restore(setup.config, 1, None, setup.registry, fresh.export_state())
    with pytest.raises(ConfigError, match="does not match"):
        EpochClient.restore(setup.config, 0, IdentityKey.generate(), setup.registry, blob)


def test_version_3_state_still_restores() -> None:
    """A state written before this change (one hex string per key, the whole survivor set)
    restores to the same client."""
    blob, c, setup = _day_state(20)
    d = json.loads(blob)
    v3 = {**{k: d[k] for k in ("stage", "last_day", "day", "c", "s", "mac", "bitmap")},
          "v": 3, "peers": list(c._peers),
          "channel": {str(j): k.hex() for j, k in c._channel.items()},
          "roots": {str(j): k.hex() for j, k in c._roots.items()},
          "cons": {str(j): k.hex() for j, k in c._cons.items()},
          "survivors": list(range(20))}
    back = EpochClient.restore(setup.config, 0, setup.identities[0], setup.registry,
                               json.dumps(v3).encode())
    assert back.export_state() == blob


@pytest.mark.parametrize("keys", [1, 17, BATCH_MIN_KEYS - 1, BATCH_MIN_KEYS])
@pytest.mark.parametrize("n", [1, 8, 8 * BATCH_MAX_BLOCKS, 8 * BATCH_MAX_BLOCKS + 1])
def test_keystreams_both_paths_equal_ring_keystream(keys: int, n: int) -> None:
    """A device's masks (1 + k keys, OpenSSL per key) and a coordinator's (many keys of
    short vectors, NumPy rounds) are the one ChaCha20 keystream of ring_keystream."""
    ks = [os.urandom(32) for _ in range(keys)]
    ref = torch.stack([ring_keystream(k, n) for k in ks]).numpy()
    got = ring_keystreams(ks, n)
    assert got.flags.writeable and (got == ref).all()


def test_batched_day_pair_keys_equal_single() -> None:
    setup = make_round(N, InputSpec("int", L, 100), degree=K, threshold=T)
    ctx = EpochContexts(setup.config)
    roots = [os.urandom(32) for _ in range(5)]
    peers = [0, 3, 7, 8, 15]
    for me in (0, 1, 7, 15):  # below, between and above its peers (and equal: no order)
        want = [ctx.day_pair_key(r, 9, me, j) for r, j in zip(roots, peers, strict=True)]
        assert ctx.day_pair_keys(roots, 9, me, peers) == want
    assert ctx.day_pair_keys(roots, 9, 1, peers) != ctx.day_pair_keys(roots, 10, 1, peers)
    with pytest.raises(InvalidKeyError):
        ctx.day_pair_keys([*roots[:4], b"short"], 9, 1, peers)
    with pytest.raises(ValueError, match="one root per peer"):
        ctx.day_pair_keys(roots[:4], 9, 1, peers)

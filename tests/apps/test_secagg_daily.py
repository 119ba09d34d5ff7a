"""Multi-round SecAgg+ in the daily loop, through the adapters the apps use
(coordinator.flower.secagg.ReportRound on the coordinator, edge_agent.secagg_flower.SecAggDevice
on each device, a fresh device object per message as with a ClientApp process per message):
keys agreed once per epoch, kept while devices go offline and return, re-keyed for a new
device, the epoch state kept in the
device's encrypted store, a day masked once, and a coordinator that shows devices different
survivor sets in the daily loop caught before it learns an input."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ConfigRecord

from coordinator.flower.secagg import ReportRound
from edge_agent.secagg_flower import SecAggDevice, SecAggDeviceError, StoreVault
from protocols.daily import REPORT_FIELDS
from protocols.keys import IdentityKey
from protocols.secagg import SecAggError

L = len(REPORT_FIELDS)


class Fleet:
    """N devices with node-state records (or stores) and a coordinator epoch, in-process."""

    def __init__(self, n: int, stores: dict[str, object] | None = None) -> None:
        self.names = [f"a{i}" for i in range(n)]
        self.ids = {m: IdentityKey.generate() for m in self.names}
        self.st = {m: ConfigRecord() for m in self.names}
        self.stores = stores or {}
        self.epoch = None
        self.advertised = 0

    def device(self, name: str) -> SecAggDevice:  # a fresh object per message
        vault = StoreVault(self.stores[name], "run") if name in self.stores else None
        return SecAggDevice(self.st[name], self.ids[name].private_bytes(), vault)

    def report(self, name: str, day: int) -> list[float]:
        i = self.names.index(name)
        return [float((i + 1) * (k + 1) % 5) / 4 + day for k in range(L)]

    def day(self, day: int, roster: list[str], silent: dict[str, set[str]] | None = None,
            tamper=None) -> ReportRound:  # type: ignore[no-untyped-def]
        silent = silent or {}
        rr = ReportRound("run", day, roster, [self.ids[m].public_bytes() for m in roster],
                         min_survivors=3, epoch=self.epoch)
        self.epoch = rr.epoch
        gone = set(silent.get("day", set()))
        for m in roster:
            if m in gone:
                continue
            dev = self.device(m)
            if rr.new_epoch:
                idx = rr.registry_for(m)
                blob = dev.advertise(rr.config.to_bytes(),
                                     [self.ids[rr.roster[j]].public_bytes() for j in idx], m,
                                     run_id="run", day=day, report=self.report(m, day),
                                     registry_index=idx)
                self.advertised += 1
            else:
                blob = dev.masked_input(day, self.report(m, day), run_id="run",
                                        epoch=rr.config.round)
            rr.receive(m, blob)
        self.log: dict[str, dict[str, bytes]] = {}  # stage -> device -> its reply
        self.refused: dict[str, str] = {}

        def send(stage: str, out: dict[str, bytes], key: str | None = None) -> None:
            for m, b in out.items():
                if m not in gone:
                    try:
                        reply = self.device(m).stage(stage, day, b)
                    except (SecAggError, SecAggDeviceError) as exc:
                        self.refused[m] = type(exc).__name__
                        continue
                    self.log.setdefault(key or stage, {})[m] = reply
                    rr.receive(m, reply)

        if tamper is not None:  # the coordinator's own choice of every message
            for stage in rr.stages:
                gone |= silent.get(stage, set())
                send(stage, tamper(stage, rr, self.log))
            return rr
        while True:  # as coordinator.flower.server_app drives it
            out = rr.advance()
            if rr.stage is None:
                return rr
            gone |= silent.get(rr.stage, set()) | silent.get(rr.exchange_tag, set())
            send(rr.stage, out, rr.exchange_tag)

    def expected(self, members: list[str], day: int) -> torch.Tensor:
        return torch.tensor([sum(self.report(m, day)[k] for m in members) for k in range(L)],
                            dtype=torch.float64)


def _close(got: torch.Tensor, want: torch.Tensor, n: int) -> None:
    assert float((got.double() - want).abs().max()) <= n * 2.0**-16


def test_keys_agreed_once_per_epoch_kept_over_absences_and_rekeyed_for_newcomers() -> None:
    f = Fleet(12)
    everyone = list(f.names)
    r0 = f.day(0, everyone)
    assert r0.new_epoch and f.advertised == 12 and r0.stages[0] == "masked_input"
    _close(r0.total(), f.expected(everyone, 0), 12)
    r1 = f.day(1, everyone, silent={"consistency": {"a4"}})  # same roster: same epoch
    assert not r1.new_epoch and f.advertised == 12 and r1.config.round == 0
    assert r1.stages == ("consistency", "unmask") and "a4" in r1.survivors()
    _close(r1.total(), f.expected(everyone, 1), 12)
    r2 = f.day(2, everyone, silent={"day": {"a7"}})  # a7 offline: out of day 2, same epoch
    assert not r2.new_epoch and r2.survivors() == [m for m in everyone if m != "a7"]
    _close(r2.total(), f.expected(r2.survivors(), 2), 12)
    roster = [m for m in everyone if m != "a7"]  # a7 offline, out of the day's roster:
    r3 = f.day(3, roster)  # a dropout before input, same epoch (no re-key)
    assert not r3.new_epoch and r3.config.round == 0 and f.advertised == 12
    _close(r3.total(), f.expected(roster, 3), 11)
    r4 = f.day(4, everyone)  # a7 returns and rejoins the epoch
    assert not r4.new_epoch and r4.config.round == 0 and "a7" in r4.survivors()
    _close(r4.total(), f.expected(everyone, 4), 12)
    newcomer = Fleet(13)  # a device the epoch does not know: re-key
    r5 = newcomer.day(0, newcomer.names[:12])
    assert newcomer.day(1, newcomer.names).new_epoch and r5.new_epoch


def _neighbour_pair(f: Fleet, a: str, k: int = 0) -> str:
    srv = f.epoch.server  # type: ignore[union-attr]
    return f.epoch.roster[sorted(srv.neighbours(f.epoch.index[a]))[k]]  # type: ignore[union-attr]


def test_a_device_dropping_after_masking_next_to_an_offline_one_is_left_out_exactly() -> None:
    """The fleet's day-1 abort (1000 devices, 5 % offline: "client N sent no tags"): one
    device is offline for the day and a neighbour of it masks and drops before tagging.
    Nobody else holds their pairwise day key, so that input cannot be in the sum: the
    coordinator re-issues the survivor set without it (one more consistency round, no new
    masking, nothing revealed before) and the day completes in the first attempt over the
    others, exactly. Before: the attempt aborted and the day was masked again."""
    f = Fleet(16)
    everyone = list(f.names)
    f.day(0, everyone)
    a = "a3"
    b = _neighbour_pair(f, a)
    r = f.day(1, everyone, silent={"day": {a}, "consistency": {b}})
    assert r.attempt == 0 and not r.aborts and r.left_out == [[b]]
    assert not r.new_epoch and f.advertised == 16
    want = [m for m in everyone if m not in (a, b)]
    assert r.survivors() == want
    _close(r.total(), f.expected(want, 1), 16)
    assert set(f.log["consistency-reissued"]) == set(want)
    r2 = f.day(2, everyone)  # both rejoin the epoch the next day
    assert not r2.new_epoch and r2.survivors() == everyone and not r2.left_out
    _close(r2.total(), f.expected(everyone, 2), 16)


def test_a_day_whose_reissued_set_fails_too_is_attempted_again_in_the_epoch() -> None:
    """As above, and a device that tagged the first set drops before tagging the re-issued
    one while a neighbour of it is outside: the attempt aborts before anything is revealed
    and the day runs again in the same epoch under fresh day keys, exactly."""
    f = Fleet(16)
    everyone = list(f.names)
    f.day(0, everyone)
    a = "a3"
    b = _neighbour_pair(f, a)
    c = next(m for m in (_neighbour_pair(f, a, k) for k in range(1, 8)) if m != b)
    r = f.day(1, everyone, silent={"day": {a}, "consistency": {b},
                                   "consistency-reissued": {c}})
    assert r.attempt == 1 and len(r.aborts) == 1 and "cannot reveal" in r.aborts[0]
    assert not r.new_epoch and f.advertised == 16
    want = [m for m in everyone if m not in (a, b, c)]
    assert r.survivors() == want
    _close(r.total(), f.expected(want, 1), 16)


def _reveals(rr: ReportRound, log: dict[str, dict[str, bytes]]
             ) -> tuple[set[tuple[int, int]], set[tuple[int, int]]]:
    """(holder, owner) pairs of every day key and every self-mask share revealed."""
    from protocols.secagg.epoch_messages import DayUnmaskResponse, SurvivorTags
    from protocols.secagg.messages import strip_mac

    cfg, srv = rr.config, rr.server
    keys, shares = set(), set()
    for stage, replies in log.items():
        for m, blob in replies.items():
            i = rr.epoch.index[m]
            body = strip_mac(srv._macs[i], blob, 10**6)
            if stage.startswith("consistency"):
                keys |= {(i, j) for j, _ in SurvivorTags.decode(body, cfg.n,
                                                                cfg.degree).day_keys}
            elif stage.startswith("unmask"):
                shares |= {(i, j) for j, _, _ in DayUnmaskResponse.decode(
                    body, cfg.n, cfg.degree).reveals}
    return keys, shares


def test_a_reissued_set_reveals_a_day_key_or_a_share_never_both() -> None:
    """Across both consistency rounds and the unmask, no device reveals both its day key
    with a neighbour and its share of that neighbour's self mask."""
    f = Fleet(16)
    everyone = list(f.names)
    f.day(0, everyone)
    a = "a5"
    b = _neighbour_pair(f, a, 1)
    r = f.day(1, everyone, silent={"day": {a}, "consistency": {b}})
    keys, shares = _reveals(r, f.log)
    ia, ib = r.epoch.index[a], r.epoch.index[b]
    assert keys and shares and not keys & shares
    assert {o for _, o in shares}.isdisjoint({ia, ib})  # no self mask of a left-out device
    assert {(h, o) for h, o in keys if o == ib} == {(h, ib) for h in r.server.neighbours(ib)
                                                   if h not in (ia,)}


def test_a_device_refuses_a_reissued_set_that_is_not_a_subset_of_its_own() -> None:
    """Attack: after the devices tagged S without target v (a neighbour's day key with v
    revealed), the coordinator re-issues a set with v back in, to get that neighbour's share
    of v's self mask at unmask too (day key + share = v's mask off). Refused; so is a set
    without the device itself, and a re-issue after the device unmasked."""
    from protocols.secagg.epoch_messages import EHeader, EMsg, SurvivorSet, encode_bitmap
    from protocols.secagg.messages import SERVER, add_mac

    f = Fleet(16)
    everyone = list(f.names)
    f.day(0, everyone)
    v = "a2"
    h = _neighbour_pair(f, v)
    rr = ReportRound("run", 1, everyone, [f.ids[m].public_bytes() for m in everyone],
                     min_survivors=3, epoch=f.epoch)
    for m in everyone:
        if m != v:
            rr.receive(m, f.device(m).masked_input(1, f.report(m, 1), run_id="run",
                                                    epoch=rr.config.round))
    out = rr.advance()
    assert rr.stage == "consistency"
    f.device(h).stage("consistency", 1, out[h])  # h tags S (v outside): day key (h, v) out
    cfg, srv = rr.config, rr.server
    ih = rr.epoch.index[h]

    def reissue(members: set[int]) -> bytes:
        hdr = EHeader(EMsg.SURVIVORS, cfg.run_id, cfg.round, rr.pday, SERVER, ih)
        return add_mac(srv._macs[ih], SurvivorSet(hdr, encode_bitmap(frozenset(members),
                                                                       cfg.n)).encode())

    with pytest.raises(SecAggError, match="subset"):
        f.device(h).stage("consistency", 1, reissue(set(range(cfg.n))))  # v back in
    with pytest.raises(SecAggError, match="not in the survivor set"):
        f.device(h).stage("consistency", 1, reissue(set(srv.survivor_set) - {ih}))
    smaller = set(srv.survivor_set) - {rr.epoch.index[_neighbour_pair(f, h, 3)]}
    f.device(h).stage("consistency", 1, reissue(smaller))  # a true subset: tagged again


def test_a_device_that_revealed_never_masks_the_day_again() -> None:
    f = Fleet(6)
    f.day(0, list(f.names))
    dev = f.device("a2")
    with pytest.raises(SecAggDeviceError, match="revealed"):
        dev.stage("masked_input", 0, bytes([1]))  # a "retry" after the day completed
    f2 = Fleet(6)
    f2.day(0, list(f2.names), silent={"unmask": {"a1"}})  # a1 never revealed day 0 ...
    with pytest.raises(SecAggDeviceError, match="attempt"):  # ... but attempts only go up
        f2.device("a1").stage("masked_input", 0, bytes([0]))


def test_epoch_state_lives_in_the_device_store(tmp_path, monkeypatch) -> None:
    from edge_agent.store import EdgeStore

    monkeypatch.setenv("LPM_EDGE_PASSPHRASE", "device passphrase 12")
    stores = {f"a{i}": EdgeStore(tmp_path / f"d{i}.db") for i in range(5)}
    try:
        f = Fleet(5, stores)
        for d in range(3):
            r = f.day(d, list(f.names))
            _close(r.total(), f.expected(list(f.names), d), 5)
        assert f.advertised == 5  # one key agreement for three days
        for m in f.names:  # the node state holds no secret of the epoch
            assert "sa_secret" not in f.st[m]
            assert stores[m].get_private_key("run/secagg-epoch")
    finally:
        for s in stores.values():
            s.close()


def test_a_day_is_masked_once_even_in_a_new_epoch() -> None:
    f = Fleet(6)
    f.day(0, list(f.names))
    f.epoch = None  # the coordinator starts another epoch and asks day 0 again
    with pytest.raises(SecAggDeviceError, match="already reported"):
        f.day(0, list(f.names))
    dev = f.device("a0")
    with pytest.raises(SecAggDeviceError, match="already reported"):
        dev.masked_input(0, f.report("a0", 0), run_id="run", epoch=0)


def test_device_refuses_another_run_or_epoch() -> None:
    f = Fleet(6)
    f.day(0, list(f.names))
    with pytest.raises(SecAggDeviceError, match="epoch"):
        f.device("a1").masked_input(1, f.report("a1", 1), run_id="run", epoch=7)
    with pytest.raises(SecAggDeviceError, match="epoch"):
        f.device("a1").masked_input(1, f.report("a1", 1), run_id="other", epoch=0)


def test_equivocating_coordinator_in_the_daily_loop_is_caught() -> None:
    """Day 1 of an epoch (keys agreed on day 0): the coordinator tells the target's
    neighbours that the target survived and its other neighbours dropped — each neighbour a
    different set — and everyone else the truth, then forwards every consistency tag it
    holds.
    Each neighbour of the target refuses (to tag a set that leaves it too few neighbours, or
    to unmask without t valid neighbour tags on its own set), and no reveal lets the
    coordinator strip the target's masks."""
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
    from protocols.secagg.messages import SERVER, add_mac, strip_mac

    f = Fleet(40)  # sparse enough (k = 12) that devices away from the target see no lie
    f.day(0, list(f.names))
    target = 0
    views: dict[int, frozenset[int]] = {}

    def tamper(stage: str, rr: ReportRound, log: dict[str, dict[str, bytes]]
               ) -> dict[str, bytes]:
        srv, cfg = rr.server, rr.config
        n, nb = cfg.n, srv.neighbours(target)
        everyone = frozenset(range(n))
        mac = srv._macs  # the coordinator's own keys with each device

        def hdr(t: EMsg, i: int) -> EHeader:
            return EHeader(t, cfg.run_id, cfg.round, rr.pday, SERVER, i)

        if stage == "consistency":
            srv.advance()  # the honest survivor set is everyone; show the neighbours others
            views.update({i: ((everyone - nb) | {i, target}) if i in nb else everyone
                          for i in range(n)})
            return {rr.roster[i]: add_mac(mac[i], SurvivorSet(
                hdr(EMsg.SURVIVORS, i), encode_bitmap(views[i], n)).encode()) for i in range(n)}
        assert stage == "unmask"
        tags = {rr.epoch.index[m]: dict(SurvivorTags.decode(
                    strip_mac(mac[rr.epoch.index[m]], blob, 10**6), n, cfg.degree).tags)
                for m, blob in log["consistency"].items()}
        reqs = {}
        for i in tags:  # forward every tag that could convince i
            good = tuple((j, tags[j][i]) for j in sorted(srv.neighbours(i))
                         if j in tags and views[j] == views[i] and i in tags[j])
            envs = tuple((j, dict(srv._inputs[j].envelopes)[i])
                         for j in sorted(srv.neighbours(i) & views[i]))
            reqs[rr.roster[i]] = add_mac(mac[i], DayUnmaskRequest(
                hdr(EMsg.UNMASK_REQUEST, i), good, envs).encode())
        return reqs

    rr = f.day(1, list(f.names), tamper=tamper)
    cfg, nb = rr.config, rr.server.neighbours(target)
    # away from the target every device tagged the (true) set it was shown ...
    assert {rr.roster[i] for i in range(cfg.n) if i not in nb} <= set(f.log["consistency"])
    # ... and each neighbour of the target refused: to tag a set in which too few of its
    # neighbours survive, or to unmask without t valid neighbour tags on its own set
    assert {rr.roster[i] for i in nb} <= set(f.refused)
    assert set(f.refused.values()) <= {"ProtocolViolationError", "BadSignatureError",
                                       "SecAggAbortError"}
    shares = keys = 0
    for m, blob in f.log.get("unmask", {}).items():
        i = rr.epoch.index[m]
        resp = DayUnmaskResponse.decode(strip_mac(rr.server._macs[i], blob, 10**6), cfg.n,
                                        cfg.degree)
        shares += sum(1 for j, k, _ in resp.reveals
                      if j == target and k is RevealKind.SELF_MASK_SHARE)
    for m, blob in f.log.get("consistency", {}).items():  # day keys travel with the tags
        i = rr.epoch.index[m]
        tagged = SurvivorTags.decode(strip_mac(rr.server._macs[i], blob, 10**6), cfg.n,
                                     cfg.degree)
        keys += sum(1 for j, _ in tagged.day_keys if j == target)
    assert f.log.get("unmask")  # devices away from the target did reveal (same honest set)
    assert shares < cfg.threshold and keys == 0  # the target's masks stay on


def test_a_device_dying_after_tagging_next_to_an_offline_one_does_not_fail_the_day() -> None:
    """The fleet failure of 2026-11-28 (1000 devices, 5 % offline): a device is offline for
    the day and a neighbour of it masks, tags and dies before unmasking. Its day key with
    the offline one came with its tags, so the day completes over the survivors exactly,
    in the same epoch, and both rejoin the next day."""
    f = Fleet(16)
    everyone = list(f.names)
    f.day(0, everyone)
    assert f.epoch is not None
    off = "a3"
    dying = f.epoch.roster[min(f.epoch.server.neighbours(f.epoch.index[off]))]
    r1 = f.day(1, everyone, silent={"day": {off}, "unmask": {dying}})
    assert not r1.new_epoch and r1.attempt == 0
    assert off not in r1.survivors() and dying in r1.survivors()
    _close(r1.total(), f.expected(r1.survivors(), 1), 16)
    r2 = f.day(2, everyone)
    assert not r2.new_epoch and set(r2.survivors()) == set(everyone)
    _close(r2.total(), f.expected(everyone, 2), 16)

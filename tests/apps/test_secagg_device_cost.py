"""The device adapter (edge_agent.secagg_flower.SecAggDevice) keeps O(k) per device, not
O(n): the registry it stores is its own key and its neighbours' (whatever the coordinator
sent), its vault state does not grow with the roster, and the sums stay exact through the
adapters with a fresh device object per message."""

from __future__ import annotations

import json

import torch
from flwr.app import ConfigRecord

from coordinator.flower.secagg import ReportRound
from edge_agent import state_record as rec
from edge_agent.secagg_flower import SecAggDevice
from protocols.daily import REPORT_FIELDS
from protocols.keys import IdentityKey

L = len(REPORT_FIELDS)


def _run(n: int, full_registry: bool) -> tuple[dict[str, ConfigRecord], ReportRound, list[str]]:
    """Two clean days of n devices through the real adapters; returns the node states."""
    names = [f"d{i}" for i in range(n)]
    ids = {m: IdentityKey.generate() for m in names}
    st = {m: ConfigRecord() for m in names}
    epoch = None
    for day in (0, 1):
        rr = ReportRound("run", day, names, [ids[m].public_bytes() for m in names],
                         min_survivors=3, epoch=epoch)
        epoch = rr.epoch
        for m in names:
            dev = SecAggDevice(st[m], ids[m].private_bytes())
            if rr.new_epoch:
                if full_registry:  # every roster key, as the stand-alone app sends
                    blob = dev.advertise(rr.config.to_bytes(),
                                         [ids[r].public_bytes() for r in rr.roster], m,
                                         run_id="run", day=day, report=[float(day)] * L)
                else:
                    idx = rr.registry_for(m)
                    blob = dev.advertise(rr.config.to_bytes(),
                                         [ids[rr.roster[j]].public_bytes() for j in idx], m,
                                         run_id="run", day=day, report=[float(day)] * L,
                                         registry_index=idx)
            else:
                blob = dev.masked_input(day, [float(day)] * L, run_id="run",
                                        epoch=rr.config.round)
            rr.receive(m, blob)
        while True:
            out = rr.advance()
            if rr.stage is None:
                break
            for m, b in out.items():
                dev = SecAggDevice(st[m], ids[m].private_bytes())
                rr.receive(m, dev.stage(rr.stage, day, b))
        assert not rr.rejected
        assert sorted(rr.survivors()) == sorted(names)
        assert torch.allclose(rr.total(), torch.full((L,), float(day * n), dtype=torch.float64))
    assert epoch is not None
    return st, rr, names


def test_stored_registry_is_own_and_neighbours_even_from_a_full_registry() -> None:
    st, rr, names = _run(24, full_registry=True)
    for m in names:
        i = rr.epoch.index[m]
        kept = rec.integers(st[m], "sa_reg_index")
        assert kept == sorted({i, *rr.server.neighbours(i)})
        assert len(rec.blobs(st[m], "sa_registry")) == len(kept)


def test_device_state_does_not_grow_with_the_roster() -> None:
    """After the same two days, a device's stored state at 60 devices is the size it is at 20,
    but for the config (the public roster, kept once per epoch) and the digits of indices.
    (Before: the registry of every roster key and the whole survivor set.)"""
    sizes = {}
    for n in (20, 60):
        st, rr, names = _run(n, full_registry=True)
        m = names[0]
        secret = json.loads(rec.blob(st[m], "sa_secret"))
        state = json.loads(secret["client"])
        assert set(state["live_in"]) == set()  # the day is over: nothing kept of its set
        sizes[n] = (len(rec.blob(st[m], "sa_secret")),
                    sum(len(b) for b in rec.blobs(st[m], "sa_registry")),
                    rr.config.degree)
    assert sizes[20][2] == sizes[60][2]  # the same degree, so the same k
    assert abs(sizes[60][0] - sizes[20][0]) <= 32  # index digits in the packed hex: none
    assert sizes[60][1] == sizes[20][1]

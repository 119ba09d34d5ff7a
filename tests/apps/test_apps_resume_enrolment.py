"""A resumed run reuses each device's enrolment: the same identity key and private seed as
before the restart (a new enrolment drew new ones, so a device's events after a restart no
longer followed its own private seed); the neighbourhood key is new (the restarted
coordinator's relay has new keys). The resumed days' totals equal the survivors' true
states."""

from __future__ import annotations

import pytest
import torch

from coordinator.fleet import ProcessTransport
from coordinator.flower.server_app import FederatedRun, FederatedSettings
from coordinator.runner import RunConfig
from coordinator.store import CoordinatorStore
from edge_agent.store import EdgeStore

CFG = RunConfig(population="tiny", days=4, seed=5, devices=10, initial_infected=0.2, beta=0.8)
SECRETS = ("identity", "u_seed")


class _Crash(Exception):
    pass


@pytest.mark.slow  # two runs of 10 device processes: 60 s at load 12
def test_resumed_run_reuses_the_device_enrolment(tmp_path, monkeypatch):
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")
    monkeypatch.setenv("LPM_EDGE_PASSPHRASE", "device passphrase 12")
    torch.set_num_threads(1)
    paths = {n: tmp_path / f"d{n}.db" for n in range(1, CFG.devices + 1)}
    t = ProcessTransport(CFG.devices, node_configs={n: {"lpm-store": str(p)}
                                                    for n, p in paths.items()})
    store = CoordinatorStore(tmp_path / "c.db")
    rid = store.create_run({**CFG.to_dict(), "federated": True}, CFG.days, run_id="enrol")
    settings = FederatedSettings(min_devices=10)  # private seeds (no shared seed)

    def secrets() -> dict[int, dict[str, bytes]]:
        out = {}
        for n, p in paths.items():
            with EdgeStore(p) as st:
                out[n] = {k: st.get_private_key(f"{rid}/{k}") for k in SECRETS}
                out[n]["nb"] = st.get_private_key(f"{rid}/nb_key")
        return out

    def crash(day: int, row: dict) -> None:
        if day == 2:
            raise _Crash

    checks: list[tuple[float, float]] = []
    run: FederatedRun

    def check(day: int, row: dict) -> None:
        states = t.device_states()
        checks.append((row["physical_I"], sum(states[n]["I"] for n in run.survivors[day])))

    try:
        with pytest.raises(_Crash):
            FederatedRun(t, CFG, settings=settings, store=store, run_id=rid, on_day=crash).run()
        before = secrets()
        run = FederatedRun(t, CFG, settings=settings, store=store, run_id=rid, resume=True,
                           on_day=check)
        rows = run.run()
        after = secrets()
    finally:
        t.close()
    assert len(rows) == 2 and [r["day"] for r in store.series(rid)] == [1, 2, 3, 4]
    for n in paths:  # identity and private seed kept over the restart, nb key new
        assert {k: after[n][k] for k in SECRETS} == {k: before[n][k] for k in SECRETS}
        assert after[n]["nb"] != before[n]["nb"]
    assert all(r["survivors"] == 10 for r in rows)
    assert all(a == b for a, b in checks), checks

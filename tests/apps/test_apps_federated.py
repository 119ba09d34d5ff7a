"""The federated loop in the simulated fleet (real ClientApps in a device-host process):
private device state, online calibration from SecAgg'd device gradients, dropouts and the
minimum cohort."""

from __future__ import annotations

import math
import os

import pytest
import torch

from coordinator.calibration import CalibrationSettings
from coordinator.fleet import ProcessTransport, run_fleet
from coordinator.flower.server_app import FederatedRun, FederatedSettings, MinCohortError
from coordinator.runner import RunConfig, physical_agents
from simulation.engine import simulate
from simulation.models import SIR
from simulation.population import synthesize


def _public_replay(cfg: RunConfig) -> dict[str, torch.Tensor]:
    """What anyone holding the public run config recomputes for the physical agents (the
    central run with the public seed), final day."""
    pop = synthesize(cfg.population, seed=cfg.seed, scale=cfg.scale)
    with torch.no_grad():
        traj = simulate(SIR(cfg.beta, cfg.gamma, cfg.initial_infected), pop, cfg.days, cfg.seed)
    phys = physical_agents(pop.n, cfg.devices)
    return {c: traj.final_state[c][phys] for c in ("S", "I", "R")}


def _device_matrix(transport: ProcessTransport, cfg: RunConfig) -> dict[str, torch.Tensor]:
    states = transport.device_states()
    order = sorted(states, key=lambda n: int(states[n]["agent_id"][1:]))
    return {c: torch.tensor([states[n][c] for n in order]) for c in ("S", "I", "R")}


@pytest.fixture(autouse=True)
def _threads(monkeypatch):
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")
    torch.set_num_threads(1)


def test_public_config_no_longer_reproduces_device_states():
    cfg = RunConfig(population="tiny", days=2, seed=7, devices=20, initial_infected=0.2,
                    beta=0.9)
    replay = _public_replay(cfg)
    got = {}
    for shared in (True, False):
        t = ProcessTransport(cfg.devices)
        try:
            rows = run_fleet(cfg, settings=FederatedSettings(shared_seed=shared), transport=t)
            got[shared] = _device_matrix(t, cfg)
            assert t.pid != os.getpid()  # devices live in another process
        finally:
            t.close()
        assert len(rows) == cfg.days and rows[-1]["survivors"] == cfg.devices
        # the SecAgg'd totals are the devices' true totals either way
        assert rows[-1]["physical_I"] == int(got[shared]["I"].sum())
    # the attack works in the explicit shared-seed (equivalence test) mode ...
    for c in ("S", "I", "R"):
        assert torch.equal(got[True][c], replay[c]), c
    # ... and fails with device-private seeds: the replay mislabels many devices
    wrong = int((got[False]["I"] != replay["I"]).sum() + (got[False]["S"] != replay["S"]).sum())
    assert wrong >= 5, wrong


def test_calibration_recovers_beta_and_coordinator_holds_no_device_state():
    cfg = RunConfig(population="tiny", days=8, seed=2, devices=20, initial_infected=0.05,
                    beta=0.6)
    cal = CalibrationSettings(beta_init=0.25, every=2, steps=5)
    t = ProcessTransport(cfg.devices)
    seen_physical: list[float] = []
    run = FederatedRun(t, cfg, settings=FederatedSettings(calibration=cal),
                       on_day=lambda d, r: seen_physical.append(
                           float(run.sim.state["I"][run.sim.split.physical].abs().sum()
                                 + run.sim.state["S"][run.sim.split.physical].abs().sum())))
    try:
        rows = run.run()
    finally:
        t.close()
    # the coordinator's simulation never held a physical agent's state
    assert seen_physical == [0.0] * cfg.days
    assert not run.sim.physical_initial_state
    betas = [r["theta_beta"] for r in rows]
    assert betas[0] == 0.25 and abs(betas[-1] - cfg.beta) / cfg.beta < 0.15, betas
    # ∂L/∂θ has a synthetic (autograd) and a device (SecAgg'd Σ∂p/∂β) part
    assert all(r["grad_devices"][0] != 0 for r in rows)
    assert rows[-1]["loss"] < rows[0]["loss"]


def test_dropouts_complete_over_survivors_exactly(survivor_totals):
    cfg = RunConfig(population="tiny", days=5, seed=1, devices=16, initial_infected=0.2,
                    beta=0.9)
    # node: offline from (day, stage) until back_day; stages cover every SecAgg+ step.
    # Exchange d carries the day-(d-1) delivery and report: node 3 misses two reports and
    # catches up (no report in exchange 3, back in 4, rejoining the key epoch: absences do
    # not re-key); 5 drops before its masked input on a day that continues the key epoch
    # (the masked report rides in the day reply), 8 after its key advertisement on the
    # first day of the epoch; 11 drops at unmask, after its masked input (still summed).
    offline = {3: [1, "day", 3], 5: [2, "day", 99], 8: [1, "masked_input", 99],
               11: [4, "unmask", 99]}
    t = ProcessTransport(cfg.devices, offline=offline)
    totals = survivor_totals(t)
    run = totals.run = FederatedRun(t, cfg, settings=FederatedSettings(min_devices=10),
                                    on_day=totals)
    try:
        rows = run.run()
    finally:
        t.close()
    assert [r["survivors"] for r in rows] == [14, 13, 13, 14, 13]
    totals.assert_exact(cfg.days)
    # re-keyed when an unkeyed device joins (8 advertised but never masked; 3 returns
    # after missing the whole first epoch), kept when keyed devices go offline (5, 11)
    assert run.epochs == {1: 0, 2: 1, 3: 1, 4: 3, 5: 3}
    assert 3 in run.survivors[4]  # node 3 came back on day 3 and rejoined
    assert 11 in run.survivors[4]  # dropped at unmask: its masked input still counts


def test_device_dropping_after_masking_is_left_out_without_an_abort(caplog, survivor_totals):
    """Node 3 drops before its masked input and node 5 after it (before the consistency
    round); on 9 devices (complete SecAgg+ graph) nobody else can remove their pairwise mask,
    so node 5's input cannot be in the sum: the coordinator re-issues the survivor set
    without it (one more consistency round; the fleet's "client N sent no tags" abort
    before) and the day completes in its first attempt, in the same key epoch; the totals
    equal the survivors' true states."""
    import logging

    cfg = RunConfig(population="tiny", days=3, seed=1, devices=9, initial_infected=0.2,
                    beta=0.9)
    t = ProcessTransport(cfg.devices, offline={3: [2, "day", 99], 5: [2, "consistency", 99]})
    totals = survivor_totals(t)
    run = totals.run = FederatedRun(t, cfg, settings=FederatedSettings(min_devices=6),
                                    on_day=totals)
    with caplog.at_level(logging.WARNING, logger="coordinator.flower.server_app"):
        try:
            rows = run.run()
        finally:
            t.close()
    assert [r["survivors"] for r in rows] == [9, 7, 7]
    assert run.epochs[2] == run.epochs[1] and 3 not in run.survivors[2]
    assert 5 not in run.survivors[2]
    assert [len(o) for o in run.secagg_log[2]["left_out"]] == [1]  # node 5, once
    assert all(not v["aborts"] for v in run.secagg_log.values())
    assert any("re-issued" in r.getMessage() for r in caplog.records)
    assert not any("attempted again" in r.getMessage() for r in caplog.records)
    totals.assert_exact(cfg.days)


def test_below_min_cohort_names_missing_nodes():
    cfg = RunConfig(population="tiny", days=3, seed=1, devices=11, initial_infected=0.1)
    t = ProcessTransport(cfg.devices, offline={4: [1, "masked_input", 99],
                                               9: [1, "day", 99]})
    try:
        with pytest.raises(MinCohortError, match=r"node 4 .*node 9 |node 9 .*node 4 "):
            FederatedRun(t, cfg, settings=FederatedSettings(min_devices=10)).run()
    finally:
        t.close()
    with pytest.raises(MinCohortError, match="minimum cohort is 10"):
        run_fleet(RunConfig(population="tiny", days=1, devices=5))


def test_user_status_from_lpm_edge_status(tmp_path, monkeypatch):
    """A device whose user set their status (`lpm edge status --set infected`) reports that
    status instead of simulating one; the status stays in its encrypted store."""
    from typer.testing import CliRunner

    from edge_agent.store import EdgeStore
    from lpm_cli import app

    monkeypatch.setenv("LPM_EDGE_PASSPHRASE", "device passphrase 12")
    stores = {n: tmp_path / f"dev{n}.db" for n in (2, 5)}
    runner = CliRunner()
    for n, state in ((2, "infected"), (5, "recovered")):
        res = runner.invoke(app, ["edge", "status", "--store", str(stores[n]), "--set", state])
        assert res.exit_code == 0, res.output
        assert f"your status: {state}" in res.output
    bad = runner.invoke(app, ["edge", "status", "--store", str(stores[2]), "--set", "sick"])
    assert bad.exit_code != 0
    cfg = RunConfig(population="tiny", days=2, seed=4, devices=10, initial_infected=0.0,
                    beta=0.9)
    t = ProcessTransport(cfg.devices, node_configs={n: {"lpm-store": str(p)}
                                                    for n, p in stores.items()})
    try:
        rows = run_fleet(cfg, transport=t)
        states = t.device_states()
    finally:
        t.close()
    assert states[2]["I"] == 1.0 and states[5]["R"] == 1.0
    # nobody else is infected at the start (initial-infected 0): the devices' total infected
    # counts node 2 (and whoever it infected), never fewer
    assert rows[0]["physical_I"] >= 1 and rows[-1]["physical_I"] == sum(
        s["I"] for s in states.values())
    with EdgeStore(stores[2]) as st:
        assert st.status("run")["I"] == 1.0 and st.status("run")["day"] == 1
    res = runner.invoke(app, ["edge", "status", "--store", str(stores[2])])
    assert "infected" in res.output and "day 1" in res.output


def test_resume_from_last_committed_day_with_device_stores(tmp_path, monkeypatch):
    """A federated run that dies after day 2 resumes with the same run id: the synthetic
    checkpoint from the coordinator's store, each device's own state from its store."""
    from coordinator.store import CoordinatorStore

    monkeypatch.setenv("LPM_EDGE_PASSPHRASE", "device passphrase 12")
    cfg = RunConfig(population="tiny", days=4, seed=6, devices=10, initial_infected=0.2,
                    beta=0.9)
    store = CoordinatorStore(tmp_path / "c.db")
    rid = store.create_run({**cfg.to_dict(), "federated": True}, cfg.days, run_id="fl-resume")
    t = ProcessTransport(cfg.devices, node_configs={
        n: {"lpm-store": str(tmp_path / f"d{n}.db")} for n in range(1, 11)})

    class Crash(Exception):
        pass

    def crash(day: int, row: dict) -> None:
        if day == 2:
            raise Crash

    try:
        with pytest.raises(Crash):
            FederatedRun(t, cfg, store=store, run_id=rid, on_day=crash).run()
        assert [r["day"] for r in store.series(rid)] == [1, 2]
        run = FederatedRun(t, cfg, store=store, run_id=rid, resume=True)
        rows = run.run()
        states = t.device_states()
    finally:
        t.close()
    assert [r["day"] for r in store.series(rid)] == [1, 2, 3, 4]
    assert len(rows) == 2 and rows[-1]["survivors"] == 10
    assert rows[-1]["physical_I"] == sum(s["I"] for s in states.values())


def test_calibrator_segments_and_exact_synthetic_sum():
    """β_t by segment: each segment's β is recovered from its own days; the synthetic Σp_i
    (moment series) equals the direct sum, also where βh is large (direct fallback)."""
    from coordinator.calibration import OnlineCalibrator, _Day

    gen = torch.Generator().manual_seed(0)
    h = torch.rand(5000, generator=gen, dtype=torch.float64) * 1.5
    day = _Day.from_hazard(h, 0.0, 0.0, 0.0, 0.0, 0)
    for b in (0.05, 0.7, 3.0, 4.9):
        bt = torch.tensor(b, dtype=torch.float64)
        assert float(day.synthetic(bt)) == pytest.approx(float(-torch.expm1(-bt * h).sum()),
                                                         rel=1e-10)
    truth = [0.8, 0.4, 0.6]
    cal = OnlineCalibrator(CalibrationSettings(beta_init=0.3, every=3, steps=4, segment_days=3))
    for d in range(9):
        hd = torch.rand(20_000, generator=gen, dtype=torch.float64) * 0.1
        b = cal.beta_for(d)
        true_b = truth[d // 3]
        # devices: 50 agents with hazard 0.05; observed = expected new infections at the truth
        y = float(-torch.expm1(-true_b * hd).sum()) + 50 * (1 - math.exp(-true_b * 0.05))
        cal.add_day(d, hd, 50 * (1 - math.exp(-b * 0.05)), 50 * 0.05 * math.exp(-b * 0.05), b, y)
        cal.update(d)
    assert cal.theta == pytest.approx(truth, rel=2e-3)
    loss, g_syn, g_dev = cal.loss_and_grad()
    assert loss < 1e-6 and all(g != 0 for g in g_dev) or loss < 1e-9


def test_api_refuses_and_withholds_small_cohorts(tmp_path):
    from fastapi.testclient import TestClient

    from coordinator.http.service import create_app
    from coordinator.store import CoordinatorStore

    store = CoordinatorStore(tmp_path / "c.db")
    token = "a-write-token-of-some-length"
    client = TestClient(create_app(store, token, execute=False))
    auth = {"Authorization": f"Bearer {token}"}
    r = client.post("/runs", json={"population": "tiny", "days": 2, "devices": 5}, headers=auth)
    assert r.status_code == 422 and "minimum cohort" in r.text
    assert client.post("/runs", json={"population": "tiny", "days": 2, "devices": 10},
                       headers=auth).status_code == 201
    small = store.create_run({"devices": 3}, 2)  # e.g. an older run with 3 devices
    store.commit_round(small, 1, {"I": 7.0, "physical_I": 1, "physical_dp_dbeta": 0.2})
    rows = client.get(f"/runs/{small}/series").json()["series"]
    assert rows[0]["I"] == 7.0 and "physical_I" not in rows[0]
    assert rows[0]["device_aggregates_withheld"] is True


class _InProcessHost:
    """:class:`Transport` over the device host's real ClientApps in this process (so the
    test sees EdgeStore's open counter); every message is sent on its own."""

    def __init__(self, nodes: int, node_configs: dict[int, dict]) -> None:
        from edge_agent.fleet_host import _Host

        self.host = _Host(list(range(1, nodes + 1)), {}, {}, node_configs)
        self.opens: dict[str, list[int]] = {}

    def node_ids(self) -> list[int]:
        return sorted(self.host.contexts)

    def exchange(self, message_type, contents, group, timeout):
        from edge_agent.store import EdgeStore

        replies, failed = {}, {}
        for node, body in contents.items():
            before = EdgeStore.opens
            r, f = self.host.exchange(message_type, {node: body}, group)
            self.opens.setdefault(message_type, []).append(EdgeStore.opens - before)
            replies.update(r)
            failed.update(f)
        return replies, failed

    def restart_nodes(self) -> None:
        """Every SuperNode restarts: its node state is gone, its store stays."""
        from flwr.app import Context, RecordDict

        for n, ctx in list(self.host.contexts.items()):
            self.host.contexts[n] = Context(run_id=1, node_id=n, node_config=ctx.node_config,
                                            state=RecordDict(), run_config={})


def test_device_opens_its_store_once_per_message(tmp_path, monkeypatch):
    """Issue 17: a device's day used to open its EdgeStore ~6 times (secret, user status
    twice, status write, SecAgg+ vault); now once per message (the scrypt key cached)."""
    monkeypatch.setenv("LPM_EDGE_PASSPHRASE", "device passphrase 12")
    cfg = RunConfig(population="tiny", days=3, seed=4, devices=10, initial_infected=0.2,
                    beta=0.9)
    t = _InProcessHost(cfg.devices, {n: {"lpm-store": str(tmp_path / f"d{n}.db")}
                                     for n in range(1, cfg.devices + 1)})
    rows = FederatedRun(t, cfg).run()
    assert len(rows) == cfg.days and rows[-1]["survivors"] == cfg.devices
    assert set(t.opens) == {"query.enrol", "query.day", "query.stage"}
    for kind, counts in t.opens.items():
        assert counts and set(counts) == {1}, (kind, sorted(set(counts)))


def test_supernode_restart_restores_device_from_its_store(tmp_path, monkeypatch):
    """A device restarted with nothing but its store (new process, empty node state) picks
    up where it was: neighbourhood re-arm inputs, SecAgg+ epoch state and status come back
    from the store's exported record; the run equals the one without restarts."""
    monkeypatch.setenv("LPM_EDGE_PASSPHRASE", "device passphrase 12")
    cfg = RunConfig(population="tiny", days=4, seed=5, devices=10, initial_infected=0.2,
                    beta=0.9)
    rows = {}
    for restart in (False, True):
        t = _InProcessHost(cfg.devices, {n: {"lpm-store": str(tmp_path / f"{restart}{n}.db")}
                                         for n in range(1, cfg.devices + 1)})

        def on_day(day: int, row: dict, t=t, restart=restart) -> None:
            if restart and day in (1, 2):
                t.restart_nodes()

        rows[restart] = FederatedRun(t, cfg, settings=FederatedSettings(shared_seed=True),
                                     on_day=on_day).run()
    assert [r["survivors"] for r in rows[True]] == [cfg.devices] * cfg.days
    for a, b in zip(rows[False], rows[True], strict=True):
        assert {k: a[k] for k in ("S", "I", "R", "physical_I", "new_infections")} == \
            {k: b[k] for k in ("S", "I", "R", "physical_I", "new_infections")}

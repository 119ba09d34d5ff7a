"""The daily reports' SecAgg+ graph is sized for the run's planned dropout share
(``dropout-plan``): a fleet where nearly half the devices vanish at every stage of one day
completes over the survivors, exactly, when the plan covers it."""

from __future__ import annotations

import pytest
import torch

from coordinator.fleet import ProcessTransport
from coordinator.flower.secagg import DROPOUT_PLAN, report_degree
from coordinator.flower.server_app import FederatedRun, FederatedRunError, FederatedSettings
from coordinator.runner import RunConfig
from protocols.secagg.config import default_threshold


def test_degree_grows_with_the_plan_and_rejects_a_minority_threshold():
    for n in (24, 200, 1000):
        ks = [report_degree(n, p) for p in (0.0, DROPOUT_PLAN, 0.1, 0.2, 0.3, 0.45)]
        assert ks == sorted(ks) and ks[-1] <= n - 1, ks
    # the plan's failure bound: P[more than k - t of k neighbours missing] · n ≤ 1e-3
    assert report_degree(1000, 0.2) > report_degree(1000, DROPOUT_PLAN) == 16
    assert report_degree(24, 0.3) == 23  # nothing sparser meets it: the complete graph
    for bad in (-0.1, 0.5, 0.9):
        with pytest.raises(ValueError, match="outside"):
            report_degree(100, bad)
        with pytest.raises(FederatedRunError, match="dropout-plan"):
            FederatedSettings(dropout_plan=bad)


def test_heavy_dropouts_complete_exactly_under_a_covering_plan(monkeypatch, survivor_totals):
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")
    torch.set_num_threads(1)
    cfg = RunConfig(population="tiny", days=4, seed=5, devices=24, initial_infected=0.2,
                    beta=0.9)
    # exchange 2 carries the day-1 reports: 11 of 24 devices vanish, at every stage (before
    # their masked input, after it, after tagging the survivor set, at unmask). Under the
    # default 5 % plan (degree 12, threshold 7) that day aborted in 4 of 4 tries (survivors
    # with fewer than 7 live neighbours are pruned, which cascades); a 30 % plan gives the
    # complete graph (threshold 12 of 23), which 11 missing devices cannot break.
    stages = ["day"] * 3 + ["masked_input"] * 3 + ["consistency"] * 2 + ["unmask"] * 3
    offline = {node: [2, stage, 99] for node, stage in zip(range(2, 24, 2), stages,
                                                             strict=True)}
    assert default_threshold(report_degree(cfg.devices, 0.3)) == 12
    t = ProcessTransport(cfg.devices, offline=offline)
    totals = survivor_totals(t)
    run = totals.run = FederatedRun(t, cfg, settings=FederatedSettings(min_devices=10,
                                                                       dropout_plan=0.3),
                                    on_day=totals)
    try:
        rows = run.run()
    finally:
        t.close()
    assert len(rows) == cfg.days
    survivors = [r["survivors"] for r in rows]
    assert survivors[0] == 24 and all(s >= 13 for s in survivors[1:]), survivors
    assert all(not set(offline) & set(run.survivors[d]) for d in (3, 4))
    totals.assert_exact(cfg.days)

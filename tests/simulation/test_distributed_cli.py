"""`lpm simulate --procs 2` re-launches itself with torchrun and writes the same series as
the single-process run."""

from __future__ import annotations

import json

import pandas as pd
import torch
import typer
from typer.testing import CliRunner

from simulation.cli import register
from simulation.engine import simulate
from simulation.models import SIR
from simulation.population import synthesize


def test_lpm_simulate_procs_2_equals_one_process(tmp_path):
    app = typer.Typer()
    register(app)
    app.command("noop")(lambda: None)  # two commands: typer keeps the sub-command name
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["simulate", "--preset", "tiny", "--days", "12", "--seed", "2",
                                   "--estimator", "straight_through", "--procs", "2",
                                   "--out", str(out)])
    assert res.exit_code == 0, res.output
    info = json.loads((out / "run.json").read_text())
    assert info["ranks"] == 2 and info["agents"] == 1_000
    assert info["halo_bytes_per_exchange"] <= 8 * info["cut_edges"]
    assert (out / "compartments.png").stat().st_size > 0
    with torch.no_grad():
        want = simulate(SIR(beta=0.5), synthesize("tiny", seed=2), 12, 2,
                        estimator="straight_through").to_frame()
    got = pd.read_csv(out / "series.csv")
    assert list(got.columns) == list(want.columns)
    assert (got.to_numpy() == want.to_numpy()).all()


def test_procs_with_stimulus_is_refused(tmp_path):
    app = typer.Typer()
    register(app)
    app.command("noop")(lambda: None)
    res = CliRunner().invoke(app, ["simulate", "--preset", "tiny", "--procs", "2",
                                   "--stimulus", "100", "--out", str(tmp_path)])
    assert res.exit_code != 0 and "--stimulus" in res.output

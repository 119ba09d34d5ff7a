"""`lpm gradcheck` and simulation.gradcheck: JSON layout, table, errors."""

import json
import subprocess
import sys

import pytest

from simulation.gradcheck import GradCheckError, gradcheck, parameter
from simulation.models import SEIRM, SIR
from simulation.population import random_contact_graph


def test_cli_writes_per_parameter_json_and_a_table(tmp_path):
    out = tmp_path / "g.json"
    res = subprocess.run(
        [sys.executable, "-m", "lpm_cli", "gradcheck", "--model", "sir", "--beta", "0.4", "--gamma", "0.15",
         "--agents", "3000", "--days", "8", "--seeds", "3", "--json", str(out)],
        capture_output=True, text=True, timeout=180,
    )
    assert res.returncode == 0, res.stderr
    data = json.loads(out.read_text())
    assert set(data) == {"beta", "gamma"}
    for stats in data.values():
        assert {"ad_mean", "ad_sd", "fd_mean", "fd_sd", "bias"} <= set(stats)
        assert stats["seeds"] == 3 and stats["ad_sd"] >= 0 and stats["fd_sd"] >= 0
    assert data["beta"]["ad_mean"] > 0 > data["gamma"]["ad_mean"]
    assert "bias" in res.stdout and "beta" in res.stdout
    bad = subprocess.run([sys.executable, "-m", "lpm_cli", "gradcheck", "--model", "abc"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "'sir', 'seirm'" in bad.stderr


def test_parameters_by_short_or_full_name_and_errors():
    m = SEIRM()
    assert parameter(m, "latent_days") is m.substeps["progression"].latent_days
    assert parameter(m, "substeps.isolation.efficacy") is m.substeps["isolation"].efficacy
    with pytest.raises(GradCheckError, match="scalar parameters"):
        parameter(m, "delta")
    with pytest.raises(GradCheckError, match="not a scalar"):
        parameter(m, "logit_ifr")
    g = random_contact_graph(500, 6, seed=0)
    with pytest.raises(GradCheckError, match="2 seeds"):
        gradcheck(SIR, g, 5, 1, ["beta"])


def test_zero_finite_differences_give_an_undefined_bias_not_infinity():
    import json

    from simulation.gradcheck import _stats, format_table

    flat = _stats(0.15, [-60.0, -70.0], [0.0, 0.0], 0.0075)  # no event moved on any seed
    assert not flat.defined
    d = flat.as_dict()
    assert d["bias"] is None and d["bias_se"] is None
    json.loads(json.dumps(d, allow_nan=False))  # strict JSON: no Infinity
    table = format_table({"gamma": flat}, "auto")
    assert "n/a (FD = 0)" in table and "bias is undefined" in table
    ok = _stats(0.3, [190.0, 200.0], [240.0, 260.0], 0.015)
    assert ok.defined and ok.as_dict()["bias"] == pytest.approx(195 / 250 - 1)

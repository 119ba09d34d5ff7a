"""`lpm calibrate --institutions` end to end on the bundled borough series (real processes)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_lpm_calibrate_institutions_runs_mpc_end_to_end(tmp_path):
    repo = Path(__file__).resolve().parents[2]
    res = subprocess.run([sys.executable, str(repo / "lpm_cli.py"), "calibrate", "--institutions", "BX,SI",
                          "--steps", "3", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=300, cwd=repo)
    assert res.returncode == 0, res.stderr[-3000:] + res.stdout[-2000:]
    run = json.loads((tmp_path / "institutional.json").read_text())
    assert len(run["losses"]) == 3 and all(math.isfinite(v) for v in run["losses"])
    assert run["losses"][-1] < run["losses"][0]
    assert set(run["theta"]) == {"BX", "SI", "ascertainment"}
    assert run["bytes_per_round"] > 0


def test_lpm_calibrate_institutions_rejects_unknown_borough(tmp_path):
    repo = Path(__file__).resolve().parents[2]
    res = subprocess.run([sys.executable, str(repo / "lpm_cli.py"), "calibrate", "--institutions", "BX,XX",
                          "--steps", "1", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=120, cwd=repo)
    assert res.returncode != 0
    assert "unknown institutions" in res.stderr + res.stdout

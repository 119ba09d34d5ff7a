"""Bundled data is found also from a copy of the code that carries no data files (a Flower FAB)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _fab_like_copy(dest: Path) -> Path:
    """The package as flwr 1.41 bundles it: .py/.toml/.md/.json/.yaml files only."""
    keep = {".py", ".toml", ".md", ".json", ".yaml", ".yml"}
    for src in (ROOT / "simulation").rglob("*"):
        if src.is_file() and src.suffix in keep and "__pycache__" not in src.parts:
            target = dest / src.relative_to(ROOT)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target)
    return dest


def _run(cwd: Path, env_extra: dict[str, str]) -> subprocess.CompletedProcess[str]:
    code = (
        "from simulation.population import BOROUGHS, synthesize\n"
        "from simulation.datafiles import DATA_DIR\n"
        "pop = synthesize('tiny', seed=0)\n"
        "print(DATA_DIR, len(BOROUGHS), pop.n)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "LPM_DATA_DIR"} | env_extra
    return subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


@pytest.mark.slow  # ~11 s; the default e2e deployment test runs the FAB for real
def test_fab_copy_reads_the_installed_data(tmp_path: Path) -> None:
    app = _fab_like_copy(tmp_path / "fab")
    assert not (app / "simulation" / "data" / "nyc_boroughs.csv").exists()
    out = _run(app, {"PYTHONPATH": str(app)})
    assert out.returncode == 0, out.stderr
    data_dir, boroughs, n = out.stdout.split()
    assert Path(data_dir) != app / "simulation" / "data"
    assert (Path(data_dir) / "nyc_boroughs.csv").is_file()
    assert (boroughs, n) == ("5", "1000")


def test_lpm_data_dir_overrides(tmp_path: Path) -> None:
    app = _fab_like_copy(tmp_path / "fab")
    empty = tmp_path / "nothing-here"
    empty.mkdir()
    out = _run(app, {"PYTHONPATH": str(app), "LPM_DATA_DIR": str(empty)})
    assert out.returncode != 0
    assert "nyc_boroughs.csv" in out.stderr

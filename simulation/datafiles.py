"""Where the bundled data files live.

Normally the package's own ``simulation/data`` folder. When this code runs from a copy that
carries no data files — a Flower app bundle (FAB) ships only ``.py``, ``.toml``, ``.md``,
``.yaml`` and ``.json`` files (flwr 1.41, not configurable) — the folder of the installed
``lpm-edge`` distribution is used instead (a regular install, or the project folder of an
editable one, PEP 610). ``$LPM_DATA_DIR`` overrides both.
"""

from __future__ import annotations

import json
import os
from importlib import metadata
from pathlib import Path
from urllib.parse import unquote, urlparse

__all__ = ["DATA_DIR", "data_dir"]

_DISTRIBUTION = "lpm-edge"
_MARKER = "nyc_boroughs.csv"  # a file every complete data folder has


def _installed_data_dirs() -> list[Path]:
    found: list[Path] = []
    for dist in metadata.distributions(name=_DISTRIBUTION):
        found.append(Path(str(dist.locate_file("simulation/data"))))
        direct_url = dist.read_text("direct_url.json")
        if direct_url:
            info = json.loads(direct_url)
            url = urlparse(str(info.get("url", "")))
            if info.get("dir_info", {}).get("editable") and url.scheme == "file":
                found.append(Path(unquote(url.path)) / "simulation" / "data")
    return [p for p in found if p.is_absolute()]


def data_dir() -> Path:
    """The data folder to read; the package's own one if no complete folder is found (readers
    then fail with an error naming the missing file)."""
    override = os.environ.get("LPM_DATA_DIR")
    if override:
        return Path(override)
    own = Path(__file__).resolve().parent / "data"
    if (own / _MARKER).is_file():
        return own
    for candidate in _installed_data_dirs():
        if (candidate / _MARKER).is_file():
            return candidate
    return own


DATA_DIR = data_dir()

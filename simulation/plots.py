"""Plots of simulated series (matplotlib, Agg backend: works without a screen)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from simulation.engine import Trajectory  # noqa: E402

COLOURS = {"S": "#1f77b4", "E": "#ff7f0e", "I": "#d62728", "R": "#2ca02c", "M": "#7f7f7f"}


def plot_compartments(traj: Trajectory, path: str | Path, title: str = "") -> Path:
    """Compartment totals per day as a PNG."""
    path = Path(path)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, values in traj.series.items():
        if name in COLOURS:
            ax.plot(values.detach().cpu().numpy(), label=name, color=COLOURS[name])
    ax.set_xlabel("day")
    ax.set_ylabel("agents")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

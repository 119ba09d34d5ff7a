""""What if we give a $500 stimulus?" (LPM paper §3.2): SEIRM with archetype behaviour, run
with and without the payment on the same population and random numbers."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from simulation.behaviour.backends import ACTIONS
from simulation.behaviour.policy import ArchetypePolicy, add_archetype_behaviour
from simulation.engine import Trajectory, simulate
from simulation.models import SEIRM
from simulation.population import Population

__all__ = ["StimulusComparison", "run_stimulus_comparison"]


@dataclass
class StimulusComparison:
    """Both trajectories plus the behaviour query accounting (queries/day = K × A × M)."""

    baseline: Trajectory
    stimulus: Trajectory
    amount: float
    queries_per_day: float
    archetypes: float  # mean archetypes present per day (K)
    actions: int  # A
    samples: int  # M

    def plot(self, path: str | Path) -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        path = Path(path)
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for traj, label in ((self.baseline, "no stimulus"), (self.stimulus, f"${self.amount:.0f} stimulus")):
            daily = traj["new_infections"].detach().cpu().numpy()
            ax.plot(range(1, len(daily)), daily[1:], label=f"{label}: {int(traj.total_infections):,} infections")
        ax.set_xlabel("day (day-0 seed infections not drawn)")
        ax.set_ylabel("new infections per day")
        ax.set_title(f"Stimulus scenario · {self.archetypes:.0f} archetypes · {self.queries_per_day:.0f} queries/day (K×A×M)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path


def run_stimulus_comparison(
    population: Population, days: int, amount: float, *, seed: int = 0, beta: float = 0.6,
    samples: int = 5, device: str = "cpu", progress=None,
) -> StimulusComparison:
    """Run SEIRM + archetype behaviour twice (0 and ``amount`` dollars) with the same seed
    and population; ``progress`` is called once per simulated day of either run."""
    if days < 1:
        raise ValueError("days must be >= 1")
    if amount < 0:
        raise ValueError("stimulus amount must be >= 0")
    runs = []
    policies: list[ArchetypePolicy] = []
    for stimulus in (0.0, amount):
        model = SEIRM(beta=beta)
        policies.append(add_archetype_behaviour(model, stimulus=stimulus, samples=samples))
        with torch.no_grad():
            runs.append(simulate(model, population, days, seed, device=device, progress=progress))
    q = policies[1].queries_per_day
    per_day = sum(q) / max(len(q), 1)
    return StimulusComparison(runs[0], runs[1], amount, per_day, per_day / (len(ACTIONS) * samples),
                              len(ACTIONS), samples)

"""Behaviour backends: answer "would a person of archetype k take action a today?".

``RuleBasedBackend`` is the default: isolation propensity rises with local prevalence and
falls with pandemic fatigue and financial pressure; a stimulus payment relieves the
pressure. Any object with ``query`` (and optionally ``query_batch``) is a backend: the
simulation does no networking itself, so the HTTP LLM client lives outside this package
(``coordinator.llm_backend.LLMBackend``). Backends return, for each query, M answers in
[0, 1] whose mean estimates p_a(k, t) (LPM paper Eq. 4–5).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

__all__ = ["ACTIONS", "BehaviourBackend", "BehaviourBackendError", "RuleBasedBackend", "Situation"]

ACTIONS = ("isolate", "mask", "test")


class BehaviourBackendError(RuntimeError):
    """A backend could not answer (endpoint down, timeout, unparseable reply)."""


@dataclass(frozen=True)
class Situation:
    """What an archetype knows today (all public or archetype-level, never individual)."""

    archetype: dict[str, int]
    day: int
    local_prevalence: float  # fraction infectious in the archetype's areas
    fatigue: float  # 0 fresh – 1 exhausted (days of restrictions so far)
    stimulus: float  # payment in dollars available to people who isolate

    def describe(self) -> str:
        a = self.archetype
        return (
            f"age band {a['age_band'] * 10}-{a['age_band'] * 10 + 9}, income band {a['income']} of 0-2, "
            f"occupation {['none', 'student', 'worker'][a['occupation']]}, "
            f"health status {['susceptible', 'exposed', 'infectious', 'recovered'][a['status']]}; "
            f"day {self.day}; local prevalence {self.local_prevalence:.2%}; "
            f"fatigue {self.fatigue:.2f}; stimulus ${self.stimulus:.0f}"
        )


class BehaviourBackend(Protocol):
    """Anything with ``query``; a backend may also offer a vectorised
    ``query_batch(situations, m) -> array [K, A, M]`` that the policy uses when present."""

    def query(self, situation: Situation, action: str, m: int) -> list[float]:
        """M answers in [0, 1] for (archetype situation, action)."""
        ...


@dataclass
class RuleBasedBackend:
    """Transparent logistic rules; the M samples vary the prevalence perception by ±25 %.

    logit p = base + w_prev · perceived prevalence + 0.15 · age band + symptomatic boost
    − w_fatigue · fatigue, then per action: isolate − w_pressure · financial pressure,
    mask + 1, test + boost/2 − 0.5. A stimulus payment reduces financial pressure.
    """

    base: float = -3.0
    prevalence_weight: float = 60.0
    fatigue_weight: float = 1.5
    pressure_weight: float = 1.2
    stimulus_per_pressure: float = 1000.0  # dollars that remove one unit of financial pressure
    symptomatic_boost: float = 2.5

    def financial_pressure(self, archetype: dict[str, int], stimulus: float) -> float:
        """Wage-loss pressure of isolating: higher for low income and for workers."""
        pressure = {0: 1.0, 1: 0.5, 2: 0.1}[archetype["income"]]
        if archetype["occupation"] == 2:
            pressure += 0.5  # workers lose wages when they isolate
        return max(pressure - stimulus / self.stimulus_per_pressure, 0.0)

    def query_batch(self, situations: list[Situation], m: int) -> np.ndarray:
        """Answers for many situations at once: array [len(situations), A, M]."""
        if m < 1:
            raise ValueError("m must be >= 1")
        prev = np.array([s.local_prevalence for s in situations])[:, None]
        perceived = prev * (0.75 + 0.5 * (np.arange(m) + 0.5) / m)[None, :]  # [K, M]
        sick = np.array([self.symptomatic_boost if s.archetype["status"] == 2 else 0.0 for s in situations])
        common = (self.base + 0.15 * np.array([s.archetype["age_band"] for s in situations]) + sick
                  - self.fatigue_weight * np.array([s.fatigue for s in situations]))
        pressure = np.array([self.financial_pressure(s.archetype, s.stimulus) for s in situations])
        shift = np.stack([-self.pressure_weight * pressure, np.ones_like(sick), 0.5 * sick - 0.5], 1)  # [K, A]
        x = self.prevalence_weight * perceived[:, None, :] + (common[:, None] + shift)[:, :, None]
        return 1.0 / (1.0 + np.exp(-x))

    def query(self, situation: Situation, action: str, m: int) -> list[float]:
        if action not in ACTIONS:
            raise BehaviourBackendError(f"unknown action {action!r}")
        return self.query_batch([situation], m)[0, ACTIONS.index(action)].tolist()

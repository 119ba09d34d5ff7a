"""Behaviour archetypes (LPM paper §4.2): K×A×M behaviour queries per day instead of N.

Agents are grouped into archetypes by static and dynamic attributes; for every archetype k
and action a a backend (rule-based, or ``coordinator.llm_backend.LLMBackend`` for an LLM) is
queried M times to estimate p_a(k, t); each agent then samples its action. The policy is a
SEIRM substep, so behaviour and epidemic co-evolve.
"""

from simulation.behaviour.archetypes import ArchetypeSpec, assign_archetypes
from simulation.behaviour.backends import (
    ACTIONS,
    BehaviourBackend,
    BehaviourBackendError,
    RuleBasedBackend,
    Situation,
)
from simulation.behaviour.policy import ArchetypePolicy, add_archetype_behaviour

__all__ = [
    "ACTIONS",
    "ArchetypePolicy",
    "ArchetypeSpec",
    "BehaviourBackend",
    "BehaviourBackendError",
    "RuleBasedBackend",
    "Situation",
    "add_archetype_behaviour",
    "assign_archetypes",
]

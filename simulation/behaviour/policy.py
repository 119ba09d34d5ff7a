"""The archetype behaviour policy as a SEIRM substep.

observe: archetype of every agent and each archetype's public situation (prevalence in
its areas, fatigue, stimulus); policy: K×A×M backend queries → p_a(k, t); transition: each
agent samples its actions (Eq. 6) with the day's common random numbers and the model's
estimator, and the day's voluntary contact reduction is written to ``behaviour``.
"""

from __future__ import annotations

import torch

from simulation.behaviour.archetypes import ArchetypeSpec, assign_archetypes, static_code
from simulation.behaviour.backends import ACTIONS, BehaviourBackend, RuleBasedBackend, Situation
from simulation.models.seirm import SEIRM
from simulation.substeps import State, StepContext, Substep

__all__ = ["ArchetypePolicy", "add_archetype_behaviour"]


class ArchetypePolicy(Substep):
    """Archetype-level behaviour queries, agent-level sampled actions."""

    reads = ("S", "E", "I", "tested_positive")
    writes = ("behaviour", "tested_positive")

    def __init__(
        self,
        backend: BehaviourBackend | None = None,
        *,
        spec: ArchetypeSpec | None = None,
        samples: int = 5,
        stimulus: float = 0.0,
        isolation_effect: float = 0.8,
        mask_effect: float = 0.3,
        test_sensitivity: float = 0.85,
        fatigue_days: float = 90.0,
        streams: tuple[int, int, int] = (6, 7, 8),
    ) -> None:
        super().__init__()
        if samples < 1:
            raise ValueError("samples (M) must be >= 1")
        if stimulus < 0:
            raise ValueError("stimulus must be >= 0")
        self.backend = backend or RuleBasedBackend()
        self.spec = spec or ArchetypeSpec()
        self.samples = samples
        self.stimulus = stimulus
        self.isolation_effect = isolation_effect
        self.mask_effect = mask_effect
        self.test_sensitivity = test_sensitivity
        self.fatigue_days = fatigue_days
        self.streams = streams
        self.queries_per_day: list[int] = []
        self.last_probabilities: torch.Tensor | None = None
        self._static: tuple[object, torch.Tensor, torch.Tensor, int] | None = None

    def _static_parts(self, attributes) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Static archetype code and area index, computed once per population."""
        key = attributes["age_band"]
        if self._static is None or self._static[0] is not key:
            code = static_code(self.spec, attributes)
            area = attributes["area"].long() if "area" in attributes else torch.zeros_like(code)
            self._static = (key, code, area, int(area.max()) + 1)
        return self._static[1], self._static[2], self._static[3]

    def observe(self, state: State, ctx: StepContext) -> dict[str, torch.Tensor]:
        static, area, n_areas = self._static_parts(ctx.attributes)
        ids = assign_archetypes(self.spec, ctx.attributes, state, static)
        infectious = state["I"].detach()
        area_prev = torch.zeros(n_areas, device=ids.device).index_add_(0, area, infectious)
        area_prev /= torch.bincount(area, minlength=n_areas).clamp(min=1)
        # each archetype's exposure: mean prevalence of its members' areas
        k = self.spec.count
        pair = torch.bincount(ids * n_areas + area, minlength=k * n_areas).view(k, n_areas).float()
        counts = pair.sum(1)
        prev = (pair @ area_prev) / counts.clamp(min=1)
        return {"ids": ids, "counts": counts, "prevalence": prev}

    def policy(self, state, obs, ctx):
        present = torch.nonzero(obs["counts"]).squeeze(1).tolist()
        prevalence = obs["prevalence"].tolist()
        fatigue = min(ctx.day / self.fatigue_days, 1.0)
        table = [[0.0] * len(ACTIONS) for _ in range(self.spec.count)]
        queries = 0
        for k in present:
            situation = Situation(self.spec.decode(k), ctx.day, prevalence[k], fatigue, self.stimulus)
            for a, action in enumerate(ACTIONS):
                answers = self.backend.query(situation, action, self.samples)
                table[k][a] = sum(answers) / len(answers)
                queries += len(answers)
        self.queries_per_day.append(queries)
        probs = torch.tensor(table).T.contiguous().to(obs["ids"].device)  # [A, K]
        self.last_probabilities = probs.T
        return {"p": [probs[a][obs["ids"]] for a in range(len(ACTIONS))]}  # per action, per agent

    def transition(self, state, action, ctx):
        p = action["p"]
        iso = ctx.estimator(p[0], ctx.uniforms[self.streams[0]])
        mask = ctx.estimator(p[1], ctx.uniforms[self.streams[1]])
        test = ctx.estimator(p[2], ctx.uniforms[self.streams[2]])
        reduction = 1 - (1 - self.isolation_effect * iso) * (1 - self.mask_effect * mask)
        positive = torch.maximum(state["tested_positive"], state["I"] * test * self.test_sensitivity)
        return {"behaviour": reduction, "tested_positive": positive}


def add_archetype_behaviour(model: SEIRM, policy: ArchetypePolicy | None = None, **kwargs) -> ArchetypePolicy:
    """Insert an :class:`ArchetypePolicy` before SEIRM's ``infection`` substep, with its own
    uniform streams. Extra keyword arguments go to the policy."""
    streams = tuple(model.request_stream(f"behaviour_{a}") for a in ACTIONS)
    policy = policy or ArchetypePolicy(streams=streams, **kwargs)  # type: ignore[arg-type]
    policy.streams = streams  # type: ignore[assignment]
    model.add_substep("behaviour", policy, before="infection")
    return policy



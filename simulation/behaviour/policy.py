"""The archetype behaviour policy as a SEIRM substep.

observe: archetype of every agent and each archetype's public situation (prevalence in
its areas, fatigue, stimulus); policy: K×A×M backend queries → p_a(k, t) (Eq. 4–5);
transition: each agent samples its actions (Eq. 6) from the day's common random numbers
and the day's voluntary contact reduction is written to ``behaviour``; agents who test
positive join SEIRM's ``tested_positive`` (and so its isolation substep).

All three actions come from ONE uniform stream by conditional sampling (see
``simulation.behaviour.kernels``), which keeps the step cheap at millions of agents. On CPU
with the straight-through estimator a fused numba kernel does the per-agent work; elsewhere
a torch path with the model's estimator does the same arithmetic.
"""

from __future__ import annotations

import torch

from simulation.behaviour.archetypes import ArchetypeSpec, assign_archetypes, static_code
from simulation.behaviour.backends import (
    ACTIONS,
    BehaviourBackend,
    BehaviourBackendError,
    RuleBasedBackend,
    Situation,
)
from simulation.behaviour.kernels import observe_kernel, sample_kernel
from simulation.estimators import hard_forward, straight_through
from simulation.models.seirm import SEIRM
from simulation.substeps import State, StepContext, Substep

__all__ = ["ArchetypePolicy", "add_archetype_behaviour", "conditional_draws"]


def conditional_draws(p: torch.Tensor, u: torch.Tensor, estimator=straight_through) -> list[torch.Tensor]:
    """Sample independent Bernoulli(p[a]) for each row a of ``p`` [A, n] from one uniform
    ``u`` [n]: a = 1[u < p]; the leftover uniform u/p or (u − p)/(1 − p) feeds the next.
    Each draw uses up about log2(1/p) of the uniform's 24 bits; ample for three actions."""
    inv_p, inv_q = _reciprocals(p)
    out = []
    x = u
    for pa, ip, iq in zip(p, inv_p, inv_q, strict=True):
        out.append(estimator(pa, x))
        x = torch.where(x < pa, x * ip, (x - pa) * iq)
    return out


def _reciprocals(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """1/p and 1/(1 − p), clamped away from division by zero."""
    tiny = torch.finfo(p.dtype).tiny
    return 1 / p.clamp(min=tiny), 1 / (1 - p).clamp(min=tiny)


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
        stream: int = 6,
        fused: bool = True,
    ) -> None:
        super().__init__()
        if samples < 1:
            raise ValueError("samples (M) must be >= 1")
        if stimulus < 0:
            raise ValueError("stimulus must be >= 0")
        if fatigue_days <= 0:
            raise ValueError("fatigue_days must be > 0")
        for name, v in (("isolation_effect", isolation_effect), ("mask_effect", mask_effect),
                        ("test_sensitivity", test_sensitivity)):
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {v}")
        self.backend = backend or RuleBasedBackend()
        self.spec = spec or ArchetypeSpec()
        self.samples = samples
        self.stimulus = stimulus
        self.isolation_effect = isolation_effect
        self.mask_effect = mask_effect
        self.test_sensitivity = test_sensitivity
        self.fatigue_days = fatigue_days
        self.stream = stream
        self.fused = fused
        self.queries_per_day: list[int] = []
        self.last_probabilities: torch.Tensor | None = None  # [K, A] of the latest day
        self._static: tuple[object, torch.Tensor, torch.Tensor, int] | None = None
        self._scratch: dict[str, torch.Tensor] = {}  # reused work arrays (not nn buffers)
        self._flips: dict[str, bool] = {}

    def fatigue(self, day: int) -> float:
        """Pandemic fatigue, 0 at the start rising linearly to 1 after ``fatigue_days``."""
        return min(day / self.fatigue_days, 1.0)

    def _static_parts(self, attributes) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Static archetype code and area index (int32), computed once per population."""
        key = attributes["age_band"]
        if self._static is None or self._static[0] is not key:
            code = static_code(self.spec, attributes)
            area = attributes["area"].long() if "area" in attributes else torch.zeros_like(code)
            self._static = (key, code.int(), area.int(), int(area.max()) + 1)
        return self._static[1], self._static[2], self._static[3]

    def _buffer(self, name: str, n: int, dtype: torch.dtype, *, saved: bool = False) -> torch.Tensor:
        """A reused scratch tensor. ``saved=True`` marks tensors that autograd may keep for
        backward or that stay in the state: those are fresh while grad is on (numpy writes
        bypass torch's version counter) and ping-pong between two buffers otherwise."""
        if saved:
            if torch.is_grad_enabled():
                return torch.empty(n, dtype=dtype)
            flip = self._flips[name] = not self._flips.get(name, False)
            name = f"{name}{int(flip)}"
        buf = self._scratch.get(name)
        if buf is None or buf.numel() != n or buf.dtype != dtype:
            buf = self._scratch[name] = torch.empty(n, dtype=dtype)
        return buf

    def _use_kernels(self, state: State, ctx: StepContext) -> bool:
        return (self.fused and hard_forward(ctx.estimator) and state["I"].device.type == "cpu"
                and state["I"].dtype == torch.float32)

    def observe(self, state: State, ctx: StepContext) -> dict[str, torch.Tensor]:
        static, area, n_areas = self._static_parts(ctx.attributes)
        k = self.spec.count
        if self._use_kernels(state, ctx):
            n = static.numel()
            ids = self._buffer("ids", n, torch.int32)
            pair = self._buffer("pair", k * n_areas, torch.float64)
            area_inf = self._buffer("area_inf", n_areas, torch.float64)
            s, e, i = (state[c].detach().contiguous() for c in ("S", "E", "I"))
            observe_kernel(static.numpy(), area.numpy(), s.numpy(), e.numpy(), i.numpy(), n_areas,
                           ids.numpy(), pair.numpy(), area_inf.numpy())
            pair = pair.view(k, n_areas)
        else:
            ids = assign_archetypes(self.spec, ctx.attributes, state, static.long())
            area_l = area.long()
            area_inf = torch.zeros(n_areas, dtype=torch.float64, device=ids.device)
            area_inf.index_add_(0, area_l, state["I"].detach().double())
            pair = torch.bincount(ids * n_areas + area_l, minlength=k * n_areas).view(k, n_areas).double()
        area_prev = area_inf / pair.sum(0).clamp(min=1)
        counts = pair.sum(1)
        # each archetype's exposure: mean prevalence of its members' areas
        prev = (pair @ area_prev) / counts.clamp(min=1)
        return {"ids": ids, "counts": counts, "prevalence": prev}

    def query_table(self, day: int, counts: torch.Tensor, prevalence: torch.Tensor) -> torch.Tensor:
        """p_a(k, t) as a [K, A] float32 table: M queries per present archetype and action
        (absent archetypes get 0 and cost nothing); records the day's query count."""
        present = torch.nonzero(counts).squeeze(1).tolist()
        prev = prevalence.tolist()
        fatigue = self.fatigue(day)
        situations = [Situation(self.spec.decode(k), day, prev[k], fatigue, self.stimulus) for k in present]
        table = torch.zeros(self.spec.count, len(ACTIONS), dtype=torch.float32)
        batch = getattr(self.backend, "query_batch", None)
        if batch is not None and situations:
            answers = torch.as_tensor(batch(situations, self.samples), dtype=torch.float64)  # [K', A, M]
            if answers.shape != (len(present), len(ACTIONS), self.samples):
                raise BehaviourBackendError(f"query_batch returned shape {tuple(answers.shape)}")
            table[present] = answers.mean(-1).float()
        else:
            for row, situation in zip(present, situations, strict=True):
                for a, action in enumerate(ACTIONS):
                    replies = self.backend.query(situation, action, self.samples)
                    table[row, a] = sum(replies) / len(replies)
        self.queries_per_day.append(len(present) * len(ACTIONS) * self.samples)
        self.last_probabilities = table
        return table

    def policy(self, state, obs, ctx):
        table = self.query_table(ctx.day, obs["counts"], obs["prevalence"])
        return {"table": table.to(obs["ids"].device), "ids": obs["ids"]}

    def transition(self, state, action, ctx):
        table, ids, u = action["table"], action["ids"], ctx.uniforms[self.stream]
        if self._use_kernels(state, ctx):
            n = ids.numel()
            inv_p, inv_q = _reciprocals(table)
            infectious, tested = state["I"], state["tested_positive"]
            # without autograd the tested-positive update is fused into the kernel as well
            fuse = not (torch.is_grad_enabled() and (infectious.requires_grad or tested.requires_grad))
            reduction = self._buffer("reduction", n, torch.float32, saved=True)
            test = self._buffer("test", n if not fuse else 1, torch.float32, saved=True)
            positive = self._buffer("positive", n if fuse else 1, torch.float32, saved=True)
            sample_kernel(ids.numpy(), table.numpy(), inv_p.numpy(), inv_q.numpy(), u.contiguous().numpy(),
                          self.isolation_effect, self.mask_effect, self.test_sensitivity,
                          infectious.detach().contiguous().numpy(), tested.detach().contiguous().numpy(),
                          reduction.numpy(), test.numpy(), positive.numpy(), fuse)
            if not fuse:
                positive = torch.maximum(tested, infectious * test * self.test_sensitivity)
        else:
            p = table.T[:, ids.long()]  # [A, n]
            iso, mask, test = conditional_draws(p, u, ctx.estimator)
            reduction = 1 - (1 - self.isolation_effect * iso) * (1 - self.mask_effect * mask)
            positive = torch.maximum(state["tested_positive"], state["I"] * test * self.test_sensitivity)
        return {"behaviour": reduction, "tested_positive": positive}


def add_archetype_behaviour(model: SEIRM, policy: ArchetypePolicy | None = None, **kwargs) -> ArchetypePolicy:
    """Insert an :class:`ArchetypePolicy` after SEIRM's ``testing`` and before its
    ``isolation`` substep, with its own uniform stream. Voluntary tests thus join the day's
    routine positives before isolation reads them (inserted later, Testing overwrote them
    the next morning and the test action had no effect). Extra keyword arguments go to the
    policy."""
    stream = model.request_stream("behaviour")
    policy = policy or ArchetypePolicy(stream=stream, **kwargs)
    policy.stream = stream
    model.add_substep("behaviour", policy, before="isolation" if "isolation" in model.substeps else "infection")
    return policy

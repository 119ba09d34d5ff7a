"""Shared parts of the per-device state machines: inputs, phases, result, ring helpers."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

import torch

from protocols.envelope import MessageContext
from protocols.neighbourhood.errors import (
    NeighbourhoodError,
    ProtocolStateError,
    UnexpectedMessageError,
)
from protocols.neighbourhood.keyring import Keyring
from protocols.neighbourhood.messages import AgentPlan, Envelope, step_number
from protocols.neighbourhood.policy import NeighbourhoodPolicy, check_range
from protocols.ring import FixedPointRing

_MOD = 1 << 64


def wrap64(value: int) -> int:
    """Reduce a Python int to a signed 64-bit ring element."""
    value %= _MOD
    return value - _MOD if value >= 1 << 63 else value


class Phase(StrEnum):
    """Phases of a device state machine within one attempt."""

    IDLE = "idle"
    SENT = "sent"  # phase-1 messages are out
    RELAYED = "relayed"  # peer only: partials are out
    DONE = "done"


@dataclass(frozen=True)
class NeighbourSum:
    """What a target learns: ``value = sum_j w_ij I_j`` over ``real_contributors`` contacts."""

    target: str
    round: int
    attempt: int
    value: float
    contributors: int
    real_contributors: int


class DeviceBase:
    """Inputs, context checks and decoding common to both variants."""

    protocol: str

    def __init__(
        self,
        agent_id: str,
        run_id: str,
        *,
        keyring: Keyring | None = None,
        ring: FixedPointRing | None = None,
        policy: NeighbourhoodPolicy | None = None,
    ) -> None:
        self.agent_id = agent_id
        self.run_id = run_id
        self.keyring = keyring if keyring is not None else Keyring(agent_id, run_id)
        if self.keyring.owner != agent_id or self.keyring.run_id != run_id:
            raise NeighbourhoodError("keyring belongs to another agent or run")
        self.ring = ring or FixedPointRing()
        self.policy = policy or NeighbourhoodPolicy()
        self.phase = Phase.IDLE
        self.plan: AgentPlan | None = None
        self._last: tuple[int, int] = (-1, -1)
        self._weight_sum = 0.0

    # -------------------------------------------------------------- helpers
    def _begin(
        self,
        plan: AgentPlan,
        value: float,
        weights: Mapping[str, float] | None,
        weight_sum: float | None,
    ) -> dict[str, int]:
        """Validate a new attempt; return the encoded contribution per target."""
        if self.phase not in (Phase.IDLE, Phase.DONE):
            raise ProtocolStateError(f"start() called in phase {self.phase.value}")
        if (plan.round, plan.attempt) <= self._last:
            raise ProtocolStateError(
                f"round/attempt {(plan.round, plan.attempt)} not after {self._last}"
            )
        if not (math.isfinite(value) and 0.0 <= value <= 1.0):
            raise NeighbourhoodError(f"contribution must be in [0, 1], got {value!r}")
        weights = dict(weights or {})
        encoded: dict[str, int] = {}
        for nb in plan.memberships:
            if self.agent_id not in nb.roster:
                raise UnexpectedMessageError(f"{self.agent_id!r} not in roster of {nb.target!r}")
            w = float(weights.get(nb.target, 1.0))
            if not (math.isfinite(w) and w >= 0.0):
                raise NeighbourhoodError(f"weight for {nb.target!r} must be finite and >= 0")
            encoded[nb.target] = int(self.ring.encode(torch.tensor([w * value],
                                                                   dtype=torch.float64))[0])
        if plan.own is not None:
            default = float(plan.own.real_size)
            self._weight_sum = default if weight_sum is None else float(weight_sum)
            if not (math.isfinite(self._weight_sum) and self._weight_sum >= 0.0):
                raise NeighbourhoodError("weight_sum must be finite and >= 0")
        self.plan = plan
        self._last = (plan.round, plan.attempt)
        self.keyring.forget_before(plan.round)
        return encoded

    def _ctx(self, phase: int, sender: str, receiver: str) -> MessageContext:
        assert self.plan is not None
        return MessageContext(self.protocol, self.run_id, self.plan.round,
                              step_number(self.plan.attempt, phase), sender, receiver)

    def _check_context(self, env: Envelope, phase: int) -> None:
        expected = self._ctx(phase, env.context.sender, self.agent_id)
        if env.context != expected:
            raise UnexpectedMessageError(
                f"envelope context {env.context!r} does not match expected {expected!r}"
            )

    def _finish(self, total: int, n_summands: int, real: int | None = None) -> NeighbourSum:
        assert self.plan is not None and self.plan.own is not None
        decoded = self.ring.decode(torch.tensor([wrap64(total)], dtype=torch.int64))
        check_range(decoded, torch.tensor([self._weight_sum], dtype=torch.float64),
                    n_summands, self.ring.frac_bits, self.policy.range_tolerance_ulps,
                    self.policy.effective_noise_bound)
        value = float(decoded[0])
        if self.policy.noisy:
            value = min(max(value, 0.0), self._weight_sum)
        return NeighbourSum(self.agent_id, self.plan.round, self.plan.attempt,
                            value, n_summands,
                            self.plan.own.real_size if real is None else real)

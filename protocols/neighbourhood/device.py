"""Shared parts of the per-device state machines: inputs, phases, result, ring helpers."""

from __future__ import annotations

import math
import sys
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from enum import StrEnum

import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from protocols.envelope import MessageContext
from protocols.neighbourhood.errors import (
    NeighbourhoodError,
    NeighbourSumOutOfRangeError,
    PlanRejectedError,
    ProtocolStateError,
    UnexpectedMessageError,
)
from protocols.neighbourhood.keyring import Keyring
from protocols.neighbourhood.messages import (
    DUMMY_PREFIX,
    RELAY_ID,
    AgentPlan,
    Envelope,
    Neighbourhood,
    step_number,
)
from protocols.neighbourhood.policy import BelowMinimum, NeighbourhoodPolicy, check_range
from protocols.ring import FixedPointRing, RingOverflowError

_MOD = 1 << 64
_ZERO_NONCE = bytes(16)


def encode_scalar(ring: FixedPointRing, x: float) -> int:
    """``int(ring.encode(torch.tensor([x]))[0])`` without the tensor round trip (~140 µs per
    call, once per target per device per round): the same checks (finite, headroom) and the
    same rounding (IEEE product, round half to even, as ``torch.round``)."""
    if not math.isfinite(x):
        raise RingOverflowError("cannot encode NaN or infinite values")
    ring.check_headroom(abs(x), 1)
    return round(x * ring.scale)


def decode_scalar(ring: FixedPointRing, element: int) -> float:
    """``float(ring.decode(torch.tensor([element]))[0])`` for one signed 64-bit element:
    the same split into an integer and a fractional part, the same float64 operations."""
    high = element // ring.scale  # floor division, as torch.div(..., rounding_mode="floor")
    low = element - high * ring.scale
    return float(high) + float(low) / ring.scale


def keystream_element(key: bytes) -> int:
    """``int(protocols.keys.ring_keystream(key, 1)[0])``: the first ring element of the
    ChaCha20 keystream under ``key`` (zero nonce), without a tensor (a third of the cost)."""
    if len(key) != 32:
        raise NeighbourhoodError("keystream key must be 32 bytes")
    enc = Cipher(algorithms.ChaCha20(key, _ZERO_NONCE), mode=None).encryptor()
    return int.from_bytes(enc.update(bytes(8)), sys.byteorder, signed=True)


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


def is_relay_party(ident: str) -> bool:
    """The relay itself or one of its dummy contacts."""
    return ident == RELAY_ID or ident.startswith(DUMMY_PREFIX)


class DeviceBase:
    """Inputs, plan checks, context checks and decoding common to both variants.

    ``contacts``: the device's own contacts (from its own store, never from the relay). The
    device serves only targets among them, and accepts as its own neighbourhood only a
    roster of its contacts (plus relay-run dummies when the policy pads). When ``contacts``
    is ``None`` the keys of the ``weights`` given to ``start`` are used; with neither, a
    plan that asks anything of the device is refused. ``relay_run`` marks the relay's own
    dummy parties, which serve any target the relay names. ``value_bound`` (default ``None``:
    contributions in [0, 1], sums in [0, W]) admits signed contributions in [−b, b] and sums
    in [−bW, bW] (forward tangents: a dropped contact is simply left out, as for values).
    """

    protocol: str

    def __init__(
        self,
        agent_id: str,
        run_id: str,
        *,
        keyring: Keyring | None = None,
        ring: FixedPointRing | None = None,
        policy: NeighbourhoodPolicy | None = None,
        contacts: Collection[str] | None = None,
        relay_run: bool = False,
        value_bound: float | None = None,
    ) -> None:
        if value_bound is not None and not (math.isfinite(value_bound) and value_bound > 0):
            raise NeighbourhoodError("value_bound must be finite and > 0")
        self.value_bound = value_bound
        if not isinstance(agent_id, str) or not isinstance(run_id, str):
            raise NeighbourhoodError("agent_id and run_id must be str")
        if is_relay_party(agent_id) and not relay_run:
            raise NeighbourhoodError(f"reserved identifier {agent_id!r}")
        self.contacts = None if contacts is None else frozenset(contacts)
        self.relay_run = relay_run
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
        if not isinstance(plan, AgentPlan):
            raise NeighbourhoodError("plan must be an AgentPlan")
        lo, hi = (0.0, 1.0) if self.value_bound is None else \
            (-self.value_bound, self.value_bound)
        if (not isinstance(value, (int, float)) or isinstance(value, bool)
                or not (math.isfinite(value) and lo <= value <= hi)):
            raise NeighbourhoodError(f"contribution must be in [{lo}, {hi}], got {value!r}")
        known = self.contacts if self.contacts is not None else (
            None if weights is None else frozenset(weights))
        self.verify_plan(plan, known)
        weights = dict(weights or {})
        encoded: dict[str, int] = {}
        for nb in plan.memberships:
            w = weights.get(nb.target, 1.0)
            if not isinstance(w, (int, float)) or isinstance(w, bool):
                raise NeighbourhoodError(f"weight for {nb.target!r} must be a number")
            w = float(w)
            if not (math.isfinite(w) and w >= 0.0):
                raise NeighbourhoodError(f"weight for {nb.target!r} must be finite and >= 0")
            encoded[nb.target] = encode_scalar(self.ring, w * value)
        if plan.own is not None:
            default = float(plan.own.real_size)
            self._weight_sum = default if weight_sum is None else float(weight_sum)
            if not (math.isfinite(self._weight_sum) and self._weight_sum >= 0.0):
                raise NeighbourhoodError("weight_sum must be finite and >= 0")
        self.plan = plan
        self._last = (plan.round, plan.attempt)
        self.keyring.forget_before(plan.round)
        return encoded

    def _check_roster(self, nb: Neighbourhood) -> None:
        policy = self.policy
        real = [c for c in nb.roster if not c.startswith(DUMMY_PREFIX)]
        if RELAY_ID in nb.roster:
            raise PlanRejectedError(f"roster of {nb.target!r} names the relay as a member")
        if nb.real_size != len(real):
            raise PlanRejectedError(f"roster of {nb.target!r} claims {nb.real_size} real "
                                    f"members but names {len(real)}")
        if len(nb.roster) < policy.min_size:
            raise PlanRejectedError(f"roster of {nb.target!r} has {len(nb.roster)} members, "
                                    f"below the minimum {policy.min_size}")
        if policy.below_minimum is BelowMinimum.REFUSE and len(real) < policy.min_size:
            raise PlanRejectedError(f"roster of {nb.target!r} has {len(real)} real members, "
                                    f"below the minimum {policy.min_size}")

    def verify_plan(self, plan: AgentPlan, contacts: frozenset[str] | None) -> None:
        """Refuse a plan that asks this device to serve a target that is not its contact,
        the relay or a dummy, or a roster below the policy (:class:`PlanRejectedError`)."""
        if plan.memberships and contacts is None and not self.relay_run:
            raise PlanRejectedError("the device has no contact list to check the plan")
        for nb in plan.memberships:
            if is_relay_party(nb.target) or nb.target == self.agent_id:
                raise PlanRejectedError(f"target {nb.target!r} is the relay, a relay-run "
                                        "dummy or this device")
            if not self.relay_run and nb.target not in contacts:  # type: ignore[operator]
                raise PlanRejectedError(f"target {nb.target!r} is not one of this device's "
                                        "contacts")
            if self.agent_id not in nb.roster:
                raise UnexpectedMessageError(f"{self.agent_id!r} not in roster of "
                                             f"{nb.target!r}")
            self._check_roster(nb)
        own = plan.own
        if own is not None:
            if self.relay_run or own.target != self.agent_id:
                raise PlanRejectedError("own neighbourhood names another target")
            self._check_roster(own)
            # the own roster is checked against an explicit contact list only (weights name
            # the targets this device serves, which need not be the contacts it listens to)
            mine = self.contacts
            foreign = [] if mine is None else [
                c for c in own.roster if not c.startswith(DUMMY_PREFIX) and c not in mine]
            if foreign:
                raise PlanRejectedError(f"own roster names non-contacts {sorted(foreign)[:3]}")

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
        value = decode_scalar(self.ring, wrap64(total))
        slack = n_summands * (self.policy.range_tolerance_ulps * 2.0**-self.ring.frac_bits) \
            + self.policy.effective_noise_bound
        if self.value_bound is not None:  # signed contributions: |sum| <= b·W
            top = self.value_bound * self._weight_sum
            if not (-top - slack <= value <= top + slack):
                raise NeighbourSumOutOfRangeError(f"neighbour sum {value} outside [-{top}, {top}] "
                                      f"(± {slack})")
            if self.policy.noisy:
                value = min(max(value, -top), top)
            return NeighbourSum(self.agent_id, self.plan.round, self.plan.attempt, value,
                                n_summands, self.plan.own.real_size if real is None else real)
        if not (-slack <= value <= self._weight_sum + slack):  # the tensor check raises
            check_range(torch.tensor([value], dtype=torch.float64),
                        torch.tensor([self._weight_sum], dtype=torch.float64),
                        n_summands, self.ring.frac_bits, self.policy.range_tolerance_ulps,
                        self.policy.effective_noise_bound)
        if self.policy.noisy:
            value = min(max(value, 0.0), self._weight_sum)
        return NeighbourSum(self.agent_id, self.plan.round, self.plan.attempt,
                            value, n_summands,
                            self.plan.own.real_size if real is None else real)

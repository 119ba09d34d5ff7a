"""The daily wire format of a federated hybrid run: one home for the record keys, message
types, report fields and the typed day messages that the coordinator's ServerApp and the
edge agent's ClientApp exchange. Transport-agnostic: every message is a flat ``dict`` of
primitives (str, int, float, bool, bytes, lists of them), which Flower carries in a
``ConfigRecord`` named :attr:`Keys.RECORD` and the fleet's device host carries as it is.

A day ``d`` is one :class:`DayRequest` per device: the relay's delivery for day ``d − 1``,
the neighbourhood plan of day ``d`` and the public parameters θ of the model; the reply
(:class:`DayReply`) carries the device's report of day ``d − 1`` for multi-round SecAgg+
(:mod:`protocols.secagg.epoch_client`) and its masked neighbourhood contributions of day
``d``. SecAgg+ keys are agreed once per *epoch* of days: on the first day of an epoch the
request carries the epoch's public config and the reply the device's key advertisement;
the roster then comes in the ``masked_input`` stage, whose reply is the masked report. On
every later day of the epoch the masked report rides in the day reply itself. Two more
stages follow each day (:data:`SECAGG_STAGES`): ``consistency`` (the device signs the
survivor set) and ``unmask``. Every SecAgg+ message is bound to run, epoch, day and stage
by its header and the epoch's keys.
"""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

__all__ = [
    "Keys",
    "MessageType",
    "REPORT_FIELDS",
    "SECAGG_STAGES",
    "EXCHANGES",
    "SECAGG_ATTEMPTS",
    "secagg_day",
    "WireFormatError",
    "EnrolRequest",
    "EnrolReply",
    "DayRequest",
    "DayReply",
    "StageRequest",
    "StageReply",
    "report_spec_bound",
    "TANGENT_BOUND",
    "value_round",
    "tangent_round",
]

#: Per-device daily report, in this order (SecAgg+ input vector). ``count`` is 1 per
#: reporting device, so the aggregate says how many reports it sums.
#: ``d_new_dbeta`` is the device's full-path tangent ∂new_i/∂β (run config ``tangents``; 0
#: without it), ``dp_dbeta`` Eq. 11's one-step derivative.
REPORT_FIELDS: tuple[str, ...] = ("S", "I", "R", "new_infections", "p", "dp_dbeta",
                                  "d_new_dbeta", "count")

#: Public bound B on a device's |∂I_i/∂β|: the tangent round's agents take signed
#: contributions in [−B, B] (``value_bound``), so a contact that drops out is left out of
#: the tangent sum exactly as of the value sum.
TANGENT_BOUND = 1024.0


def value_round(day: int, tangents: bool) -> int:
    """Neighbourhood round of day ``day``'s value sum (``2·day`` when tangents ride in a
    second round ``2·day + 1``, else ``day``)."""
    return 2 * day if tangents else day


def tangent_round(day: int) -> int:
    """Neighbourhood round of day ``day``'s tangent sum."""
    return 2 * day + 1


#: SecAgg+ stages after the day message. ``masked_input`` (roster in, masked report out)
#: happens only on the first day of a key epoch; on other days the day reply carries the
#: masked report.
SECAGG_STAGES: tuple[str, ...] = ("masked_input", "consistency", "unmask")

#: Every exchange of a day, in order (``day`` = the :class:`DayRequest`).
EXCHANGES: tuple[str, ...] = ("day", *SECAGG_STAGES)

#: Attempts at one day's SecAgg+ sum within a key epoch: a day that aborts *before anything
#: is revealed* (the consistency round found a survivor that can no longer answer) is run
#: again in the same epoch (a ``masked_input`` stage whose payload is the attempt number);
#: a device that revealed anything for a day never masks that day again.
SECAGG_ATTEMPTS = 4


def secagg_day(day: int, attempt: int = 0) -> int:
    """The SecAgg+ protocol day of attempt ``attempt`` at report day ``day`` (masks, tags
    and messages are bound to it)."""
    if not 0 <= attempt < SECAGG_ATTEMPTS or day < 0:
        raise WireFormatError(f"no SecAgg+ day for report day {day}, attempt {attempt}")
    return day * SECAGG_ATTEMPTS + attempt


def report_spec_bound() -> float:
    """Clip bound of every report entry (states and p are in [0, 1]; ∂p/∂β ≤ 1/e·max Σ)."""
    return 64.0


class WireFormatError(ValueError):
    """A message is missing a field or has one of the wrong type."""


class Keys:
    """Stable record names."""

    RECORD = "cfg"  # the one ConfigRecord in every message's RecordDict
    DEVICE_STATE = "device"  # the device's ConfigRecord in its node state


class MessageType:
    """Flower message types (``query.<action>``)."""

    ENROL = "query.enrol"
    DAY = "query.day"
    STAGE = "query.stage"

    @staticmethod
    def action(message_type: str) -> str:
        return message_type.partition(".")[2]


class _Wire:
    """dict <-> dataclass with type checks (bytes lists and floats coerced)."""

    def to_dict(self) -> dict[str, Any]:
        return dict(asdict(self))  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, d: Any) -> Any:
        kw: dict[str, Any] = {}
        for f in fields(cls):  # type: ignore[arg-type]
            if f.name not in d:
                if f.default is MISSING and f.default_factory is MISSING:
                    raise WireFormatError(f"{cls.__name__}: missing field {f.name!r}")
                continue
            v = d[f.name]
            kw[f.name] = _coerce(cls.__name__, f.name, f.type, v)
        try:
            return cls(**kw)
        except TypeError as exc:
            raise WireFormatError(f"{cls.__name__}: {exc}") from None


def _coerce(owner: str, name: str, typ: Any, v: Any) -> Any:
    t = str(typ)
    try:
        if t.startswith("list[bytes]"):
            return [bytes(b) for b in v]
        if t.startswith("list[int]"):
            return [int(b) for b in v]
        if t.startswith("list[float]"):
            return [float(b) for b in v]
        if t.startswith("bytes"):
            return bytes(v)
        if t.startswith("bool"):
            return bool(v)
        if t.startswith("int"):
            return int(v)
        if t.startswith("float"):
            return float(v)
        if t.startswith("str"):
            return str(v)
    except (TypeError, ValueError) as exc:
        raise WireFormatError(f"{owner}.{name}: {exc}") from None
    return v


@dataclass
class EnrolRequest(_Wire):
    """Run settings for one device. ``uniform_seed`` and the initial ``S, I, R`` are used
    only in the explicit equivalence-test mode (``shared_seed``): then the device draws its
    events from the public (seed, day) uniforms at its ``index`` and the run equals the
    central run. Otherwise the device draws its initial status (I with probability
    ``initial_infected``) and its events with a CSPRNG seed it makes itself and never sends,
    or takes its status from its user."""

    agent_id: str
    run_id: str
    n: int
    index: int
    degree: float
    beta: float  # the device's own dynamics (a simulated device); θ comes per day
    gamma: float
    S: float
    I: float  # noqa: E741
    R: float
    weights: str  # JSON {contact handle: weight}
    weight_sum: float
    frac_bits: int
    secagg_index: int
    initial_infected: float = 0.0
    shared_seed: bool = False
    uniform_seed: int = 0
    resume_day: int = 0  # > 0: the run resumes at this day; the device restores its state
    # at the end of day resume_day − 1 from its store (or refuses to enrol)
    tangents: bool = False  # carry ∂state/∂β forward (a second neighbourhood round a day)
    estimator: str = "straight_through"  # the device's own step (simulation.estimators)


@dataclass
class EnrolReply(_Wire):
    nb_pub: bytes
    identity: bytes  # Ed25519 public key for SecAgg+ signatures


@dataclass
class DayRequest(_Wire):
    """One day's message to a device (see the module docstring)."""

    day: int  # the day being planned (== delivery day + 1)
    theta_beta: float  # β of the model at which the report's p and ∂p/∂β are evaluated
    has_delivery: bool
    has_plan: bool
    delivery: list[bytes] = field(default_factory=list)
    mask_sum: bytes = b""
    plan: str = ""  # JSON AgentPlan
    keys: str = ""  # JSON {party: hex public key}
    # SecAgg+ key epoch of the report of day − 1 (−1: no report round today). On the first
    # day of an epoch, ``secagg_config`` is its RoundConfig and the registry fields hold
    # the identity keys of the device itself and its SecAgg+ neighbours only (roster
    # indices): O(degree) per device, never the whole roster. Empty on later days.
    secagg_epoch: int = -1
    secagg_config: bytes = b""
    registry_index: list[int] = field(default_factory=list)
    registry: list[bytes] = field(default_factory=list)
    # tangents (run config ``tangents``): the second round's delivery and plan
    tdelivery: list[bytes] = field(default_factory=list)
    tmask_sum: bytes = b""
    tplan: str = ""  # JSON AgentPlan of round tangent_round(day)
    tkeys: str = ""


@dataclass
class DayReply(_Wire):
    report_day: int = -1
    advertise: bytes = b""  # SecAgg+ key advertisement (first day of a key epoch)
    masked: bytes = b""  # the masked report of ``report_day`` (later days of the epoch)
    envelopes: list[bytes] = field(default_factory=list)
    tenvelopes: list[bytes] = field(default_factory=list)  # the tangent round's contributions
    caught_up: int = 0  # days the device simulated alone after being offline


@dataclass
class StageRequest(_Wire):
    stage: str
    day: int
    payload: bytes


@dataclass
class StageReply(_Wire):
    payload: bytes

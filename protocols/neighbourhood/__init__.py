"""Secure neighbourhood sum: each agent learns only ``sum_{j in N(i)} w_ij * I_j``.

Two variants (:class:`Variant`): *peer* (GMW-style additive sharing among the contacts,
O(n_i^2) messages) and *assisted* (coordinator-known masks, O(n_i) messages). Two modes:
per-device state machines (:mod:`.peer`, :mod:`.assisted`, relay side :mod:`.relay`) and the
vectorised fleet mode (:mod:`.fleet`). See ``docs/neighbourhood.md``.
"""

from protocols.neighbourhood.assisted import AssistedNeighbourhoodAgent
from protocols.neighbourhood.device import NeighbourSum
from protocols.neighbourhood.errors import (
    CulpritError,
    MalformedMessageError,
    MissingMessageError,
    NeighbourhoodError,
    NeighbourSumOutOfRangeError,
    PlanRejectedError,
    ProtocolStateError,
    UnexpectedMessageError,
)
from protocols.neighbourhood.fleet import FleetNeighbourhoodSum, FleetStepResult, FleetStepStats
from protocols.neighbourhood.keyring import Keyring, PartyKeys
from protocols.neighbourhood.messages import AgentPlan, Envelope, Neighbourhood
from protocols.neighbourhood.peer import PeerNeighbourhoodAgent
from protocols.neighbourhood.policy import (
    BelowMinimum,
    NeighbourhoodPolicy,
    Outcome,
    Variant,
    check_range,
)
from protocols.neighbourhood.relay import NeighbourhoodRelay

__all__ = [
    "AgentPlan",
    "AssistedNeighbourhoodAgent",
    "BelowMinimum",
    "CulpritError",
    "Envelope",
    "FleetNeighbourhoodSum",
    "FleetStepResult",
    "FleetStepStats",
    "Keyring",
    "MalformedMessageError",
    "MissingMessageError",
    "Neighbourhood",
    "NeighbourhoodError",
    "NeighbourhoodPolicy",
    "NeighbourhoodRelay",
    "NeighbourSum",
    "NeighbourSumOutOfRangeError",
    "Outcome",
    "PartyKeys",
    "PlanRejectedError",
    "PeerNeighbourhoodAgent",
    "ProtocolStateError",
    "UnexpectedMessageError",
    "Variant",
    "check_range",
]

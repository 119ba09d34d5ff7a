"""Secure aggregation (multi-round SecAgg+, Bell et al. 2020, with the consistency round of
Bonawitz et al. 2017 §4): the coordinator learns only sums of surviving clients, also if it
deviates.

Keys are agreed once per epoch (advertise → roster); each day: masked input → consistency
(pairwise tags on the survivor set) → unmask. Clients
(:class:`protocols.secagg.epoch_client.EpochClient`) and server
(:class:`protocols.secagg.epoch_server.EpochServer`) are explicit state machines exchanging
bytes (:mod:`protocols.secagg.epoch_messages`); a transport (Flower, the fleet, or the
in-process :mod:`protocols.secagg.local`) only relays them. Masks come from ChaCha20
keystreams under HKDF-derived 256-bit keys, each day's derived with the day in the context;
dropout recovery uses Shamir sharing over GF(2^127 − 1) on a k-regular random neighbour
graph of degree O(log n).
"""

from protocols.secagg.config import RoundConfig, default_degree, default_threshold
from protocols.secagg.errors import (
    BadSignatureError,
    ConfigError,
    InputError,
    MalformedMessageError,
    MisroutedMessageError,
    OversizedMessageError,
    ProtocolViolationError,
    ReplayedMessageError,
    SecAggAbortError,
    SecAggError,
    StageError,
    StaleMessageError,
    TamperedMessageError,
    TamperedShareError,
)
from protocols.secagg.quantize import InputSpec

__all__ = [
    "BadSignatureError",
    "ConfigError",
    "InputError",
    "InputSpec",
    "MalformedMessageError",
    "MisroutedMessageError",
    "OversizedMessageError",
    "ProtocolViolationError",
    "ReplayedMessageError",
    "RoundConfig",
    "SecAggAbortError",
    "SecAggError",
    "StageError",
    "StaleMessageError",
    "TamperedMessageError",
    "TamperedShareError",
    "default_degree",
    "default_threshold",
]

"""Secure aggregation (SecAgg+, Bell et al. 2020) for a semi-honest server.

Rounds: advertise keys → share keys → masked input → unmasking. Clients and server are
explicit state machines exchanging bytes (:mod:`protocols.secagg.messages`); a transport
(Flower, HTTP, or the in-process :func:`protocols.secagg.local.run_round`) only relays them.
Masks come from ChaCha20 keystreams under HKDF-derived 256-bit keys; dropout recovery uses
Shamir sharing over GF(2^127 − 1) on a k-regular random neighbour graph of degree O(log n).
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

"""Exceptions of secure aggregation: one class per way a message or a round can fail.

Every rejection leaves the receiving state machine unchanged, so a transport may drop the
offending message and carry on.
"""

from __future__ import annotations

from protocols.ring import RingOverflowError


class SecAggError(ValueError):
    """Base class for every secure-aggregation failure."""


class MalformedMessageError(SecAggError):
    """Bytes do not parse as the expected message (magic, type, lengths, indices)."""


class OversizedMessageError(MalformedMessageError):
    """A message or one of its fields exceeds the configured size limit."""


class StageError(SecAggError):
    """A message or call arrived in the wrong protocol stage."""


class StaleMessageError(SecAggError):
    """A message belongs to another run or round (e.g. replayed from an earlier round)."""


class MisroutedMessageError(SecAggError):
    """A message names another receiver, or a sender that did not send it."""


class ReplayedMessageError(SecAggError):
    """A second message from the same sender for the same stage."""


class BadSignatureError(SecAggError):
    """A signed key advertisement does not verify under the sender's identity key."""


class TamperedMessageError(SecAggError):
    """A client–server message failed its HMAC (tampered, or keyed for another party)."""


class TamperedShareError(SecAggError):
    """An encrypted share failed authentication (tampered, misrouted or replayed)."""


class ProtocolViolationError(SecAggError):
    """A well-formed message that the protocol forbids (unknown peer, inconsistent sets,
    a request that would reveal both shares of one peer)."""


class SecAggAbortError(SecAggError):
    """Too many dropouts: the round is aborted before anything is unmasked."""


class ConfigError(SecAggError):
    """Public round parameters that are malformed or below the documented security level
    (e.g. a threshold that one or a minority of neighbours could meet)."""


class InputError(SecAggError, RingOverflowError):
    """A client input has the wrong shape or type, or its sum could overflow the ring."""

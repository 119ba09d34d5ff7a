"""Exceptions of the secure neighbourhood sum."""

from __future__ import annotations


class NeighbourhoodError(Exception):
    """Base class for every neighbourhood-sum failure."""


class ProtocolStateError(NeighbourhoodError):
    """A state-machine method was called in the wrong phase or twice."""


class MalformedMessageError(NeighbourhoodError):
    """A payload could not be parsed, or its shape does not match the plan."""


class UnexpectedMessageError(NeighbourhoodError):
    """A message came from a party that is not in the plan, or was duplicated."""


class NeighbourSumOutOfRangeError(NeighbourhoodError):
    """A decoded sum lies outside ``[0, sum(w)]``: tampering or a protocol fault."""


class MissingMessageError(NeighbourhoodError):
    """A message the plan requires did not arrive and the relay did not abort the step."""


class PlanRejectedError(NeighbourhoodError):
    """A device refuses the relay's plan: a target that is not its contact, the relay or a
    relay-run dummy as target, or a roster below the policy's minimum size."""


class CulpritError(NeighbourhoodError):
    """A named party sent something provably wrong (``culprit``); it is excluded, not the
    party that received it."""

    def __init__(self, culprit: str, message: str) -> None:
        super().__init__(f"{culprit!r}: {message}")
        self.culprit = culprit

"""Errors of the institutional MPC protocol (one hierarchy, rooted at :class:`MPCError`)."""

from __future__ import annotations

__all__ = [
    "BudgetExhausted",
    "DataRejected",
    "DealerError",
    "MPCError",
    "MalformedMessage",
    "QueryRefused",
]


class MPCError(RuntimeError):
    """A party received inconsistent shapes, values out of range, or a round failed."""


class MalformedMessage(MPCError):
    """A protocol message does not parse (truncated, oversized, wrong version or shape)."""


class QueryRefused(MPCError):
    """An institution refused a query it could not verify (not the public model's output,
    parameters out of the public box, or different bytes than its peers received)."""


class BudgetExhausted(QueryRefused):
    """The per-run query budget is spent; the institution answers no more rounds."""


class DataRejected(MPCError):
    """An institution's own series is unusable (negative, missing or above the public bound)."""


class DealerError(MPCError):
    """The correlated-randomness dealer got a request it does not serve."""

"""The population package's exception type."""

from __future__ import annotations

__all__ = ["PopulationError"]


class PopulationError(ValueError):
    """Invalid population, graph, marginal table or preset."""

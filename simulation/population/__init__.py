"""Synthetic populations: agents built from census marginals and contact layers that match
published setting-specific contact matrices.

Graphs are CSR with int64 ``indptr`` and int32 ``indices`` (optional float32 weights),
symmetric, without self-loops; nothing N×N is ever built. Populations are stored as Parquet,
never pickled. Generation is deterministic for a seed (NumPy PCG64: modelling randomness, not
cryptography). Modules: ``marginals`` (the CSV format), ``ipf``, ``contacts`` (Prem et al.
matrices), ``build`` (one area), ``presets`` (whole cities), ``store`` (Parquet),
``report`` (how well marginals and matrices are reproduced), ``boroughs`` (NYC table).
"""

from simulation.population.boroughs import BOROUGH_NAMES, BOROUGH_POPULATION, BOROUGHS
from simulation.population.build import LAYERS, BuildOptions
from simulation.population.contacts import ContactMatrices, load_contact_matrices
from simulation.population.errors import PopulationError
from simulation.population.graph import ContactGraph, CSRLayer, random_contact_graph
from simulation.population.marginals import Marginals, bundled_marginals, load_marginals
from simulation.population.presets import (
    PRESETS,
    PopulationPreset,
    build_population,
    synthesize,
    write_population,
)
from simulation.population.store import SCHEMA_VERSION, Population

# Ten-year age bands of the ``age_band`` attribute: 0-9, 10-19, ..., 80+.
AGE_BANDS = ("0-9", "10-19", "20-29", "30-39", "40-49", "50-59", "60-69", "70-79", "80+")

__all__ = [
    "AGE_BANDS",
    "BOROUGHS",
    "BOROUGH_NAMES",
    "BOROUGH_POPULATION",
    "LAYERS",
    "PRESETS",
    "SCHEMA_VERSION",
    "BuildOptions",
    "CSRLayer",
    "ContactGraph",
    "ContactMatrices",
    "Marginals",
    "Population",
    "PopulationError",
    "PopulationPreset",
    "build_population",
    "bundled_marginals",
    "load_contact_matrices",
    "load_marginals",
    "random_contact_graph",
    "synthesize",
    "write_population",
]

"""Epidemic models built from substeps: the Private-ABM SIR and a SEIRM with interventions."""

from simulation.models.seirm import SEIRM
from simulation.models.sir import SIR, infection_probability, infection_probability_dbeta

__all__ = ["SEIRM", "SIR", "infection_probability", "infection_probability_dbeta"]

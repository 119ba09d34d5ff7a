"""Calibration of simulators to data: observation model, count losses, point fits (Adam),
generalised variational inference, CalibNN, sensitivity analysis, and the NYC case data."""

from simulation.calibration.data import CaseSeries, load_nyc_cases
from simulation.calibration.losses import LOSSES, log_mse, negbin_nll, poisson_nll
from simulation.calibration.observation import ObservationModel
from simulation.calibration.point import CalibrationResult, calibrate

__all__ = [
    "LOSSES",
    "CalibrationResult",
    "CaseSeries",
    "ObservationModel",
    "calibrate",
    "load_nyc_cases",
    "log_mse",
    "negbin_nll",
    "poisson_nll",
]

"""The forecast model's interface, shared by exporter and device: layers, input/output names
and shapes, θ. Torch-free, so a device can verify and run a bundle without torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

LAYERS: tuple[str, ...] = ("household", "work", "community")
"""Contact layers, in column order of ``contacts`` and ``prevalence``."""

ISOLATION_APPLIES: tuple[float, ...] = (0.0, 1.0, 1.0)
"""a_l: 1 where the isolation factor removes contacts of layer l, 0 where it does not."""

STATE_FIELDS: tuple[str, ...] = ("susceptible", "age_susceptibility", "baseline_degree")
"""Layout of the ``state`` input vector."""

THETA_FIELDS: tuple[str, ...] = ("beta", "dt")
"""Layout of the ``theta`` input vector."""

INPUT_NAMES: tuple[str, ...] = (
    "state",
    "contacts",
    "isolation",
    "mask",
    "prevalence",
    "theta",
    "uniforms",
)
OUTPUT_NAMES: tuple[str, ...] = ("risk", "daily_risk", "drisk_dbeta", "mc_infection_day")

DEFAULT_HORIZON = 7


@dataclass(frozen=True)
class Theta:
    """Calibrated parameters θ the coordinator ships with a bundle."""

    beta: float = 0.5
    dt: float = 1.0

    def as_tensor(self) -> Any:
        """θ as the model's float32 ``theta`` input (a torch tensor)."""
        import torch  # local: the device side never needs torch

        return torch.tensor([self.beta, self.dt], dtype=torch.float32)


def io_schema(layers: int) -> dict[str, list[dict[str, Any]]]:
    """Input/output names, dtypes and symbolic shapes (T days, K options, M samples)."""
    L = str(layers)
    shapes_in = {
        "state": [str(len(STATE_FIELDS))],
        "contacts": ["K", L],
        "isolation": ["K"],
        "mask": ["K"],
        "prevalence": ["T", L],
        "theta": [str(len(THETA_FIELDS))],
        "uniforms": ["T", "M", "K"],
    }
    shapes_out = {
        "risk": ["K"],
        "daily_risk": ["T", "K"],
        "drisk_dbeta": ["K"],
        "mc_infection_day": ["M", "K"],
    }
    return {
        "inputs": [{"name": n, "dtype": "float32", "shape": shapes_in[n]} for n in INPUT_NAMES],
        "outputs": [{"name": n, "dtype": "float32", "shape": shapes_out[n]} for n in OUTPUT_NAMES],
    }

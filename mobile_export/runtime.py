"""Run a verified forecast bundle in onnxruntime (CPU): the device-side half of mobile_export.

Only :func:`load_verified_bundle` creates a :class:`ForecastSession`, so nothing reaches
onnxruntime before its signature and hash have been checked.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
import onnxruntime as ort

from mobile_export.bundle import PublicKey, VerifiedBundle, read_verified_bundle
from mobile_export.errors import BundleSchemaError, ForecastInputError
from mobile_export.schema import INPUT_NAMES, OUTPUT_NAMES, STATE_FIELDS, Theta

ArrayLike = np.ndarray | Sequence[Any]


@dataclass(frozen=True)
class ForecastResult:
    """One query's answer for K options over T days (M Monte Carlo samples, maybe 0)."""

    risk: np.ndarray  # (K,) P(infected within T days), expected value
    daily_risk: np.ndarray  # (T, K) cumulative risk at the end of each day
    drisk_dbeta: np.ndarray  # (K,) closed-form ∂risk/∂β
    mc_infection_day: np.ndarray  # (M, K) int64 day of infection per sample, −1 = none

    @property
    def mc_risk(self) -> np.ndarray | None:
        """Monte Carlo estimate of ``risk`` (fraction of samples infected), None if M = 0."""
        if self.mc_infection_day.shape[0] == 0:
            return None
        return (self.mc_infection_day >= 0).mean(axis=0)

    def ranking(self) -> np.ndarray:
        """Option indices, lowest expected risk first (stable on ties)."""
        return np.argsort(self.risk, kind="stable")


def _array(name: str, value: ArrayLike, shape: tuple[int | None, ...]) -> np.ndarray:
    try:
        arr = np.ascontiguousarray(value, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise ForecastInputError(f"{name} is not numeric: {exc}") from exc
    if arr.ndim != len(shape) or any(
        want is not None and got != want for got, want in zip(arr.shape, shape, strict=True)
    ):
        raise ForecastInputError(f"{name} has shape {arr.shape}, expected {shape}")
    if not np.isfinite(arr).all():
        raise ForecastInputError(f"{name} has non-finite values")
    return arr


def _in_unit(name: str, arr: np.ndarray, *, upper_open: bool = False) -> None:
    if arr.size and (arr.min() < 0 or arr.max() > 1 or (upper_open and arr.max() >= 1)):
        raise ForecastInputError(f"{name} must lie in [0, 1{')' if upper_open else ']'}")


class ForecastSession:
    """An onnxruntime session over a verified bundle's model."""

    def __init__(self, bundle: VerifiedBundle, *, threads: int = 1) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.add_session_config_entry("session.load_model_format", "ORT")
        options.add_session_config_entry("session.use_ort_model_bytes_directly", "1")
        self._model = bundle.model  # the session may read these bytes directly: keep them alive
        try:
            self._session = ort.InferenceSession(
                self._model, options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime's own exception types
            raise BundleSchemaError(f"onnxruntime refused the verified model: {exc}") from exc
        self.manifest = bundle.manifest
        self.theta = bundle.theta
        self.created = bundle.created
        self.layers: tuple[str, ...] = tuple(bundle.manifest["layers"])
        self.default_horizon: int = bundle.manifest["default_horizon"]
        self._check_schema()

    def _check_schema(self) -> None:
        got_in = [(i.name, len(i.shape), i.type) for i in self._session.get_inputs()]
        got_out = [(o.name, len(o.shape), o.type) for o in self._session.get_outputs()]
        want_in = [(i["name"], len(i["shape"]), "tensor(float)") for i in self.manifest["inputs"]]
        want_out = [(o["name"], len(o["shape"]), "tensor(float)") for o in self.manifest["outputs"]]
        if got_in != want_in or got_out != want_out:
            raise BundleSchemaError(
                f"model signature {got_in} -> {got_out} differs from the manifest's "
                f"{want_in} -> {want_out}"
            )
        if (
            tuple(n for n, *_ in got_in) != INPUT_NAMES
            or tuple(n for n, *_ in got_out) != OUTPUT_NAMES
        ):
            raise BundleSchemaError("model input/output names differ from this runtime's")

    def run(
        self,
        state: ArrayLike,
        contacts: ArrayLike,
        isolation: ArrayLike,
        mask: ArrayLike,
        prevalence: ArrayLike,
        *,
        theta: Theta | None = None,
        uniforms: ArrayLike | None = None,
    ) -> ForecastResult:
        """Forecast K options over T = len(prevalence) days; θ defaults to the bundle's.

        ``uniforms`` (T, M, K) in [0, 1) turns on Monte Carlo mode; without it M = 0.
        """
        L = len(self.layers)
        state_a = _array("state", state, (len(STATE_FIELDS),))
        contacts_a = _array("contacts", contacts, (None, L))
        K = contacts_a.shape[0]
        if K == 0:
            raise ForecastInputError("at least one option is required")
        isolation_a = _array("isolation", isolation, (K,))
        mask_a = _array("mask", mask, (K,))
        prevalence_a = _array("prevalence", prevalence, (None, L))
        T = prevalence_a.shape[0]
        if T == 0:
            raise ForecastInputError("the horizon (rows of prevalence) must be at least 1 day")
        if state_a[1] < 0 or state_a[2] < 0:
            raise ForecastInputError("age_susceptibility and baseline_degree must be ≥ 0")
        _in_unit("state.susceptible", state_a[:1])
        if contacts_a.min() < 0:
            raise ForecastInputError("contacts must be ≥ 0")
        _in_unit("isolation", isolation_a)
        _in_unit("mask", mask_a)
        _in_unit("prevalence", prevalence_a)
        theta = theta or self.theta
        if not (theta.beta >= 0 and theta.dt > 0):
            raise ForecastInputError(f"θ out of range: {theta}")
        theta_a = np.array([theta.beta, theta.dt], dtype=np.float32)
        if uniforms is None:
            uniforms_a = np.zeros((T, 0, K), dtype=np.float32)
        else:
            uniforms_a = _array("uniforms", uniforms, (T, None, K))
            _in_unit("uniforms", uniforms_a, upper_open=True)
        feeds = dict(
            zip(
                INPUT_NAMES,
                (state_a, contacts_a, isolation_a, mask_a, prevalence_a, theta_a, uniforms_a),
                strict=True,
            )
        )
        risk, daily, drisk, day = self._session.run(None, feeds)
        return ForecastResult(
            risk=risk, daily_risk=daily, drisk_dbeta=drisk, mc_infection_day=day.astype(np.int64)
        )


def load_verified_bundle(
    path: str | os.PathLike[str],
    trusted_public_key: PublicKey,
    *,
    not_before: datetime | None = None,
    threads: int = 1,
) -> ForecastSession:
    """Verify the bundle at ``path`` against ``trusted_public_key``, then load it.

    Raises a :class:`~mobile_export.errors.BundleError` subclass if the bundle is malformed,
    unsigned, signed by another key, tampered with, older than ``not_before``, or its model
    disagrees with its manifest.
    """
    bundle = read_verified_bundle(path, trusted_public_key, not_before=not_before)
    return ForecastSession(bundle, threads=threads)

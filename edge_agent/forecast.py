"""Device-side forecast runner: verify a signed bundle, run it in onnxruntime, rank options.

Answers "how do I minimise my risk next week?" (LPM paper §6.1) on the device: the device's
state and its candidate behaviours never leave it; only the public exposure forecast and the
coordinator-signed model come in.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mobile_export.bundle import (
    PublicKey,
    RollbackState,
    read_bundle_bytes,
    read_verified_bundle,
    verify_with_rollback,
)
from mobile_export.errors import ForecastInputError
from mobile_export.runtime import ForecastResult, ForecastSession
from mobile_export.schema import Theta


@dataclass(frozen=True)
class DeviceState:
    """The device's own epidemic state (private; never sent anywhere)."""

    susceptible: bool = True
    age_susceptibility: float = 1.0
    usual_contacts: tuple[float, ...] = (3.0, 8.0, 6.0)  # per day, in bundle layer order

    @property
    def baseline_degree(self) -> float:
        """n_i of the project SIR: the usual number of daily contacts."""
        return float(sum(self.usual_contacts))

    def as_vector(self) -> np.ndarray:
        return np.array(
            [float(self.susceptible), self.age_susceptibility, self.baseline_degree],
            dtype=np.float32,
        )


@dataclass(frozen=True)
class BehaviourOption:
    """A candidate behaviour for the coming days."""

    name: str
    contacts: tuple[float, ...]  # per day, in bundle layer order
    isolation: float = 0.0  # fraction of isolable contacts (work, community) avoided
    mask: float = 0.0  # relative reduction of transmission per contact


@dataclass(frozen=True)
class RankedOption:
    """An option with its forecast; rank 1 is the lowest expected risk."""

    rank: int
    option: BehaviourOption
    risk: float
    drisk_dbeta: float
    mc_risk: float | None


def default_options(state: DeviceState) -> list[BehaviourOption]:
    """Eight everyday choices built from the device's usual contacts (three layers)."""
    if len(state.usual_contacts) != 3:
        raise ForecastInputError("default options assume the household/work/community layers")
    h, w, c = state.usual_contacts
    return [
        BehaviourOption("as usual", (h, w, c)),
        BehaviourOption("wear a mask", (h, w, c), mask=0.5),
        BehaviourOption("work from home", (h, 0.0, c)),
        BehaviourOption("halve community contacts", (h, w, c / 2)),
        BehaviourOption("work from home + mask", (h, 0.0, c), mask=0.5),
        BehaviourOption("halve work and community", (h, w / 2, c / 2)),
        BehaviourOption("self-isolate", (h, w, c), isolation=1.0),
        BehaviourOption("self-isolate + mask", (h, w, c), isolation=1.0, mask=0.5),
    ]


def run_options(
    session: ForecastSession,
    state: DeviceState,
    options: Sequence[BehaviourOption],
    prevalence: np.ndarray | Sequence[Sequence[float]],
    *,
    theta: Theta | None = None,
    samples: int = 0,
    seed: int | None = None,
) -> ForecastResult:
    """Run one query for ``options``; ``samples`` > 0 adds a Monte Carlo estimate.

    The Monte Carlo uniforms are drawn on the host (numpy, seeded) and passed in: the
    forecast is not security-relevant, and the exported graph has no random op.
    """
    if not options:
        raise ForecastInputError("at least one option is required")
    if samples < 0:
        raise ForecastInputError("samples must be ≥ 0")
    L = len(session.layers)
    if len(state.usual_contacts) != L or any(len(o.contacts) != L for o in options):
        raise ForecastInputError(f"contacts must have one entry per layer {session.layers}")
    prevalence_a = np.asarray(prevalence, dtype=np.float32)
    uniforms = None
    if samples:
        rng = np.random.default_rng(seed)
        uniforms = rng.random((prevalence_a.shape[0], samples, len(options)), dtype=np.float32)
    return session.run(
        state.as_vector(),
        np.array([o.contacts for o in options], dtype=np.float32),
        np.array([o.isolation for o in options], dtype=np.float32),
        np.array([o.mask for o in options], dtype=np.float32),
        prevalence_a,
        theta=theta,
        uniforms=uniforms,
    )


def rank_options(
    session: ForecastSession,
    state: DeviceState,
    options: Sequence[BehaviourOption],
    prevalence: np.ndarray | Sequence[Sequence[float]],
    *,
    theta: Theta | None = None,
    samples: int = 0,
    seed: int | None = None,
) -> list[RankedOption]:
    """Options ordered from lowest to highest risk over the forecast horizon."""
    result = run_options(
        session, state, options, prevalence, theta=theta, samples=samples, seed=seed
    )
    mc = result.mc_risk
    return [
        RankedOption(
            rank=rank,
            option=options[int(k)],
            risk=float(result.risk[k]),
            drisk_dbeta=float(result.drisk_dbeta[k]),
            mc_risk=None if mc is None else float(mc[k]),
        )
        for rank, k in enumerate(result.ranking(), start=1)
    ]


def forecast_from_bundle(
    bundle_path: str | os.PathLike[str],
    trusted_public_key: PublicKey,
    state: DeviceState,
    prevalence: np.ndarray | Sequence[Sequence[float]],
    *,
    options: Sequence[BehaviourOption] | None = None,
    samples: int = 0,
    seed: int | None = None,
    rollback: RollbackState | None = None,
) -> list[RankedOption]:
    """Verify and load a bundle, then rank ``options`` (default: :func:`default_options`).

    ``rollback`` (the device's :class:`~edge_agent.store.EdgeStore`) holds the last bundle the
    device accepted: an older bundle, or a different one with the same signed timestamp, is
    refused with :class:`~mobile_export.errors.BundleRollbackError`; a newer one is recorded.
    Without it nothing protects against a replayed stale bundle.
    """
    if rollback is not None:
        bundle = verify_with_rollback(read_bundle_bytes(bundle_path), trusted_public_key,
                                      rollback)
    else:
        bundle = read_verified_bundle(bundle_path, trusted_public_key)
    session = ForecastSession(bundle)
    chosen = list(options) if options is not None else default_options(state)
    return rank_options(session, state, chosen, prevalence, samples=samples, seed=seed)

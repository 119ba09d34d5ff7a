"""Online federated calibration of θ (β, optionally β_t by segment of days) during a run.

Loss (LPM paper Eq. 11–13, one-step-ahead expected new infections): for each completed
day t with observed new infections y_t,

    ŷ_t(θ) = Σ_{i synthetic} p_i(β_t) + Σ_{i physical} p_i(β_t),
    L(θ)   = mean_t (y_t − ŷ_t(θ))² / mean_t(y_t)²,

where p_i = S_i (1 − exp(−β/n_i Σ_j w_ij I_j)) is agent i's expected new infection given the
day's actual neighbour states (S_i ∈ {0, 1} with a sampled estimator; fractional with the
``expected`` one, where 1 − exp(−β S_i/n_i Σ_j w_ij I_j) would undercount). ∂L/∂θ has two
parts:

* synthetic: forward-mode autograd (``torch.func.jvp``) through the synthetic agents' p_i
  (the coordinator holds their hazard base h_i = S_i/n_i Σ_j w_ij I_j and S_i for each day);
* physical: Σ_i ∂p_i/∂β over the devices, securely aggregated (SecAgg+) from their
  reports together with Σ_i p_i; the coordinator never sees a device's own p_i or state.
  The device part is evaluated at the θ_t the devices were given that day and enters the
  loss to first order, P_t + G_t (θ − θ_t).

Every ``every`` days the calibrator takes ``steps`` Gauss–Newton steps on θ (the gradient
above scaled by the inverse of Σ_t J_t², J_t = ∂ŷ_t/∂β_t = synthetic + device part), which
for this nearly linear loss converges in a few steps; θ is clamped to ``[lo, hi]``.
The observed series is the run's own reported new infections (``observed=None``) or a
given per-day series (e.g. a CSV column).

Full path (run config ``tangents``; :mod:`coordinator.calibration_path`): the model of day
t's count is the run replayed from day 0 at θ, ŷ_t(θ) = synthetic replay + the devices'
SecAgg'd count and full-path tangent, and the loss is over log counts,

    L(θ) = mean_t (log(1 + ŷ_t(θ)) − log(1 + y_t))²,

with ∂ŷ_t/∂θ exact (forward-mode tangents through the synthetic replay, the devices'
∂new/∂β over the whole path). Every ``every`` days: up to ``steps`` Gauss–Newton steps, each
a fresh replay (a step is at most half of θ; θ clamped to ``[lo, hi]``).
"""

from __future__ import annotations

import csv
import io
import math
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from coordinator.calibration_path import SyntheticReplay

__all__ = ["CalibrationError", "CalibrationSettings", "OnlineCalibrator", "pack_checkpoint",
           "read_observed_csv", "unpack_checkpoint"]

_PACKED = b"LPMCKPT1"  # checkpoint = this tag + npz(sim state bytes, calibrator arrays)


class CalibrationError(ValueError):
    """Invalid calibration settings or observed series."""


def read_observed_csv(path: str | Path, column: str = "new_infections") -> list[float]:
    """Per-day observed values from ``column`` of a CSV with a header row."""
    p = Path(path)
    if not p.is_file():
        raise CalibrationError(f"observed series {p} does not exist")
    with p.open(newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or column not in reader.fieldnames:
            raise CalibrationError(f"{p} has no column {column!r} (columns: {reader.fieldnames})")
        try:
            values = [float(row[column]) for row in reader]
        except ValueError as exc:
            raise CalibrationError(f"{p}: non-numeric value in {column!r}: {exc}") from None
    if not values or not all(math.isfinite(v) and v >= 0 for v in values):
        raise CalibrationError(f"{p}: {column!r} must hold finite non-negative numbers")
    return values


@dataclass(frozen=True)
class CalibrationSettings:
    """What to calibrate and how often. ``segment_days`` > 0 fits one β per segment of that
    many days (β_t); 0 fits one β for the run."""

    params: tuple[str, ...] = ("beta",)
    beta_init: float = 0.3
    every: int = 1
    steps: int = 5
    segment_days: int = 0
    lo: float = 1e-3
    hi: float = 5.0
    observed: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        unknown = set(self.params) - {"beta"}
        if unknown:
            raise CalibrationError(f"cannot calibrate {sorted(unknown)} (supported: beta)")
        if self.every < 1 or self.steps < 1 or self.segment_days < 0:
            raise CalibrationError("every and steps must be >= 1, segment_days >= 0")
        if not 0 < self.lo < self.beta_init < self.hi <= _BETA_MAX:
            raise CalibrationError(f"need 0 < lo < beta_init < hi <= {_BETA_MAX}, got "
                                   f"{self.lo}, {self.beta_init}, {self.hi}")


_MOMENTS = 48  # Σ_i S_i (1 − e^{−βx_i}) = Σ_k (−1)^{k+1} β^k Σ_i S_i x_i^k / k!, to ~1e-13
_SERIES_LIMIT = 10.0  # … while β·max h ≤ 10; beyond, the day's hazards are summed directly
_BETA_MAX = 5.0  # CalibrationSettings.hi's upper limit


@dataclass
class _Day:
    moments: torch.Tensor  # m_k = Σ_i S_i x_i^k / k!, k = 1..K, over the synthetic agents
    h_max: float  # max x_i
    hazard: torch.Tensor  # the x_i themselves, kept only when the moments do not suffice
    phys_p: float
    phys_dp: float
    theta: float  # β the devices evaluated p and ∂p/∂β at
    y: float
    segment: int
    weight: torch.Tensor | None = None  # the kept x_i's S_i (None: all 1)

    @classmethod
    def from_hazard(cls, hazard: torch.Tensor, phys_p: float, phys_dp: float, theta: float,
                    y: float, segment: int, susceptible: torch.Tensor | None = None) -> _Day:
        """One day's terms from the synthetic agents' hazard bases h_i = S_i x_i (float64)
        and their S_i before the day (``None``: every S_i is 1, as with a sampled estimator),
        x_i = 1/n_i Σ_j w_ij I_j."""
        h = hazard.to(torch.float64)
        w = None
        if susceptible is not None:
            w = susceptible.to(torch.float64)
            if w.shape != h.shape:
                raise CalibrationError(f"{w.numel()} susceptible values for {h.numel()} "
                                       "hazard bases")
            if w.numel() and not bool(((w > 0) & (w <= 1)).all()):
                raise CalibrationError("the susceptible values of agents with a hazard must "
                                       "lie in (0, 1]")
            h = h / w
            if bool((w == 1).all()):
                w = None  # a sampled estimator's day: the plain sums, bit for bit
        h_max = float(h.max()) if h.numel() else 0.0
        m, term = [], h.clone() if w is None else w * h
        for k in range(1, _MOMENTS + 1):
            m.append(term.sum())
            term = term * h / (k + 1)
        moments = torch.stack(m) if m else torch.zeros(_MOMENTS, dtype=torch.float64)
        if _BETA_MAX * h_max <= _SERIES_LIMIT:  # the moments suffice for every β allowed
            h, w = torch.zeros(0, dtype=torch.float64), None
        return cls(moments, h_max, h, float(phys_p), float(phys_dp), float(theta), float(y),
                   int(segment), w)

    def synthetic(self, beta: torch.Tensor) -> torch.Tensor:
        """Σ_i p_i(β) over the day's synthetic agents (differentiable in β)."""
        if float(beta) * self.h_max > _SERIES_LIMIT:
            p = -torch.expm1(-beta * self.hazard)
            return (p if self.weight is None else self.weight * p).sum()
        k = torch.arange(1, _MOMENTS + 1, dtype=torch.float64)
        signs = torch.where(k % 2 == 1, 1.0, -1.0).to(torch.float64)
        return (signs * beta ** k * self.moments).sum()


@dataclass
class OnlineCalibrator:
    """Accumulates each day's terms; :meth:`update` takes the Gauss–Newton steps."""

    settings: CalibrationSettings
    days: list[_Day] = field(default_factory=list)
    theta: list[float] = field(default_factory=list)  # β per segment
    # (day, β) last handed out: the daily loop picks a day's β before the previous day's
    # update, so a resumed run must hand out the same β for its first day
    given: tuple[int, float] | None = None
    # full-path mode (tangents): the synthetic replay and per day (N^phys, D^phys, y, segment)
    replay: SyntheticReplay | None = None
    path_days: list[tuple[float, float, float, int]] = field(default_factory=list)
    _path_cache: tuple[Any, Any] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.theta = [self.settings.beta_init]

    @property
    def full_path(self) -> bool:
        """Whether θ is fitted with the full-path model (tangents) rather than Eq. 11."""
        return self.replay is not None

    def segment_of(self, day_index: int) -> int:
        s = self.settings.segment_days
        return 0 if s == 0 else day_index // s

    def beta_for(self, day_index: int) -> float:
        """θ's β for day ``day_index`` (0-based), extending segments as they start."""
        if self.given is not None and self.given[0] == day_index:
            return self.given[1]  # asked again (a resumed run's first day): the same answer
        seg = self.segment_of(day_index)
        while len(self.theta) <= seg:
            self.theta.append(self.theta[-1])
        self.given = (day_index, self.theta[seg])
        return self.theta[seg]

    def observed_for(self, day_index: int, reported: float) -> float:
        obs = self.settings.observed
        if obs is None:
            return reported
        if day_index >= len(obs):
            raise CalibrationError(f"the observed series has {len(obs)} days; day "
                                   f"{day_index + 1} has no observation")
        return float(obs[day_index])

    def add_day(self, day_index: int, hazard: torch.Tensor, phys_p: float, phys_dp: float,
                theta: float, y: float, susceptible: torch.Tensor | None = None) -> None:
        """Eq. 11: day ``day_index``'s synthetic hazard bases h_i = S_i x_i with their S_i
        (``None``: all 1), the devices' Σp and Σ∂p/∂β at ``theta`` and the observation."""
        self.days.append(_Day.from_hazard(hazard, phys_p, phys_dp, theta, y,
                                          self.segment_of(day_index), susceptible))

    def add_path_day(self, day_index: int, phys_new: float, phys_dnew: float,
                     y: float) -> None:
        """Full-path mode: day ``day_index``'s devices' count and ∂count/∂β (SecAgg'd) and
        its observation; its cross sums went to the replay when the day was stepped."""
        if self.replay is None:
            raise CalibrationError("add_path_day needs the full-path replay (tangents)")
        if day_index != len(self.path_days) or self.replay.days <= day_index:
            raise CalibrationError(f"full-path day {day_index} out of order "
                                   f"({len(self.path_days)} days kept, "
                                   f"{self.replay.days} replayable)")
        self.path_days.append((float(phys_new), float(phys_dnew), float(y),
                               self.segment_of(day_index)))

    def _path_terms(self, theta: list[float]
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """ŷ_t(θ), y_t and ∂ŷ_t/∂θ_s split into the synthetic (replay) and device part [T, K]."""
        assert self.replay is not None
        t_days, k = len(self.path_days), len(theta)
        seg = torch.tensor([d[3] for d in self.path_days])
        beta = torch.tensor(theta, dtype=torch.float64)
        seeds = (seg[None, :] == torch.arange(k)[:, None]).to(torch.float64)
        syn, dsyn = self.replay.run(beta[seg], seeds)
        phys_new = torch.tensor([d[0] for d in self.path_days], dtype=torch.float64)
        phys_d = torch.tensor([d[1] for d in self.path_days], dtype=torch.float64)
        y = torch.tensor([d[2] for d in self.path_days], dtype=torch.float64)
        pred = syn + phys_new + phys_d * (beta[seg] - self.replay.beta_devices)
        j_dev = torch.zeros(t_days, k, dtype=torch.float64)
        j_dev[torch.arange(t_days), seg] = phys_d
        return pred.clamp(min=0.0), y, dsyn.T.contiguous(), j_dev

    def _path_loss_and_grad(self, theta: list[float]
                            ) -> tuple[float, torch.Tensor, torch.Tensor, torch.Tensor,
                                       torch.Tensor]:
        key = (tuple(theta), len(self.path_days))
        if self._path_cache is not None and self._path_cache[0] == key:
            return self._path_cache[1]  # the day's loss row, then the update's first step
        out = self._path_eval(theta)
        self._path_cache = (key, out)
        return out

    def _path_eval(self, theta: list[float]
                   ) -> tuple[float, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        pred, y, j_syn, j_dev = self._path_terms(theta)
        r = torch.log1p(pred) - torch.log1p(y)
        scale = (1.0 / (1.0 + pred))[:, None]
        coef = 2 * r / len(r)
        g_syn = (coef[:, None] * j_syn * scale).sum(0)
        g_dev = (coef[:, None] * j_dev * scale).sum(0)
        return float(r.square().mean()), g_syn, g_dev, r, (j_syn + j_dev) * scale

    def _path_update(self) -> None:
        for _ in range(self.settings.steps):
            _, _, _, r, jac = self._path_loss_and_grad(self.theta)
            a = jac.T @ jac
            diag = a.diagonal()
            a = a + torch.diag(torch.where(diag > 0, 1e-9 * diag, torch.ones_like(diag)))
            step = torch.linalg.solve(a, jac.T @ r)
            beta = torch.tensor(self.theta, dtype=torch.float64)
            step = torch.maximum(torch.minimum(step, 0.5 * beta), -0.5 * beta)
            self.theta = (beta - step).clamp(self.settings.lo, self.settings.hi).tolist()
            if float(step.abs().max()) < 1e-7:
                break
        last = self.path_days[-1][3]  # segments begun without days yet: the latest fit
        self.theta[last + 1:] = [self.theta[last]] * (len(self.theta) - last - 1)

    def export_state(self) -> dict[str, np.ndarray]:
        """θ and every day's terms as arrays (for the run's checkpoint), so a resumed run
        calibrates against its whole history, not only the days after the restart."""
        n = len(self.days)
        kept = [d.hazard.numpy() for d in self.days]
        weights = [np.ones(k.size) if d.weight is None else d.weight.numpy()
                   for d, k in zip(self.days, kept, strict=True)]
        return {
            "cal_theta": np.array(self.theta, np.float64),
            "cal_given": np.array([] if self.given is None else self.given, np.float64),
            "cal_moments": (torch.stack([d.moments for d in self.days]).numpy() if n
                            else np.zeros((0, _MOMENTS))),
            "cal_days": np.array([[d.h_max, d.phys_p, d.phys_dp, d.theta, d.y, d.segment]
                                  for d in self.days], np.float64).reshape(n, 6),
            "cal_hazard_len": np.array([k.size for k in kept], np.int64),
            "cal_hazard": np.concatenate(kept) if kept else np.zeros(0),
            "cal_weight": np.concatenate(weights) if weights else np.zeros(0),
            **self._export_path(),
        }

    def _export_path(self) -> dict[str, np.ndarray]:
        """Full-path mode: the per-day device terms and the replay's recorded cross sums
        (the replay runs from day 0 at every fit, so a resumed run needs them all)."""
        from coordinator.calibration_path import SyntheticReplay

        if not isinstance(self.replay, SyntheticReplay):  # none, or the ranks' own replay
            return {}
        t_days = len(self.path_days)
        rows = int(self.replay.rows.numel())
        sums, dsums = self.replay.sums[:t_days], self.replay.dsums[:t_days]
        return {
            "cal_path_days": np.array(self.path_days, np.float64).reshape(t_days, 4),
            "cal_replay_sums": (torch.stack(sums).numpy() if sums
                                else np.zeros((0, rows))),
            "cal_replay_dsums": (torch.stack(dsums).numpy() if dsums
                                 else np.zeros((0, rows))),
        }

    def restore_state(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Inverse of :meth:`export_state`; raises :class:`CalibrationError` on a bad record."""
        try:
            theta = [float(b) for b in arrays["cal_theta"]]
            given = [float(v) for v in arrays["cal_given"]]
            if len(given) not in (0, 2):
                raise ValueError("cal_given must hold (day, β)")
            moments, rows = arrays["cal_moments"], arrays["cal_days"]
            lengths, hazard = arrays["cal_hazard_len"], arrays["cal_hazard"]
            # the kept x_i's S_i (absent in checkpoints written before it was kept: all 1)
            weight = arrays.get("cal_weight", np.ones(hazard.size))
            if not (len(moments) == len(rows) == len(lengths)) or int(lengths.sum()) != hazard.size:
                raise ValueError("inconsistent day counts")
            if weight.shape != hazard.shape or not bool(((weight > 0) & (weight <= 1)).all()):
                raise ValueError("cal_weight does not match cal_hazard")
        except (KeyError, ValueError, TypeError) as exc:
            raise CalibrationError(f"calibration checkpoint is unreadable: {exc}") from None
        if not theta or not all(self.settings.lo <= b <= self.settings.hi for b in theta):
            raise CalibrationError(f"calibration checkpoint holds θ {theta} outside "
                                   f"[{self.settings.lo}, {self.settings.hi}]")
        path = self._restore_path(arrays)
        starts = np.concatenate([[0], np.cumsum(lengths)])
        self.theta = theta
        if path is not None:
            self.path_days, sums, dsums = path
            assert self.replay is not None
            self.replay.sums = [torch.from_numpy(np.array(v, np.float64)) for v in sums]
            self.replay.dsums = [torch.from_numpy(np.array(v, np.float64)) for v in dsums]
            self._path_cache = None
        self.given = (int(given[0]), given[1]) if given else None
        def kept_weight(i: int) -> torch.Tensor | None:
            w = np.array(weight[starts[i]:starts[i + 1]], np.float64)
            return None if bool((w == 1).all()) else torch.from_numpy(w)

        self.days = [
            _Day(torch.from_numpy(np.array(m, np.float64)), float(r[0]),
                 torch.from_numpy(np.array(hazard[starts[i]:starts[i + 1]], np.float64)),
                 float(r[1]), float(r[2]), float(r[3]), float(r[4]), int(r[5]),
                 kept_weight(i))
            for i, (m, r) in enumerate(zip(moments, rows, strict=True))
        ]


    def _restore_path(self, arrays: Mapping[str, np.ndarray]
                      ) -> tuple[list[tuple[float, float, float, int]], np.ndarray,
                                 np.ndarray] | None:
        """The full-path terms of :meth:`_export_path`, checked against this calibrator's
        replay (``None`` without one); CalibrationError when they are missing or do not fit."""
        from coordinator.calibration_path import SyntheticReplay

        if self.replay is None:
            return None
        if not isinstance(self.replay, SyntheticReplay):
            raise CalibrationError("a partitioned full-path replay does not resume from a "
                                   "checkpoint")
        try:
            days, sums, dsums = (arrays["cal_path_days"], arrays["cal_replay_sums"],
                                 arrays["cal_replay_dsums"])
        except KeyError:
            raise CalibrationError("the checkpoint holds no full-path calibration terms "
                                   "(written without tangents)") from None
        rows = int(self.replay.rows.numel())
        if days.ndim != 2 or days.shape[1] != 4 or sums.shape != (len(days), rows) \
                or dsums.shape != sums.shape:
            raise CalibrationError(f"full-path calibration checkpoint has {days.shape} day "
                                   f"terms and {sums.shape} cross sums; the replay keeps "
                                   f"{rows} rows")
        kept = [(float(a), float(b), float(c), int(d)) for a, b, c, d in days]
        return kept, sums, dsums

    def _terms(self, beta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """ŷ_t and ∂ŷ_t/∂β_t split into the synthetic part (forward-mode autograd through
        the synthetic agents' Σ p_i) and the device part G_t."""
        seg = torch.tensor([d.segment for d in self.days])

        def synthetic(b: torch.Tensor) -> torch.Tensor:
            return torch.stack([d.synthetic(b[d.segment]) for d in self.days])

        b = beta.detach()
        syn, j_syn = torch.func.jvp(synthetic, (b,), (torch.ones_like(b),))[:2]
        dev_p = torch.tensor([d.phys_p for d in self.days], dtype=torch.float64)
        j_dev = torch.tensor([d.phys_dp for d in self.days], dtype=torch.float64)
        theta_t = torch.tensor([d.theta for d in self.days], dtype=torch.float64)
        pred = syn + dev_p + j_dev * (b[seg] - theta_t)
        return pred, j_syn, j_dev

    def loss_and_grad(self) -> tuple[float, list[float], list[float]]:
        """L(θ) and ∂L/∂θ split into the synthetic and the device part (per segment)."""
        if self.replay is not None:
            loss, g_syn, g_dev = self._path_loss_and_grad(self.theta)[:3]
            return loss, g_syn.tolist(), g_dev.tolist()
        beta = torch.tensor(self.theta, dtype=torch.float64)
        y = torch.tensor([d.y for d in self.days], dtype=torch.float64)
        pred, j_syn, j_dev = self._terms(beta)
        norm = y.mean().square().clamp(min=1.0)
        r = (pred - y).detach()
        loss = float(r.square().mean() / norm)
        seg = torch.tensor([d.segment for d in self.days])
        coef = 2 * r / (len(self.days) * norm)
        g_syn = torch.zeros(len(self.theta), dtype=torch.float64).index_add_(0, seg, coef * j_syn)
        g_dev = torch.zeros(len(self.theta), dtype=torch.float64).index_add_(0, seg, coef * j_dev)
        return loss, g_syn.tolist(), g_dev.tolist()

    def update(self, day_index: int) -> bool:
        """Take the steps if day ``day_index`` closes a block of ``every`` days."""
        kept = self.path_days if self.replay is not None else self.days
        if not kept or (day_index + 1) % self.settings.every:
            return False
        if self.replay is not None:
            self._path_update()
            return True
        for _ in range(self.settings.steps):
            beta = torch.tensor(self.theta, dtype=torch.float64)
            y = torch.tensor([d.y for d in self.days], dtype=torch.float64)
            pred, j_syn, j_dev = self._terms(beta)
            r = (pred - y).detach()
            jac = (j_syn + j_dev).detach()
            seg = torch.tensor([d.segment for d in self.days])
            k = len(self.theta)
            grad = torch.zeros(k, dtype=torch.float64).index_add_(0, seg, r * jac)
            curv = torch.zeros(k, dtype=torch.float64).index_add_(0, seg, jac * jac)
            step = torch.where(curv > 0, grad / curv.clamp(min=1e-12), torch.zeros_like(grad))
            new = (beta.detach() - step).clamp(self.settings.lo, self.settings.hi)
            self.theta = new.tolist()
        return True

    def loss(self) -> float:
        kept = self.path_days if self.replay is not None else self.days
        return self.loss_and_grad()[0] if kept else float("nan")


def pack_checkpoint(sim_state: bytes, calibrator: OnlineCalibrator | None,
                    extra: Mapping[str, np.ndarray] | None = None) -> bytes:
    """The run's checkpoint: the simulation state, plus the calibrator's history if any and
    ``extra`` arrays (e.g. the synthetic agents' tangents, names not starting ``cal_``)."""
    if calibrator is None and not extra:
        return sim_state
    buf = io.BytesIO()
    payload: dict[str, Any] = {"sim": np.frombuffer(sim_state, np.uint8),
                               **(calibrator.export_state() if calibrator is not None else {}),
                               **dict(extra or {})}
    np.savez_compressed(buf, **payload)
    return _PACKED + buf.getvalue()


def unpack_checkpoint(blob: bytes) -> tuple[bytes, dict[str, np.ndarray] | None]:
    """(simulation state, calibrator arrays or ``None``) from :func:`pack_checkpoint`'s bytes
    (a checkpoint without calibration is the simulation state itself)."""
    if not blob.startswith(_PACKED):
        return blob, None
    try:
        with np.load(io.BytesIO(blob[len(_PACKED):])) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise CalibrationError(f"checkpoint is unreadable: {exc}") from None
    sim = arrays.pop("sim", None)
    if sim is None:
        raise CalibrationError("checkpoint has no simulation state")
    return sim.tobytes(), arrays

"""AD against finite differences with common random numbers (CRN), per parameter.

For each seed, the estimator's gradient of the run's total infections is compared with the
central difference (f(θ + h) − f(θ − h)) / 2h of the *same* seed (same uniforms on both
sides, so most of the noise cancels). Over seeds both are averaged; ``bias`` is
mean(AD) / mean(FD) − 1 and ``bias_se`` its delta-method standard error, so a modeller sees
whether a calibration can trust the gradient at *their* model, population and point.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch

from simulation.engine import SimulationError, simulate
from simulation.estimators import get_estimator, hard_forward
from simulation.stochastic_triples import DEFAULT_FLIPS
from simulation.substeps import SubstepModel

__all__ = ["GradCheck", "GradCheckError", "gradcheck", "parameter", "format_table"]


class GradCheckError(SimulationError):
    """Invalid gradcheck settings (unknown parameter, too few seeds, bad step)."""


@dataclass(frozen=True)
class GradCheck:
    """One parameter's AD and CRN-FD statistics over seeds (sd = across seeds)."""

    value: float
    ad_mean: float
    ad_sd: float
    fd_mean: float
    fd_sd: float
    bias: float  # ad_mean / fd_mean − 1
    bias_se: float  # standard error of ``bias`` (delta method, paired seeds)
    seeds: int
    step: float  # absolute FD step h

    @property
    def defined(self) -> bool:
        """False when the finite differences saw no event change (FD = 0 on every seed):
        the bias is then undefined, not infinite."""
        return math.isfinite(self.bias)

    def as_dict(self) -> dict[str, float | None]:
        """JSON-safe: an undefined bias (and its se) is ``None``, never Infinity."""
        d: dict[str, float | None] = dict(asdict(self))
        if not self.defined:
            d["bias"] = d["bias_se"] = None
        return d


def parameter(model: SubstepModel, name: str) -> torch.nn.Parameter:
    """A scalar parameter by short name (``beta``, ``gamma``, ``latent_days``, …) or by its
    full dotted name (``substeps.isolation.efficacy``)."""
    params = dict(model.named_parameters())
    if name in params:
        p = params[name]
    else:
        matches = [v for k, v in params.items() if k.rsplit(".", 1)[-1] == name]
        if len(matches) != 1:
            scalars = sorted(k.rsplit(".", 1)[-1] for k, v in params.items() if v.numel() == 1)
            raise GradCheckError(f"unknown or ambiguous parameter {name!r}; scalar parameters: {scalars}")
        p = matches[0]
    if p.numel() != 1:
        raise GradCheckError(f"parameter {name!r} is not a scalar ({tuple(p.shape)})")
    return p


def _total(model: SubstepModel, population, days: int, seed: int, estimator: str, device: str,
           flips: int = DEFAULT_FLIPS) -> torch.Tensor:
    return simulate(model, population, days, seed, estimator=estimator, device=device, flips=flips).total_infections


def gradcheck(
    make_model: Callable[[], SubstepModel],
    population,
    days: int,
    seeds: int | Sequence[int],
    params: Sequence[str],
    *,
    estimator: str = "auto",
    fd_step: float = 0.05,
    device: str = "cpu",
    flips: int = DEFAULT_FLIPS,
) -> dict[str, GradCheck]:
    """Compare ∂(total infections)/∂θ from ``estimator`` with CRN central differences.

    ``make_model()`` returns a fresh model at the parameter point; ``fd_step`` is relative
    (h = fd_step · |θ|, or fd_step if θ = 0). ``seeds`` is a count or explicit seeds; ``flips``
    sets the "triples" estimator's alternative paths per parameter."""
    seed_list = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    if len(seed_list) < 2:
        raise GradCheckError("gradcheck needs at least 2 seeds (it reports standard deviations)")
    if not 0 < fd_step < 1:
        raise GradCheckError("fd_step must be in (0, 1) (relative to the parameter)")
    if days < 1:
        raise GradCheckError("days must be >= 1")
    probe = make_model()
    values = {name: float(parameter(probe, name).detach()) for name in params}
    ad: dict[str, list[float]] = {name: [] for name in params}
    fd: dict[str, list[float]] = {name: [] for name in params}
    steps = {name: fd_step * abs(v) if v != 0 else fd_step for name, v in values.items()}
    # FD always differentiates the sampled model (the mean-field mode's forward is a surrogate)
    fd_estimator = estimator if hard_forward(get_estimator(estimator)) else "smoothed"
    for seed in seed_list:
        model = make_model()
        checked = {id(parameter(model, name)) for name in params}
        for p in model.parameters():  # only the checked parameters need a gradient
            p.requires_grad_(id(p) in checked)
        _total(model, population, days, seed, estimator, device, flips).backward()
        for name in params:
            grad = parameter(model, name).grad
            ad[name].append(0.0 if grad is None else float(grad))
        for name in params:
            h = steps[name]
            sides = []
            for sign in (1.0, -1.0):
                m = make_model()
                with torch.no_grad():
                    parameter(m, name).add_(sign * h)
                    sides.append(float(_total(m, population, days, seed, fd_estimator, device)))
            fd[name].append((sides[0] - sides[1]) / (2 * h))
    return {name: _stats(values[name], ad[name], fd[name], steps[name]) for name in params}


def _stats(value: float, ad: list[float], fd: list[float], step: float) -> GradCheck:
    a, f = torch.tensor(ad, dtype=torch.float64), torch.tensor(fd, dtype=torch.float64)
    k = a.numel()
    am, fm = float(a.mean()), float(f.mean())
    asd, fsd = float(a.std()), float(f.std())
    bias = am / fm - 1 if fm != 0 else math.inf
    if fm != 0:
        cov = float(((a - am) * (f - fm)).sum()) / (k - 1)
        var = (asd**2 / fm**2 + am**2 * fsd**2 / fm**4 - 2 * am * cov / fm**3) / k
        bias_se = math.sqrt(max(var, 0.0))
    else:
        bias_se = math.inf
    return GradCheck(value, am, asd, fm, fsd, bias, bias_se, k, step)


def format_table(report: dict[str, GradCheck], estimator: str) -> str:
    """A plain-text table: parameter, AD mean ± sd, FD mean ± sd, bias ± se."""
    head = f"{'parameter':<22}{'value':>9}  {estimator + ' AD (mean ± sd)':>28}  {'CRN FD (mean ± sd)':>28}  {'bias ± se':>16}"
    lines = [head, "-" * len(head)]
    for name, r in report.items():
        bias = f"{r.bias:>+7.1%} ± {r.bias_se:<6.1%}" if r.defined else f"{'n/a (FD = 0)':>16}"
        lines.append(
            f"{name:<22}{r.value:>9.4g}  {r.ad_mean:>16,.1f} ± {r.ad_sd:<9,.1f}  "
            f"{r.fd_mean:>16,.1f} ± {r.fd_sd:<9,.1f}  {bias}"
        )
    if not all(r.defined for r in report.values()):
        lines.append("FD = 0: the ±step changed no event on any seed, so the bias is undefined; "
                     "raise --fd-step, --agents, --days or --seeds.")
    return "\n".join(lines)

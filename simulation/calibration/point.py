"""Point calibration: Adam on any set of ``nn.Parameter``s through the simulator."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

__all__ = ["CalibrationError", "CalibrationResult", "calibrate"]


class CalibrationError(ValueError):
    """Bad calibration settings or a non-finite loss."""


@dataclass
class CalibrationResult:
    """Fitted values, loss history and cost (simulator runs, seconds)."""

    params: dict[str, float]
    losses: list[float]
    runs: int
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)


def calibrate(
    loss_fn: Callable[[], torch.Tensor],
    params: dict[str, torch.nn.Parameter] | Iterable[tuple[str, torch.nn.Parameter]],
    *,
    steps: int = 50,
    lr: float | dict[str, float] = 0.05,
    lr_decay: float = 1.0,
    tol: float | None = None,
    progress: Callable[[int, float], None] | None = None,
    report: Callable[[], dict[str, float]] | None = None,
) -> CalibrationResult:
    """Minimise ``loss_fn()`` (one simulator run per call) over ``params`` with Adam.

    ``report()`` maps the current parameters to the values recorded in the result
    (default: each parameter's scalar value). The learning rate is multiplied by
    ``lr_decay`` after every step; ``lr`` may be a dict giving each parameter its own rate. Stops early when the loss changes less than ``tol``.
    """
    named = dict(params)
    if not named:
        raise CalibrationError("no parameters to calibrate")
    rates = lr if isinstance(lr, dict) else dict.fromkeys(named, lr)
    if steps < 1 or set(rates) != set(named) or min(rates.values()) <= 0:
        raise CalibrationError("need steps >= 1 and a positive lr for every parameter")
    report = report or (lambda: {k: float(v.detach().mean()) for k, v in named.items()})
    opt = torch.optim.Adam([{"params": [p], "lr": rates[k]} for k, p in named.items()])
    schedule = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=lr_decay)
    losses: list[float] = []
    history: list[dict[str, float]] = []
    t0 = time.perf_counter()
    for step in range(steps):
        opt.zero_grad()
        loss = loss_fn()
        if not torch.isfinite(loss):
            raise CalibrationError(f"loss became {loss.item()} at step {step}")
        loss.backward()
        opt.step()
        schedule.step()
        losses.append(float(loss.detach()))
        history.append(report())
        if progress is not None:
            progress(step, losses[-1])
        if tol is not None and step and abs(losses[-2] - losses[-1]) < tol:
            break
    return CalibrationResult(report(), losses, len(losses), time.perf_counter() - t0, history)

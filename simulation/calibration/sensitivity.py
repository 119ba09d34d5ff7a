"""Sensitivity analysis (LPM paper §5.3): ∂(metric)/∂(every parameter).

Reverse mode gives the gradient of one scalar metric w.r.t. all parameters in one
backward pass. Forward mode (dual numbers, ``torch.autograd.forward_ad``) gives the
derivative of every output (e.g. the whole daily series) w.r.t. one parameter per pass:
cheaper when outputs outnumber parameters.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.autograd.forward_ad as fwAD
from torch import nn

__all__ = ["forward_sensitivity", "reverse_sensitivity"]


def reverse_sensitivity(model: nn.Module, metric: Callable[[], torch.Tensor]) -> dict[str, torch.Tensor]:
    """{parameter name: ∂metric/∂parameter} from one forward and one backward pass."""
    model.zero_grad()
    value = metric()
    if value.numel() != 1:
        raise ValueError("reverse mode needs a scalar metric")
    value.backward()
    return {
        name: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
        for name, p in model.named_parameters()
    }


@contextmanager
def _dual_parameter(model: nn.Module, name: str, tangent: torch.Tensor) -> Iterator[None]:
    *path, leaf = name.split(".")
    owner = model
    for part in path:
        owner = getattr(owner, part)
    original = owner._parameters[leaf]
    if original is None:
        raise KeyError(f"parameter {name!r} is None")
    dual = fwAD.make_dual(original.detach(), tangent)
    del owner._parameters[leaf]
    setattr(owner, leaf, dual)
    try:
        yield
    finally:
        delattr(owner, leaf)
        owner._parameters[leaf] = original


def forward_sensitivity(
    model: nn.Module, outputs: Callable[[], torch.Tensor], names: list[str] | None = None
) -> dict[str, torch.Tensor]:
    """{parameter name: ∂outputs/∂parameter (summed over the parameter's entries' unit tangent)}.

    For vector parameters the tangent is all-ones (a directional derivative); pass scalar
    parameters for plain partial derivatives.
    """
    params = dict(model.named_parameters())
    result = {}
    for name in names or list(params):
        if name not in params:
            raise KeyError(f"no parameter {name!r}")
        with fwAD.dual_level(), _dual_parameter(model, name, torch.ones_like(params[name])), torch.no_grad():
            out = outputs()
            tangent = fwAD.unpack_dual(out).tangent
            result[name] = torch.zeros_like(out) if tangent is None else tangent.detach().clone()
    return result

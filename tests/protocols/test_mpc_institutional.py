"""Institutional MPC across real processes (gloo on 127.0.0.1): 3 institutions, one of
two cells shared by two institutions, a dealer, the coordinator. The log-MSE loss and its
gradient are computed under CrypTen and checked against plaintext; forged queries (the
attack that extracted every institution's series in one round) are refused."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from coordinator.institutional import MPCSession
from protocols.mpc.crypten_compat import decode, import_crypten
from protocols.mpc.errors import QueryRefused
from protocols.mpc.query import LogLinearModel, QueryPolicy
from protocols.mpc.wire import Query

DAYS, CELLS, INSTITUTIONS = 12, 2, 3
START, END = "2020-03-01", "2020-03-12"


def test_crypten_imports_on_this_torch_and_we_decode_negatives_exactly():
    crypten = import_crypten()
    assert hasattr(crypten, "cryptensor")
    ring_value = torch.tensor([-65536, -32768, -1], dtype=torch.int64)  # -1.0, -0.5, -2^-16
    assert decode(ring_value).tolist() == [-1.0, -0.5, -(2.0**-16)]


def _write(path, columns: dict[str, list[float]], days: int = DAYS):
    frame = pd.DataFrame({"date_of_interest": pd.date_range(START, periods=days).strftime("%m/%d/%Y")})
    for name, values in columns.items():
        frame[name] = values
    frame.to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def counts() -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    y = (torch.rand(INSTITUTIONS, DAYS, generator=g, dtype=torch.float64) * 4000).round()
    y[0, :2] = 0.0  # empty days
    y[2, 5] = 30_000.0  # the public bound itself
    return y


@pytest.fixture(scope="module")
def session(tmp_path_factory, counts):
    path = _write(tmp_path_factory.mktemp("mpc") / "private.csv",
                  {f"INST{i}": counts[i].tolist() for i in range(INSTITUTIONS)})
    with MPCSession(path, [f"INST{i}" for i in range(INSTITUTIONS)], start=START, end=END, cells=[0, 1, 1],
                    model_args={"cells": CELLS, "days": DAYS}, policy=QueryPolicy(max_rounds=50)) as s:
        yield s


def _plaintext(theta: torch.Tensor, y_cells: torch.Tensor) -> tuple[float, torch.Tensor, float, float]:
    """Plaintext loss, gradient and the error bounds implied by |log error| ≤ 0.06."""
    y_hat, jac = LogLinearModel(CELLS, DAYS).evaluate(theta)
    a, b = torch.log1p(y_hat), torch.log1p(y_cells)
    w = jac / (1 + y_hat).unsqueeze(-1)
    n = a.numel()
    loss = ((a - b) ** 2).mean().item()
    grad = 2 * torch.einsum("ct,ctp->p", a - b, w) / n
    err = 0.06
    loss_bound = (2 * (a - b).abs().mean() * err + err**2).item()
    grad_bound = (2 * err * w.abs().sum(dim=(0, 1)) / n).max().item()
    return loss, grad, loss_bound, grad_bound


def test_loss_and_gradient_under_crypten_equal_plaintext(session, counts):
    y_cells = torch.stack([counts[0], counts[1] + counts[2]])  # institutions 1 and 2 share cell 1
    for theta in (torch.tensor([6.0, 7.5, 0.3]), torch.tensor([2.0, 9.0, -1.0])):
        result = session.round(theta.double())
        loss, grad, loss_bound, grad_bound = _plaintext(theta.double(), y_cells)
        assert math.isfinite(result.loss)
        assert abs(result.loss - loss) <= loss_bound, (result.loss, loss)
        assert (result.grad - grad).abs().max().item() <= grad_bound, (result.grad, grad)
    assert session.stats.bytes_received > 0


def test_identity_jacobian_query_is_refused_and_reveals_nothing(session):
    """The attack: P = C·T, J = identity, ŷ = 0 — the gradient would be −2y/n, every count."""
    n = CELLS * DAYS
    forged = Query(session.rounds, torch.zeros(n, dtype=torch.float64), torch.zeros(CELLS, DAYS, dtype=torch.float64),
                   torch.eye(n, dtype=torch.float64).reshape(CELLS, DAYS, n))
    with pytest.raises(QueryRefused, match="institution 0: θ, ŷ or J is not the public model"):
        session.query(forged)


def test_forged_multipliers_with_the_right_shape_are_refused(session):
    """Same P as the model, but J picks out chosen cells (a one-round partial extraction),
    or ŷ moved by one step of the 2^-16 grid: both differ from the public model at θ."""
    honest = session.evaluate(torch.tensor([6.0, 7.5, 0.3], dtype=torch.float64))
    picking = torch.zeros_like(honest.jac)
    picking[0, :3, 0] = picking[1, 3:6, 1] = 1.0
    ulp = honest.y_hat.clone()
    ulp[1, 4] += 2.0**-16
    for forged in (Query(session.rounds, honest.theta, honest.y_hat, picking),
                   Query(session.rounds, honest.theta, ulp, honest.jac)):
        with pytest.raises(QueryRefused, match="institution 1"):
            session.query(forged)
    assert math.isfinite(session.query(session.evaluate(honest.theta)).loss)  # the session still works


def test_theta_outside_the_public_box_is_refused(session):
    with pytest.raises(QueryRefused, match="public box"):
        session.round(torch.tensor([6.0, 25.0, 0.3], dtype=torch.float64))


def test_crypten_zero_sharing_from_mt19937_is_refused():
    from protocols.mpc.crypten_compat import _guard_przs
    from protocols.mpc.errors import DealerError

    guarded = _guard_przs(lambda *a, **k: pytest.fail("the mt19937 path ran"))
    assert guarded(torch.Size([0])).share.numel() == 0  # CrypTen's internal MPCTensor([])
    with pytest.raises(DealerError, match="mt19937"):
        guarded(torch.Size([3, 4]))


@pytest.mark.slow
def test_sharing_interoperates_with_crypten_across_three_processes():
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "protocols.mpc.selfcheck", "--world", "3"],
                         capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "interop ok" in res.stdout

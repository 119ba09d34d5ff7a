"""Query verification, budget, DP calibration and data loading of the institutional MPC
(in process: the checks each institution runs before it answers)."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from protocols.mpc.errors import BudgetExhausted, DataRejected, MPCError, QueryRefused
from protocols.mpc.loss import check_headroom, public_multipliers
from protocols.mpc.party import load_series
from protocols.mpc.query import (
    LogLinearModel,
    QueryPolicy,
    QueryVerifier,
    dp_noise_std,
    gaussian_noise,
)
from protocols.mpc.wire import Query

C, T = 3, 20


def _honest(theta: torch.Tensor, rnd: int = 0) -> Query:
    y_hat, jac = LogLinearModel(C, T).evaluate(theta)
    return Query(rnd, theta, y_hat, jac)


def test_verifier_accepts_the_public_model_and_refuses_anything_else():
    v = QueryVerifier(LogLinearModel(C, T), QueryPolicy(max_rounds=10), C, T)
    theta = torch.tensor([5.0, 6.0, 7.0, 0.5], dtype=torch.float64)
    v.check(_honest(theta))
    q = _honest(theta)
    with pytest.raises(QueryRefused, match="shape"):  # the extraction query: P = C·T, J = identity
        v.check(Query(1, torch.zeros(C * T, dtype=torch.float64), torch.zeros(C, T, dtype=torch.float64),
                      torch.eye(C * T, dtype=torch.float64).reshape(C, T, C * T)))
    for y_hat, jac in ((q.y_hat + 2.0**-16, q.jac), (q.y_hat, q.jac * 1.001), (q.y_hat, torch.zeros_like(q.jac))):
        with pytest.raises(QueryRefused, match="not the public model"):
            v.check(Query(1, theta, y_hat, jac))
    with pytest.raises(QueryRefused, match="public box"):
        v.check(_honest(torch.tensor([5.0, 6.0, 7.0, 30.0], dtype=torch.float64)))
    assert v.answered == 1  # refused queries spend no budget


def test_tolerance_admits_only_that_many_grid_steps():
    v = QueryVerifier(LogLinearModel(C, T), QueryPolicy(tolerance_ulps=1), C, T)
    q = _honest(torch.tensor([1.0, 2.0, 3.0, 0.1], dtype=torch.float64))
    v.check(Query(0, q.theta, q.y_hat + 2.0**-16, q.jac))
    with pytest.raises(QueryRefused):
        v.check(Query(0, q.theta, q.y_hat + 3 * 2.0**-16, q.jac))


def test_budget_is_enforced_per_run():
    v = QueryVerifier(LogLinearModel(C, T), QueryPolicy(max_rounds=3), C, T)
    for r in range(3):
        v.check(_honest(torch.tensor([1.0, 2.0, 3.0, 0.1 * r], dtype=torch.float64), r))
    with pytest.raises(BudgetExhausted):
        v.check(_honest(torch.tensor([1.0, 2.0, 3.0, 0.0], dtype=torch.float64), 3))


def test_policy_rejects_settings_that_void_it():
    for bad in ({"max_rounds": 0}, {"theta_low": 1.0, "theta_high": 0.0}, {"dp_epsilon": -1.0},
                {"tolerance_ulps": -1}, {"count_bound": 0.0}):
        with pytest.raises(MPCError):
            QueryPolicy(**bad)
    with pytest.raises(MPCError):
        QueryPolicy.from_json('{"max_rounds": "many"}')
    p = QueryPolicy(max_rounds=7, dp_epsilon=1.0)
    assert QueryPolicy.from_json(p.to_json()) == p


def test_dp_noise_matches_the_documented_calibration():
    y_hat, jac = LogLinearModel(C, T).evaluate(torch.tensor([5.0, 6.0, 7.0, 0.5], dtype=torch.float64))
    a, w = public_multipliers(y_hat, jac)
    assert dp_noise_std(QueryPolicy(), a, w) == 0.0
    policy = QueryPolicy(max_rounds=40, dp_epsilon=1.0, dp_delta=1e-6)
    log_inv = math.log(1e6)
    rho = (math.sqrt(log_inv + 1.0) - math.sqrt(log_inv)) ** 2 / 40
    n = a.numel()
    d = torch.maximum(a, math.log1p(policy.count_bound) - a)
    sens = torch.sqrt(((2 * d * math.log(2) + math.log(2) ** 2) / n) ** 2
                      + (2 * math.log(2) * w.norm(dim=-1) / n) ** 2).max().item()
    assert dp_noise_std(policy, a, w) == pytest.approx(sens / math.sqrt(2 * rho))
    z = gaussian_noise(20_000, 2.0)
    assert abs(z.mean().item()) < 0.1 and z.std().item() == pytest.approx(2.0, rel=0.05)


def test_headroom_check_is_public_and_refuses_huge_multipliers():
    y_hat, jac = LogLinearModel(C, T).evaluate(torch.tensor([5.0, 6.0, 7.0, 0.5], dtype=torch.float64))
    a, w = public_multipliers(y_hat, jac)
    assert check_headroom(a, w, 30_000.0)
    assert not check_headroom(a, w * 1e12, 30_000.0)


def _csv(tmp_path, values, days=None):
    days = days or len(values)
    frame = pd.DataFrame({"date_of_interest": pd.date_range("2020-03-01", periods=days).strftime("%m/%d/%Y"),
                          "X": values})
    frame.to_csv(tmp_path / "c.csv", index=False)
    return tmp_path / "c.csv"


def test_load_series_accepts_good_counts(tmp_path):
    y = load_series(_csv(tmp_path, [0.0, 3.0, 30_000.0]), "X", "2020-03-01", "2020-03-03", 30_000.0)
    assert y.tolist() == [0.0, 3.0, 30_000.0]


@pytest.mark.parametrize(("values", "end", "message"), [
    ([1.0, -2.0, 3.0], "2020-03-03", "negative count on 2020-03-02"),
    ([1.0, None, 3.0], "2020-03-03", "empty or non-numeric cell on 2020-03-02"),
    ([1.0, "n/a", 3.0], "2020-03-03", "empty or non-numeric cell on 2020-03-02"),
    ([1.0, 2.0, 3.0], "2020-03-04", "no row for 2020-03-04"),
    ([1.0, 2.0, 40_000.0], "2020-03-03", "above the public bound"),
])
def test_load_series_rejects_bad_counts_naming_the_day_not_the_value(tmp_path, values, end, message):
    with pytest.raises(DataRejected, match=message) as info:
        load_series(_csv(tmp_path, values), "X", "2020-03-01", end, 30_000.0)
    assert "40000" not in str(info.value).replace("30000", "")


def test_load_series_rejects_missing_file_and_column(tmp_path):
    with pytest.raises(DataRejected, match="no such case file"):
        load_series(tmp_path / "none.csv", "X", "2020-03-01", "2020-03-02", 10.0)
    with pytest.raises(DataRejected, match="needs columns"):
        load_series(_csv(tmp_path, [1.0, 2.0]), "Y", "2020-03-01", "2020-03-02", 10.0)

"""Institutional MPC sessions of their own (one party group per process, so these must not
overlap the module-scoped session of test_mpc_institutional): load-time data rejection,
budget and DP noise across real processes."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from coordinator.institutional import MPCSession
from protocols.mpc.errors import BudgetExhausted, DataRejected, MPCError
from protocols.mpc.loss import public_multipliers
from protocols.mpc.query import LogLinearModel, QueryPolicy, dp_noise_std

DAYS, START, END = 12, "2020-03-01", "2020-03-12"


def _write(path, columns):
    frame = pd.DataFrame({"date_of_interest": pd.date_range(START, periods=DAYS).strftime("%m/%d/%Y")})
    for name, values in columns.items():
        frame[name] = values
    frame.to_csv(path, index=False)
    return path


def test_an_empty_cell_is_rejected_at_load_naming_institution_and_day(tmp_path):
    """Before: the empty cell became NaN and failed later with a misleading headroom error."""
    path = _write(tmp_path / "cases.csv", {"GOOD": [1.0] * DAYS, "BAD": [5.0, float("nan"), *[3.0] * (DAYS - 2)]})
    with pytest.raises(DataRejected, match="empty or non-numeric cell on 2020-03-02") as info:
        MPCSession(path, ["GOOD", "BAD"], start=START, end=END, model_args={"cells": 2, "days": DAYS},
                   timeout=90)
    assert "institution 1" in str(info.value) and "headroom" not in str(info.value)


@pytest.mark.slow
def test_budget_and_dp_noise_across_processes(tmp_path):
    """Two answers with (ε = 1, δ = 1e-6)-DP noise over the run, then the budget refuses."""
    g = torch.Generator().manual_seed(5)
    y = (torch.rand(2, DAYS, generator=g, dtype=torch.float64) * 3000).round()
    path = _write(tmp_path / "cases.csv", {"A": y[0].tolist(), "B": y[1].tolist()})
    policy = QueryPolicy(max_rounds=2, dp_epsilon=1.0)
    theta = torch.tensor([6.0, 7.0, 0.2], dtype=torch.float64)
    with MPCSession(path, ["A", "B"], start=START, end=END, model_args={"cells": 2, "days": DAYS},
                    policy=policy) as s:
        answers = [s.round(theta) for _ in range(2)]
        with pytest.raises(BudgetExhausted, match="institution 0: its query budget is spent"):
            s.round(theta)
        with pytest.raises(MPCError, match="already belongs to a party group"):
            MPCSession(path, ["A"], start=START, end=END, model_args={"cells": 1, "days": DAYS})
    y_hat, _ = LogLinearModel(2, DAYS).evaluate(theta)
    loss = ((torch.log1p(y_hat) - torch.log1p(y)) ** 2).mean().item()
    sigma = dp_noise_std(policy, *public_multipliers(*LogLinearModel(2, DAYS).evaluate(theta)))
    assert sigma > 0
    assert answers[0].loss != answers[1].loss  # fresh noise each answer
    for a in answers:
        assert abs(a.loss - loss) < 6 * sigma + 0.1

"""CrypTen-backed institutional calibration: real processes over gloo on 127.0.0.1."""

import subprocess
import sys

import pandas as pd
import pytest
import torch

from coordinator.institutional import MPCSession
from protocols.mpc.crypten_compat import decode, import_crypten
from protocols.mpc.institutional import MPCError


def test_crypten_imports_on_this_torch_and_we_decode_negatives_exactly():
    crypten = import_crypten()
    assert hasattr(crypten, "cryptensor")
    ring_value = torch.tensor([-65536, -32768, -1], dtype=torch.int64)  # -1.0, -0.5, -2^-16
    assert decode(ring_value).tolist() == [-1.0, -0.5, -(2.0**-16)]


def test_sharing_interoperates_with_crypten_across_three_processes():
    res = subprocess.run([sys.executable, "-m", "protocols.mpc.selfcheck", "--world", "3"],
                         capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "interop ok" in res.stdout


@pytest.fixture(scope="module")
def private_files(tmp_path_factory):
    torch.manual_seed(0)
    k, t = 3, 20
    y = torch.randn(k, t, dtype=torch.float64) * 1500  # NYC-sized counts, negatives included
    frame = pd.DataFrame({"date_of_interest": pd.date_range("2020-03-01", periods=t).strftime("%m/%d/%Y")})
    for i in range(k):
        frame[f"INST{i}"] = y[i].numpy()
    path = tmp_path_factory.mktemp("mpc") / "private.csv"
    frame.to_csv(path, index=False)
    return path, torch.tensor(frame[[f"INST{i}" for i in range(k)]].to_numpy().T)


def test_mpc_loss_and_gradient_equal_plaintext(private_files):
    path, y = private_files
    k, t = y.shape
    rounds = []
    with MPCSession(path, [f"INST{i}" for i in range(k)], start="2020-03-01", end="2020-03-20") as session:
        with pytest.raises(MPCError):  # rejected before anything is sent; the session lives on
            session.round(torch.zeros(k, t), torch.zeros(k, t - 1, 2))
        with pytest.raises(MPCError):
            session.round(torch.full((k, t), float("nan")), torch.zeros(k, t, 2))
        for seed in range(2):  # two rounds on the same party group
            g = torch.Generator().manual_seed(seed)
            y_hat = torch.rand(k, t, generator=g, dtype=torch.float64) * 4000 - 1000
            jac = torch.randn(k, t, 3, generator=g, dtype=torch.float64) * 40
            rounds.append((y_hat, jac, session.round(y_hat, jac)))
        assert session.stats.bytes_received > 0
    for y_hat, jac, result in rounds:
        ys, yhs, js = y / 100, y_hat / 100, jac / 100
        loss = ((yhs - ys) ** 2).mean().item()
        grad = 2 * torch.einsum("kt,ktp->p", yhs - ys, js) / (k * t)
        assert result.loss == pytest.approx(loss, rel=1e-6, abs=1e-4)
        assert torch.allclose(result.grad, grad, atol=1e-4)


def test_headroom_check_covers_the_gradient_multipliers():
    from protocols.mpc.institutional import check_round_headroom
    from protocols.ring import RingOverflowError

    y = torch.full((120,), 60.0, dtype=torch.float64)  # NYC-sized counts / 100
    y_hat = torch.full((5, 120), 60.0, dtype=torch.float64)
    check_round_headroom(y, y_hat, torch.full((5, 120, 3), 60.0, dtype=torch.float64))  # fits
    with pytest.raises(RingOverflowError):  # ŷ small, but Σ y·J would wrap mod 2^64
        check_round_headroom(y, torch.ones(5, 120, dtype=torch.float64),
                             torch.full((5, 120, 3), 1e6, dtype=torch.float64))


def test_an_institution_refusing_a_round_fails_the_session_clearly(tmp_path):
    t = 10
    frame = pd.DataFrame({"date_of_interest": pd.date_range("2020-03-01", periods=t).strftime("%m/%d/%Y"),
                          "SMALL": [1.0] * t, "HUGE": [1e12] * t})
    frame.to_csv(tmp_path / "cases.csv", index=False)
    with pytest.raises(MPCError, match="institution 1 refused the round") as info:
        with MPCSession(tmp_path / "cases.csv", ["SMALL", "HUGE"], start="2020-03-01", end="2020-03-10") as s:
            s.round(torch.ones(2, t), torch.ones(2, t, 1))
    assert "e+" not in str(info.value).split("institution 1", 1)[1]  # no magnitude of its counts

"""Coordinator side of multi-institution private calibration (``lpm calibrate --institutions``).

Starts one process per institution (each reads only its own column of the case file), joins
the CrypTen/gloo party group as the last rank, and runs Adam on θ where every loss and
gradient comes from an MPC round: the coordinator never sees an institution's counts.
The per-borough simulator is the project SIR (expected-value mode) on a small random graph
per borough, scaled to the borough's population, with a shared ascertainment.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from protocols.mpc.crypten_compat import init_party
from protocols.mpc.institutional import MPCError, MPCResult, RoundStats, coordinator_round
from simulation.calibration.sensitivity import forward_sensitivity
from simulation.engine import simulate
from simulation.models import SIR
from simulation.population import random_contact_graph

__all__ = ["BOROUGH_COLUMNS", "InstitutionalRun", "MPCSession", "run_institutional_calibration"]

BOROUGH_COLUMNS = {"BX": "BX_CASE_COUNT", "BK": "BK_CASE_COUNT", "MN": "MN_CASE_COUNT",
                   "QN": "QN_CASE_COUNT", "SI": "SI_CASE_COUNT"}
BOROUGH_POPULATION = {"BX": 1.47e6, "BK": 2.7e6, "MN": 1.69e6, "QN": 2.4e6, "SI": 0.5e6}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MPCSession:
    """The coordinator's seat in a party group with one process per institution."""

    def __init__(self, data: str | Path, columns: list[str], *, start: str, end: str,
                 count_scale: float = 100.0, timeout: float = 120.0) -> None:
        self.k = len(columns)
        self.world = self.k + 1
        self.port = free_port()
        self.count_scale = count_scale
        self.timeout = timeout  # seconds each institution gets to exit on close() before a kill
        self.stats = RoundStats()
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        self.procs = [
            subprocess.Popen(
                [sys.executable, "-m", "protocols.mpc.party", "--rank", str(r), "--world", str(self.world),
                 "--port", str(self.port), "--data", str(data), "--column", col, "--start", start,
                 "--end", end, "--count-scale", str(count_scale)],
                env=env, stderr=subprocess.PIPE, text=True,
            )
            for r, col in enumerate(columns)
        ]
        try:
            init_party(self.k, self.world, self.port)
        except Exception:
            self.close()
            raise

    def round(self, y_hat: torch.Tensor, jac: torch.Tensor) -> MPCResult:
        """One MPC loss/gradient round; shapes are checked before anything is sent."""
        if y_hat.dim() != 2 or y_hat.shape[0] != self.k or jac.dim() != 3 or jac.shape[:2] != y_hat.shape:
            raise MPCError(f"need ŷ ({self.k}, T) and J ({self.k}, T, P); got {tuple(y_hat.shape)}, {tuple(jac.shape)}")
        if not (torch.isfinite(y_hat).all() and torch.isfinite(jac).all()):
            raise MPCError("ŷ and J must be finite")
        control = torch.tensor([1, *y_hat.shape, jac.shape[2]], dtype=torch.int64)
        try:
            dist.broadcast(control, src=self.k)
            return coordinator_round(y_hat, jac, self.count_scale, self.stats)
        except RuntimeError as exc:  # gloo: a party died (e.g. its headroom check refused)
            raise MPCError(f"MPC round failed: {self._party_failure() or exc}") from exc

    def _party_failure(self, wait: float = 5.0) -> str:
        """Last stderr line of each institution that exited non-zero, the root cause first
        (the others typically died of gloo's "connection closed by peer")."""
        deadline = time.monotonic() + wait
        failures = []
        for r, p in enumerate(self.procs):
            try:
                p.wait(timeout=max(deadline - time.monotonic(), 0.01))
            except subprocess.TimeoutExpired:
                continue
            if p.returncode != 0:
                lines = [ln for ln in (p.stderr.read() if p.stderr else "").splitlines() if ln.strip()]
                failures.append(f"institution {r} exited with {p.returncode}: {lines[-1] if lines else ''}")
        failures.sort(key=lambda f: "by peer" in f)
        return "; ".join(failures)

    def close(self, *, raise_errors: bool = True) -> None:
        """Stop the institutions, leave the group; raise MPCError if an institution failed."""
        if dist.is_initialized():
            try:
                dist.broadcast(torch.zeros(4, dtype=torch.int64), src=self.k)
            except RuntimeError:
                pass  # a party is already gone; its exit status is reported below
            finally:
                dist.destroy_process_group()
        errors = []
        for r, p in enumerate(self.procs):
            try:
                p.wait(timeout=self.timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            if p.returncode != 0:
                tail = p.stderr.read()[-2000:] if p.stderr and p.returncode > 0 else ""
                errors.append(f"institution {r} exited with {p.returncode}: {tail}")
        if errors and raise_errors:
            raise MPCError(errors[0])

    def __enter__(self) -> MPCSession:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close(raise_errors=exc_type is None)  # never mask the error already raised


class BoroughModel(nn.Module):
    """ŷ_k(t) = ρ · new infections of borough k's SIR (β_k) scaled to its population."""

    def __init__(self, boroughs: list[str], agents: int, days: int, seed: int = 0) -> None:
        super().__init__()
        self.boroughs, self.days, self.seed = boroughs, days, seed
        self.log_beta = nn.ParameterDict({b: nn.Parameter(torch.log(torch.tensor(0.3))) for b in boroughs})
        self.logit_ascertainment = nn.Parameter(torch.logit(torch.tensor(0.1)))
        self.graphs = {b: random_contact_graph(agents, 10, seed=seed + i) for i, b in enumerate(boroughs)}
        self.sir = {b: SIR(beta=0.3, gamma=1 / 7, initial_infected=2e-3) for b in boroughs}
        self.agents = agents

    def forward(self) -> torch.Tensor:
        rows = []
        for b in self.boroughs:
            beta_t = torch.exp(self.log_beta[b]).expand(self.days)
            tr = simulate(self.sir[b], self.graphs[b], self.days, self.seed, estimator="expected",
                          extras={"beta_t": beta_t})
            rows.append(tr["new_infections"][1:] * BOROUGH_POPULATION[b] / self.agents)
        return torch.sigmoid(self.logit_ascertainment) * torch.stack(rows)


@dataclass
class InstitutionalRun:
    losses: list[float]
    theta: dict[str, float]
    seconds_per_round: float
    bytes_per_round: float
    y_hat: torch.Tensor
    history: list[dict[str, float]] = field(default_factory=list)


def run_institutional_calibration(
    data: str | Path,
    boroughs: list[str] | None = None,
    *,
    start: str = "2020-03-01",
    end: str = "2020-06-28",
    steps: int = 20,
    agents: int = 2_000,
    lr: float = 0.1,
    progress: Callable[[int, float], None] | None = None,
) -> InstitutionalRun:
    """Adam on (log β per borough, logit ascertainment) with MPC losses and gradients."""
    boroughs = boroughs or list(BOROUGH_COLUMNS)
    unknown = set(boroughs) - set(BOROUGH_COLUMNS)
    if unknown:
        raise ValueError(f"unknown institutions {sorted(unknown)}; choose from {sorted(BOROUGH_COLUMNS)}")
    if not Path(data).exists():
        raise FileNotFoundError(f"no such case file: {data}")
    days = (date.fromisoformat(end) - date.fromisoformat(start)).days + 1
    if days < 2:
        raise ValueError("end must be after start")
    model = BoroughModel(boroughs, agents, days)
    params = dict(model.named_parameters())
    opt = torch.optim.Adam(params.values(), lr=lr)
    losses, history, round_times = [], [], []
    with MPCSession(data, [BOROUGH_COLUMNS[b] for b in boroughs], start=start, end=end) as session:
        for step in range(steps):
            with torch.no_grad():
                y_hat = model()
            tangents = forward_sensitivity(model, model, list(params))
            jac = torch.stack([tangents[name] for name in params], dim=-1)
            t0 = time.perf_counter()
            result = session.round(y_hat, jac)
            round_times.append(time.perf_counter() - t0)
            for (_name, p), g in zip(params.items(), result.grad, strict=True):
                p.grad = g.to(p.dtype).reshape(p.shape)
            opt.step()
            losses.append(result.loss)
            history.append({b: float(torch.exp(model.log_beta[b])) for b in boroughs})
            if progress is not None:
                progress(step, result.loss)
        bytes_per_round = (session.stats.bytes_sent + session.stats.bytes_received) / max(steps, 1)
    theta = {**history[-1], "ascertainment": float(torch.sigmoid(model.logit_ascertainment))}
    return InstitutionalRun(losses, theta, sum(round_times) / len(round_times), bytes_per_round, y_hat, history)

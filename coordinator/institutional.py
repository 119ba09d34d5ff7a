"""Coordinator side of multi-institution private calibration (``lpm calibrate --institutions``).

Starts the dealer and one process per institution (each reads only its own column of the case
file and runs the same *public* model as the coordinator), joins the party group as the last
computing rank, sets up the shared log-counts under CrypTen, and runs Adam on θ where every
loss and gradient comes from a verified MPC round: the coordinator never sees an
institution's counts or residuals, only L and ∂L/∂θ for each θ it asks about, within the
institutions' query budget. See ``docs/mpc.md``.
"""

from __future__ import annotations

import os
import selectors
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import torch
import torch.autograd.forward_ad as fwAD
import torch.distributed as dist
from torch import nn

from protocols.mpc.errors import DataRejected, MPCError
from protocols.mpc.institutional import MPCResult, coordinator_round
from protocols.mpc.loss import RoundStats, setup_shared_logs, share_counts
from protocols.mpc.query import QueryPolicy, load_public_model, single_thread
from protocols.mpc.wire import CONTROL_STOP, Query, encode_control
from simulation.distributed.launch import free_port
from simulation.population.boroughs import BOROUGH_POPULATION, BOROUGHS

__all__ = ["BOROUGH_COLUMNS", "BoroughPublicModel", "InstitutionalRun", "MPCSession", "borough_public_model",
           "run_institutional_calibration"]

BOROUGH_COLUMNS = {b: f"{b}_CASE_COUNT" for b in BOROUGHS}  # NYC open-data case columns


class MPCSession:
    """The coordinator's seat in a party group: K institutions, the coordinator, a dealer.

    ``model``/``model_args`` name the public model every party evaluates (``module:factory``);
    ``policy`` is the institutions' query policy (budget, box, DP); ``cells`` maps each
    institution to the cell its counts add to (default: one cell each).
    """

    def __init__(self, data: str | Path, columns: list[str], *, start: str, end: str,
                 model: str = "protocols.mpc.query:log_linear_model", model_args: dict | None = None,
                 policy: QueryPolicy | None = None, cells: list[int] | None = None,
                 timeout: float = 120.0) -> None:
        import json

        self.k = len(columns)
        if self.k < 1:
            raise MPCError("need at least one institution")
        if dist.is_initialized():
            raise MPCError("this process already belongs to a party group: close the other MPCSession first")
        self.cells = list(cells) if cells is not None else list(range(self.k))
        self.n_cells = max(self.cells) + 1
        self.days = (date.fromisoformat(end) - date.fromisoformat(start)).days + 1
        self.policy = policy or QueryPolicy()
        self.model = load_public_model(model, model_args)
        self.timeout = timeout  # seconds each process gets to become ready / to exit on close()
        self.stats = RoundStats()
        self.rounds = 0
        self._joined = False
        port = free_port()
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        base = [sys.executable, "-m", "protocols.mpc.party", "--institutions", str(self.k), "--port", str(port)]
        self.procs = [
            subprocess.Popen(
                [*base, "--rank", str(r), "--data", str(data), "--column", col, "--start", start, "--end", end,
                 "--cells", ",".join(map(str, self.cells)), "--model", model,
                 "--model-args", json.dumps(model_args or {}), "--policy", self.policy.to_json()],
                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for r, col in enumerate(columns)
        ]
        self.dealer = subprocess.Popen([*base, "--dealer"], env=env, stderr=subprocess.PIPE, text=True)
        try:
            self._wait_ready()
            from protocols.mpc.crypten_compat import init_computing_party, main_group

            _, self.provider = init_computing_party(self.k, self.k + 1, port)
            self._joined = True
            self.group = main_group()
            t0 = time.perf_counter()
            x = share_counts(None, self.k, self.cells, self.n_cells, self.days, self.group, self.stats)
            self.shared = setup_shared_logs(x)
            self.setup_seconds = time.perf_counter() - t0
        except BaseException:
            self.close(raise_errors=False, grace=1.0)
            raise

    def _wait_ready(self) -> None:
        """Each institution prints ``ready`` once its own data loaded; a load error becomes
        :class:`DataRejected` naming the institution, before anyone joins the group."""
        deadline = time.monotonic() + self.timeout
        for r, p in enumerate(self.procs):
            if p.stdout is None:
                raise MPCError(f"institution {r} has no stdout pipe")
            sel = selectors.DefaultSelector()
            sel.register(p.stdout, selectors.EVENT_READ)
            line = ""
            if sel.select(timeout=max(deadline - time.monotonic(), 0.01)):
                line = p.stdout.readline().strip()
            sel.close()
            if line != "ready":
                try:
                    p.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    raise MPCError(f"institution {r} did not become ready in {self.timeout:.0f} s") from None
                lines = [ln for ln in (p.stderr.read() if p.stderr else "").splitlines() if ln.strip()]
                raise DataRejected(lines[-1] if lines else f"institution {r} exited with {p.returncode}")

    def evaluate(self, theta: torch.Tensor) -> Query:
        """The honest query for θ: the public model's ŷ and J (one thread: bit-identical)."""
        theta = theta.detach().double().reshape(-1)
        with single_thread():
            y_hat, jac = self.model.evaluate(theta.clone())
        return Query(self.rounds, theta, y_hat.detach().double(), jac.detach().double())

    def round(self, theta: torch.Tensor) -> MPCResult:
        """One MPC loss/gradient round at θ."""
        return self.query(self.evaluate(theta))

    def query(self, q: Query) -> MPCResult:
        """Send a query as built (``round`` builds honest ones); raises :class:`QueryRefused`
        if any institution refuses it (the session stays usable)."""
        if not self._joined:
            raise MPCError("the session is closed")
        if q.y_hat.shape != (self.n_cells, self.days):
            raise MPCError(f"need ŷ of shape ({self.n_cells}, {self.days}), got {tuple(q.y_hat.shape)}")
        try:
            return coordinator_round(q, self.shared, self.k, self.group, self.stats)
        except RuntimeError as exc:  # gloo: a party died
            if isinstance(exc, MPCError):
                raise
            raise MPCError(f"MPC round failed: {self._party_failure() or exc}") from exc
        finally:
            self.rounds += 1

    def _party_failure(self, wait: float = 5.0) -> str:
        """Last stderr line of each process that exited non-zero (root cause first)."""
        deadline = time.monotonic() + wait
        failures = []
        for name, p in [*((f"institution {r}", p) for r, p in enumerate(self.procs)), ("dealer", self.dealer)]:
            try:
                p.wait(timeout=max(deadline - time.monotonic(), 0.01))
            except subprocess.TimeoutExpired:
                continue
            if p.returncode != 0:
                lines = [ln for ln in (p.stderr.read() if p.stderr else "").splitlines() if ln.strip()]
                failures.append(f"{name} exited with {p.returncode}: {lines[-1] if lines else ''}")
        failures.sort(key=lambda f: "by peer" in f)
        return "; ".join(failures)

    def close(self, *, raise_errors: bool = True, grace: float | None = None) -> None:
        """Stop the institutions, leave the group; raise MPCError if a process failed.

        ``grace`` (default ``timeout``) is how long each process gets to exit before a kill."""
        from protocols.mpc.crypten_compat import leave

        if self._joined:
            self._joined = False
            try:
                dist.broadcast(encode_control(CONTROL_STOP), src=self.k, group=self.group)
            except RuntimeError:
                pass  # a party is already gone; its exit status is reported below
            finally:
                leave()
        errors = []
        for name, p in [*((f"institution {r}", p) for r, p in enumerate(self.procs)), ("dealer", self.dealer)]:
            try:
                p.wait(timeout=self.timeout if grace is None else grace)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            if p.returncode != 0:
                tail = p.stderr.read()[-2000:] if p.stderr and p.returncode > 0 else ""
                errors.append(f"{name} exited with {p.returncode}: {tail}")
            for stream in (p.stdout, p.stderr):
                if stream is not None:
                    stream.close()
        if errors and raise_errors:
            raise MPCError(errors[0])

    def __enter__(self) -> MPCSession:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close(raise_errors=exc_type is None)  # never mask the error already raised


class BoroughModel(nn.Module):
    """ŷ_k(t) = ρ · new infections of borough k's SIR (β_k) scaled to its population."""

    def __init__(self, boroughs: list[str], agents: int, days: int, seed: int = 0) -> None:
        from simulation.models import SIR
        from simulation.population import random_contact_graph

        super().__init__()
        self.boroughs, self.days, self.seed = boroughs, days, seed
        self.log_beta = nn.ParameterDict({b: nn.Parameter(torch.log(torch.tensor(0.3))) for b in boroughs})
        self.logit_ascertainment = nn.Parameter(torch.logit(torch.tensor(0.1)))
        self.graphs = {b: random_contact_graph(agents, 10, seed=seed + i) for i, b in enumerate(boroughs)}
        self.sir = {b: SIR(beta=0.3, gamma=1 / 7, initial_infected=2e-3) for b in boroughs}
        self.agents = agents

    def borough(self, b: str, log_beta: torch.Tensor) -> torch.Tensor:
        """New infections per day in borough ``b`` (population-scaled, before ascertainment)."""
        from simulation.engine import simulate

        beta_t = torch.exp(log_beta).expand(self.days)
        tr = simulate(self.sir[b], self.graphs[b], self.days, self.seed, estimator="expected",
                      extras={"beta_t": beta_t})
        return tr["new_infections"][1:] * BOROUGH_POPULATION[b] / self.agents

    def forward(self) -> torch.Tensor:
        rows = [self.borough(b, self.log_beta[b]) for b in self.boroughs]
        return torch.sigmoid(self.logit_ascertainment) * torch.stack(rows)


class BoroughPublicModel:
    """The public model of ``lpm calibrate --institutions``: θ = (log β per borough, logit ρ).

    ŷ (K, T) and its exact Jacobian (K, T, K + 1): one forward-mode pass per borough (∂/∂log β_k
    touches borough k only) and ∂ŷ/∂logit ρ = ŷ·(1 − ρ) in closed form.
    """

    def __init__(self, boroughs: list[str], agents: int, days: int, seed: int = 0) -> None:
        self.module = BoroughModel(boroughs, agents, days, seed)
        self.boroughs, self.days = list(boroughs), days
        self.n_params = len(boroughs) + 1

    def initial_theta(self) -> torch.Tensor:
        return torch.tensor([float(self.module.log_beta[b].detach()) for b in self.boroughs]
                            + [float(self.module.logit_ascertainment.detach())], dtype=torch.float64)

    def evaluate(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if theta.shape != (self.n_params,):
            raise MPCError(f"θ must have {self.n_params} entries")
        k = len(self.boroughs)
        rho = torch.sigmoid(theta[k].float()).double()
        rows, tangents = [], []
        with torch.no_grad(), fwAD.dual_level():
            for i, b in enumerate(self.boroughs):
                dual = fwAD.make_dual(theta[i].float(), torch.ones((), dtype=torch.float32))
                primal, tangent = fwAD.unpack_dual(self.module.borough(b, dual))
                rows.append(primal.double())
                tangents.append(tangent.double() if tangent is not None else torch.zeros_like(primal.double()))
        raw = torch.stack(rows)
        y_hat = rho * raw
        jac = torch.zeros(k, self.days, self.n_params, dtype=torch.float64)
        jac[torch.arange(k), :, torch.arange(k)] = rho * torch.stack(tangents)
        jac[:, :, k] = y_hat * (1 - rho)
        return y_hat, jac


def borough_public_model(boroughs: list[str], agents: int, days: int, seed: int = 0) -> BoroughPublicModel:
    """Factory named in the institutions' run configuration."""
    return BoroughPublicModel(boroughs, agents, days, seed)


@dataclass
class InstitutionalRun:
    losses: list[float]
    theta: dict[str, float]
    seconds_per_round: float
    bytes_per_round: float
    y_hat: torch.Tensor
    setup_seconds: float = 0.0
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
    policy: QueryPolicy | None = None,
    progress: Callable[[int, float], None] | None = None,
) -> InstitutionalRun:
    """Adam on θ = (log β per borough, logit ascertainment) with MPC losses and gradients.

    The institutions' default policy answers exactly ``steps`` rounds.
    """
    boroughs = boroughs or list(BOROUGH_COLUMNS)
    unknown = set(boroughs) - set(BOROUGH_COLUMNS)
    if unknown:
        raise ValueError(f"unknown institutions {sorted(unknown)}; choose from {sorted(BOROUGH_COLUMNS)}")
    if not Path(data).exists():
        raise FileNotFoundError(f"no such case file: {data}")
    days = (date.fromisoformat(end) - date.fromisoformat(start)).days + 1
    if days < 2:
        raise ValueError("end must be after start")
    model_args = {"boroughs": boroughs, "agents": agents, "days": days}
    policy = policy or QueryPolicy(max_rounds=steps)
    losses, history, round_times = [], [], []
    with MPCSession(data, [BOROUGH_COLUMNS[b] for b in boroughs], start=start, end=end,
                    model="coordinator.institutional:borough_public_model", model_args=model_args,
                    policy=policy) as session:
        if not isinstance(session.model, BoroughPublicModel):
            raise MPCError("the session's public model is not the borough model")
        theta = nn.Parameter(session.model.initial_theta())
        opt = torch.optim.Adam([theta], lr=lr)
        for step in range(steps):
            query = session.evaluate(theta)
            t0 = time.perf_counter()
            result = session.query(query)
            round_times.append(time.perf_counter() - t0)
            theta.grad = result.grad.to(theta.dtype)
            opt.step()
            losses.append(result.loss)
            history.append({b: float(torch.exp(theta[i])) for i, b in enumerate(boroughs)})
            if progress is not None:
                progress(step, result.loss)
        y_hat = query.y_hat
        bytes_per_round = (session.stats.bytes_sent + session.stats.bytes_received) / max(steps, 1)
        setup = session.setup_seconds
    theta_out = {**history[-1], "ascertainment": float(torch.sigmoid(theta[len(boroughs)]))}
    return InstitutionalRun(losses, theta_out, sum(round_times) / len(round_times), bytes_per_round, y_hat,
                            setup, history)

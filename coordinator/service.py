"""Coordinator HTTP service (FastAPI): runs, daily series (JSON/CSV/PNG), calibration, the
signed model bundle, the public exposure feed and Prometheus metrics.

Reads are open; writes need ``Authorization: Bearer <token>``. ``create_app(store, token)``
builds the app; serve it with uvicorn (``lpm coordinator``).
"""


import csv
import hmac
import io
import json
import logging
import threading
import time
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Query, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from pydantic import BaseModel, Field

from coordinator.runner import RunConfig, RunConfigError, execute_run
from coordinator.store import CoordinatorStore, RunNotFoundError, RunRecord

__all__ = ["create_app", "RunCreate", "RunStatus", "render_plot"]

_log = logging.getLogger(__name__)


class RunCreate(BaseModel):
    """Body of POST /runs."""

    population: str = Field("tiny", description="population preset (tiny, oxford, nyc)")
    scale: float = Field(1.0, gt=0, le=1.0)
    days: int = Field(10, ge=1, le=365)
    seed: int = Field(0, ge=0)
    devices: int = Field(50, ge=1, le=100_000)
    beta: float = Field(0.5, gt=0, le=10)
    gamma: float = Field(0.1, gt=0, le=1)
    initial_infected: float = Field(0.01, ge=0, le=1)
    variant: str = Field("assisted", pattern="^(assisted|peer)$")


class RunStatus(BaseModel):
    """A run's status and progress."""

    id: str
    status: str
    days: int
    completed_days: int
    progress: float
    config: dict[str, Any]
    error: str | None = None


def _status(rec: RunRecord) -> RunStatus:
    return RunStatus(id=rec.id, status=rec.status, days=rec.days,
                     completed_days=rec.completed_days, progress=rec.progress,
                     config=rec.config, error=rec.error)


_FLAT = ("day", "S", "I", "R", "new_infections", "physical_I", "physical_new_infections",
         "physical_expected_new", "physical_dp_dbeta")


def create_app(store: CoordinatorStore, token: str, *, execute: bool = True) -> FastAPI:
    """The service over ``store``; POST /runs starts the run loop in a thread if ``execute``."""
    if len(token) < 16:
        raise ValueError("the write token must be at least 16 characters")
    app = FastAPI(title="lpm-edge coordinator", version="1")
    bearer = HTTPBearer(auto_error=False)
    registry = CollectorRegistry()
    requests = Counter("lpm_http_requests_total", "HTTP requests", ["path", "status"],
                       registry=registry)
    latency = Histogram("lpm_http_request_seconds", "HTTP latency", ["path"], registry=registry)
    runs_started = Counter("lpm_runs_started_total", "Runs started", registry=registry)
    threads: dict[str, threading.Thread] = {}
    series_cache: dict[str, tuple[int | None, bytes]] = {}  # run -> (last day, JSON body)

    app.add_middleware(_MetricsMiddleware, latency=latency, requests=requests)

    def require_token(
        cred: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    ) -> None:
        if cred is None or not hmac.compare_digest(cred.credentials.encode(), token.encode()):
            raise HTTPException(401, "a valid bearer token is required",
                                headers={"WWW-Authenticate": "Bearer"})

    def get(run_id: str) -> RunRecord:
        try:
            return store.get_run(run_id)
        except RunNotFoundError:
            raise HTTPException(404, f"no run {run_id!r}") from None

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/runs", status_code=201, dependencies=[Depends(require_token)])
    def create_run(body: RunCreate) -> RunStatus:
        try:
            cfg = RunConfig(**body.model_dump())
        except RunConfigError as exc:
            raise HTTPException(422, str(exc)) from None
        rid = store.create_run(cfg.to_dict(), cfg.days)
        if execute:
            t = threading.Thread(target=_run_quietly, args=(store, rid), daemon=True)
            threads[rid] = t
            t.start()
            runs_started.inc()
        return _status(store.get_run(rid))

    @app.get("/runs")
    def list_runs() -> list[RunStatus]:
        return [_status(r) for r in store.list_runs()]

    @app.get("/runs/{run_id}")
    async def run_status(run_id: str) -> RunStatus:
        return _status(get(run_id))

    @app.get("/runs/{run_id}/series")
    async def series(run_id: str, format: Annotated[str, Query(pattern="^(json|csv)$")] = "json"):
        version = store.last_day(run_id) if run_id in series_cache else None
        cached = series_cache.get(run_id)
        if format == "json" and cached is not None and cached[0] == version:
            return Response(cached[1], media_type="application/json")
        get(run_id)
        rows = store.series(run_id)
        if format == "json":
            body = json.dumps({"run_id": run_id, "series": rows}).encode()
            series_cache[run_id] = (rows[-1]["day"] if rows else None, body)
            return Response(body, media_type="application/json")
        buf = io.StringIO()
        cols = [c for c in _FLAT if any(c in r for r in rows)] or ["day"]
        w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
        return Response(buf.getvalue(), media_type="text/csv")

    @app.get("/runs/{run_id}/plot.png")
    def plot(run_id: str) -> Response:
        get(run_id)
        rows = store.series(run_id)
        if not rows:
            raise HTTPException(404, "no completed day yet")
        return Response(render_plot(rows, title=f"run {run_id}"), media_type="image/png")

    @app.get("/runs/{run_id}/calibration")
    def calibration(run_id: str) -> dict[str, Any]:
        get(run_id)
        result = store.calibration(run_id)
        if result is None:
            raise HTTPException(404, "no calibration for this run")
        return result

    @app.get("/bundle")
    def bundle() -> Response:
        latest = store.latest_bundle()
        if latest is None:
            raise HTTPException(404, "no model bundle published yet")
        version, blob = latest
        return Response(blob, media_type="application/octet-stream",
                        headers={"X-Model-Version": version})

    @app.get("/exposure")
    def exposure(run_id: str | None = None) -> dict[str, Any]:
        runs = [get(run_id)] if run_id else list(reversed(store.list_runs()))
        for rec in runs:
            rows = store.series(rec.id)
            if rows:
                last = rows[-1]
                return {"run_id": rec.id, "day": last["day"],
                        "prevalence": last.get("exposure", {})}
        raise HTTPException(404, "no exposure published yet")

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    app.state.run_threads = threads
    return app


class _MetricsMiddleware:
    """Pure ASGI middleware: request count and latency per route (cheaper than
    BaseHTTPMiddleware, which runs every request through an extra task)."""

    def __init__(self, app, latency: Histogram, requests: Counter) -> None:
        self.app, self.latency, self.requests = app, latency, requests

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = {"code": 500}

        async def send_wrapper(message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", "unmatched")
            self.latency.labels(path).observe(time.perf_counter() - t0)
            self.requests.labels(path, str(status["code"])).inc()


def _run_quietly(store: CoordinatorStore, run_id: str) -> None:
    try:
        execute_run(store, run_id)
    except Exception:  # noqa: BLE001 - thread boundary: logged, and stored as the run's status
        _log.exception("run %s failed", run_id)


def render_plot(rows: list[dict[str, Any]], title: str = "") -> bytes:
    """PNG of the daily S/I/R series."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=90)
    days = [r["day"] for r in rows]
    for c in ("S", "I", "R"):
        ax.plot(days, [r[c] for r in rows], label=c)
    ax.set_xlabel("day")
    ax.set_ylabel("agents")
    ax.set_title(title)
    ax.legend()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()

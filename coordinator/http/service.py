"""Coordinator HTTP service (FastAPI): runs, daily series (JSON/CSV/PNG), calibration, the
signed model bundle, the public exposure feed and Prometheus metrics.

Reads are open; writes need ``Authorization: Bearer <token>``. ``create_app(store, token)``
builds the app; serve it with uvicorn (``lpm coordinator``).

Hardening: a pure-ASGI guard checks the bearer token of every write and the body size
(``Content-Length`` and the streamed bytes) *before* anything reads or parses the body;
handlers that touch SQLite are plain ``def`` (run in the threadpool, never blocking the
event loop); derived read bodies (series, exposure, plot) are cached on the last committed
round, so a read costs one indexed lookup.

Read latency (issue 14): a successful GET response is kept, as bytes, while the database is
unchanged (``PRAGMA data_version`` on a connection of the event loop's own, ~2 µs, sees every
commit by any connection or process), and served again from the event loop without routing,
validation or a threadpool hop. :func:`serve` (used by ``lpm coordinator``) also freezes the
startup heap out of the garbage collector: before it, full collections of ~240k long-lived
objects stalled the event loop for 100–180 ms twice a second under load (the p99 tail).
"""


import asyncio
import csv
import gc
import hmac
import io
import json
import logging
import math
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Annotated, Any, cast

from fastapi import Depends, FastAPI, HTTPException, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from coordinator.run_config import MAX_SEED, RunConfig
from coordinator.runner import DEFAULT_MIN_DEVICES, execute_run
from coordinator.store import CoordinatorStore, RunNotFoundError, RunRecord

__all__ = ["create_app", "serve", "RunStatus", "WriteToken", "render_plot",
           "MAX_BODY_BYTES", "MAX_SEED"]

_log = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 1024  # a POST /runs body is ~200 bytes
MIN_TOKEN_CHARS = 16
_CACHE_ENTRIES = 64


class WriteToken:
    """The coordinator's write token. Its ``repr``/``str`` never show the value, so it stays
    out of tracebacks, logs and debuggers' local-variable dumps; :meth:`reveal` gives it."""

    __slots__ = ("_value",)

    def __init__(self, value: "str | WriteToken") -> None:
        raw = value.reveal() if isinstance(value, WriteToken) else value
        if not isinstance(raw, str):
            raise TypeError("a write token is a string")
        if len(raw) < MIN_TOKEN_CHARS:
            raise ValueError(f"the write token must be at least {MIN_TOKEN_CHARS} characters "
                             f"(got {len(raw)})")
        self._value = raw

    def reveal(self) -> str:
        return self._value

    def matches(self, candidate: str | bytes) -> bool:
        """Constant-time comparison with a presented credential."""
        cand = candidate.encode() if isinstance(candidate, str) else candidate
        return hmac.compare_digest(cand, self._value.encode())

    def __repr__(self) -> str:
        return "WriteToken('***')"

    __str__ = __repr__

    def __reduce__(self):  # never pickled into a crash dump or a worker
        raise TypeError("a WriteToken cannot be pickled")


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


class _Cache:
    """A small LRU of response bodies keyed by (what, marker); thread-safe. ``get_or_make``
    builds a missing body once even when many requests miss at the same time."""

    def __init__(self, size: int = _CACHE_ENTRIES) -> None:
        self._data: OrderedDict[Any, Any] = OrderedDict()
        self._lock = threading.Lock()
        self._build = threading.Lock()
        self._size = size

    def get(self, key: Any) -> Any:
        with self._lock:
            if key in self._data:
                self._data.move_to_end(key)
                return self._data[key]
        return None

    def put(self, key: Any, value: Any) -> None:
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self._size:
                self._data.popitem(last=False)

    def get_or_make(self, key: Any, make: Callable[[], Any]) -> Any:
        hit = self.get(key)
        if hit is not None:
            return hit
        with self._build:
            hit = self.get(key)
            if hit is None:
                hit = make()
                self.put(key, hit)
            return hit


def _json_safe(value: Any) -> Any:
    """Validation-error details made JSON-safe (non-finite floats, bytes and objects as text)."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def create_app(store: CoordinatorStore, token: "str | WriteToken", *, execute: bool = True,
               max_body_bytes: int = MAX_BODY_BYTES,
               min_devices: int = DEFAULT_MIN_DEVICES) -> FastAPI:
    """The service over ``store``; POST /runs starts the run loop in a thread if ``execute``."""
    secret = WriteToken(token)
    del token
    app = FastAPI(title="lpm-edge coordinator", version="1")
    bearer = HTTPBearer(auto_error=False)
    registry = CollectorRegistry()
    requests = Counter("lpm_http_requests_total", "HTTP requests", ["path", "status"],
                       registry=registry)
    latency = Histogram("lpm_http_request_seconds", "HTTP latency", ["path"], registry=registry)
    runs_started = Counter("lpm_runs_started_total", "Runs started", registry=registry)
    threads: dict[str, threading.Thread] = {}
    cache = _Cache()

    app.add_middleware(_ReadCacheMiddleware, version=_StoreVersion(store.path),
                       paths=_CACHEABLE)
    app.add_middleware(_MetricsMiddleware, latency=latency, requests=requests)
    app.add_middleware(_GuardMiddleware, token=secret, max_body_bytes=max_body_bytes)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{k: _json_safe(v) for k, v in e.items() if k != "url"} for e in exc.errors()]
        return JSONResponse({"detail": errors}, status_code=422)

    def require_token(
        cred: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    ) -> None:
        if cred is None or not secret.matches(cred.credentials):
            raise HTTPException(401, "a valid bearer token is required",
                                headers={"WWW-Authenticate": "Bearer"})

    def get(run_id: str) -> RunRecord:
        try:
            return store.get_run(run_id)
        except RunNotFoundError:
            raise HTTPException(404, f"no run {run_id!r}") from None

    def last_day(run_id: str) -> int | None:
        day = store.last_day(run_id)
        if day is None:
            get(run_id)  # 404 for an unknown run, None for a run without a completed day
        return day

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/runs", status_code=201, dependencies=[Depends(require_token)])
    def create_run(body: RunConfig) -> RunStatus:
        if body.devices < min_devices:  # issue 12: minimum cohort
            raise HTTPException(422, f"devices={body.devices} is below the minimum cohort "
                                     f"of {min_devices}")
        rid = store.create_run(body.to_dict(), body.days)
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
    def run_status(run_id: str) -> RunStatus:
        return _status(get(run_id))

    @app.get("/runs/{run_id}/series")
    def series(run_id: str, format: Annotated[str, Query(pattern="^(json|csv)$")] = "json"
               ) -> Response:
        day = last_day(run_id)

        def make() -> bytes:
            rows = withhold_small_cohorts(store.series(run_id), get(run_id).config,
                                          min_devices)
            if format == "json":
                return json.dumps({"run_id": run_id, "series": rows}).encode()
            buf = io.StringIO()
            cols = [c for c in _FLAT if any(c in r for r in rows)] or ["day"]
            w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
            return buf.getvalue().encode()

        body = cache.get_or_make(("series", format, run_id, day), make)
        return Response(body, media_type="application/json" if format == "json" else "text/csv")

    @app.get("/runs/{run_id}/plot.png", response_class=Response,
             responses={200: {"content": {"image/png": {}}}})
    def plot(run_id: str) -> Response:
        day = last_day(run_id)
        if day is None:
            raise HTTPException(404, "no completed day yet")
        png = cache.get_or_make(("plot", run_id, day),
                                lambda: render_plot(store.series(run_id), title=f"run {run_id}"))
        return Response(png, media_type="image/png")

    @app.get("/runs/{run_id}/calibration")
    def calibration(run_id: str) -> dict[str, Any]:
        get(run_id)
        result = store.calibration(run_id)
        if result is None:
            raise HTTPException(404, "no calibration for this run")
        return result

    @app.get("/bundle", response_class=Response,
             responses={200: {"content": {"application/octet-stream": {}}}})
    def bundle() -> Response:
        latest = store.latest_bundle()
        if latest is None:
            raise HTTPException(404, "no model bundle published yet")
        version, blob = latest
        return Response(blob, media_type="application/octet-stream",
                        headers={"X-Model-Version": version})

    @app.get("/exposure")
    def exposure(run_id: str | None = None) -> Response:
        last = store.last_round(run_id)
        if last is None:
            if run_id is not None:
                get(run_id)
            raise HTTPException(404, "no exposure published yet")
        rid, day = last

        def make() -> bytes:
            rows = store.series(rid)
            return json.dumps({"run_id": rid, "day": day,
                               "prevalence": rows[-1].get("exposure", {})}).encode()

        return Response(cache.get_or_make(("exposure", rid, day), make),
                        media_type="application/json")

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    app.state.run_threads = threads
    return app


_WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
# GET routes whose 200 response is a function of the database alone (and of the path and
# query): the read cache may replay them while the database is unchanged. Not /metrics.
_CACHEABLE = frozenset({"/health", "/runs", "/runs/{run_id}", "/runs/{run_id}/series",
                        "/runs/{run_id}/plot.png", "/runs/{run_id}/calibration", "/bundle",
                        "/exposure"})


class _StoreVersion:
    """A number that changes whenever anything is committed to the database, by any
    connection of any process: ``PRAGMA data_version`` on a private, never-writing
    connection (busy timeout 0: it never waits for a lock). ``None`` when unknown (an
    in-memory database, an error): then nothing is cached or replayed. Used from the event
    loop only; one call costs ~2 µs (it reads the WAL index in shared memory)."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._con: sqlite3.Connection | None = None
        self._opened = 0  # a reopened connection starts its own count: keep versions apart
        self._disabled = path in ("", ":memory:") or path.startswith("file::memory:")

    def __call__(self) -> tuple[int, int] | None:
        if self._disabled:
            return None
        try:
            if self._con is None:
                self._con = sqlite3.connect(self._path, timeout=0, isolation_level=None,
                                            check_same_thread=False)
                self._opened += 1
            return self._opened, self._con.execute("PRAGMA data_version").fetchone()[0]
        except sqlite3.Error:
            if self._con is not None:
                self._con.close()
                self._con = None
            return None


class _ReadCacheMiddleware:
    """Pure ASGI: replays a cached successful GET response (status, headers, body bytes)
    while the database version is the one it was built under, from the event loop, with no
    routing, validation, serialization or threadpool hop. A miss runs the app as before and
    keeps a 200 response of a route in ``paths`` under the version read *before* the app ran
    (a commit during the request makes the next request miss). Bounded: ``max_entries``
    responses, ``max_bytes`` in all, none above ``max_entry_bytes``."""

    def __init__(self, app, version: Callable[[], Any], paths: frozenset[str],
                 max_entries: int = 256, max_bytes: int = 32 << 20,
                 max_entry_bytes: int = 4 << 20) -> None:
        self.app, self.version, self.paths = app, version, paths
        self.max_entries, self.max_bytes, self.max_entry = max_entries, max_bytes, max_entry_bytes
        self._entries: OrderedDict[tuple[str, bytes], tuple[Any, dict, bytes]] = OrderedDict()
        self._bytes = 0
        self._of: Any = None  # the version the entries belong to

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] != "GET":
            await self.app(scope, receive, send)
            return
        version = self.version()
        if version is None:
            await self.app(scope, receive, send)
            return
        if version != self._of:
            self._entries.clear()
            self._bytes = 0
            self._of = version
        key = (scope["path"], scope.get("query_string", b""))
        hit = self._entries.get(key)
        if hit is not None:
            self._entries.move_to_end(key)
            route, head, body = hit
            scope["route"] = route  # for the metrics middleware
            await send(head)
            await send({"type": "http.response.body", "body": body})
            return
        start: dict | None = None
        chunks: list[bytes] = []
        keep = True

        async def capture(message) -> None:
            nonlocal start, keep
            if message["type"] == "http.response.start":
                start = message
                keep = message["status"] == 200
            elif message["type"] == "http.response.body" and keep:
                chunks.append(message.get("body", b""))
                keep = sum(map(len, chunks)) <= self.max_entry
            await send(message)

        await self.app(scope, receive, capture)
        route = scope.get("route")
        if (keep and start is not None and getattr(route, "path", None) in self.paths
                and version == self._of):
            self._put(key, (route, start, b"".join(chunks)))

    def _put(self, key: tuple[str, bytes], entry: tuple[Any, dict, bytes]) -> None:
        old = self._entries.pop(key, None)
        if old is not None:
            self._bytes -= len(old[2])
        self._entries[key] = entry
        self._bytes += len(entry[2])
        while self._entries and (len(self._entries) > self.max_entries
                                 or self._bytes > self.max_bytes):
            _, dropped = self._entries.popitem(last=False)
            self._bytes -= len(dropped[2])


class _GuardMiddleware:
    """Pure ASGI guard in front of everything: a write without the bearer token is refused
    (401) before its body is read; a body longer than ``max_body_bytes`` is refused (413) from
    its ``Content-Length`` or, when streamed, as soon as the bytes received pass the limit.
    Memory an unauthenticated client can make the server hold is bounded by the limit."""

    def __init__(self, app, token: WriteToken, max_body_bytes: int) -> None:
        self.app, self.token, self.limit = app, token, max_body_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or ())
        if (scope["method"] not in _WRITE_METHODS and b"content-length" not in headers
                and b"transfer-encoding" not in headers):
            await self.app(scope, receive, send)  # a read without a body: nothing to guard
            return
        if scope["method"] in _WRITE_METHODS:
            auth = headers.get(b"authorization", b"")
            scheme, _, cred = auth.partition(b" ")
            if scheme.lower() != b"bearer" or not self.token.matches(cred.strip()):
                await _plain(send, 401, b'{"detail":"a valid bearer token is required"}',
                             [(b"www-authenticate", b"Bearer")])
                return
        length = headers.get(b"content-length")
        if length is not None:
            try:
                too_long = int(length) > self.limit
            except ValueError:
                await _plain(send, 400, b'{"detail":"invalid Content-Length"}')
                return
            if too_long:
                await _plain(send, 413, b'{"detail":"request body too large"}')
                return
        seen = 0
        started = False

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _BodyTooLarge(413, "request body too large")
            return message

        async def tracking_send(message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _BodyTooLarge:
            if not started:
                await _plain(send, 413, b'{"detail":"request body too large"}')


class _BodyTooLarge(StarletteHTTPException):
    """A streamed request body passed the limit (FastAPI re-raises it from body parsing)."""


async def _plain(send, status: int, body: bytes,
                 extra: list[tuple[bytes, bytes]] | None = None) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close"), *(extra or [])]})
    await send({"type": "http.response.body", "body": body})


class _MetricsMiddleware:
    """Pure ASGI middleware: request count and latency per route (cheaper than
    BaseHTTPMiddleware, which runs every request through an extra task)."""

    def __init__(self, app, latency: Histogram, requests: Counter) -> None:
        self.app, self.latency, self.requests = app, latency, requests
        self._latency: dict[str, Any] = {}  # labelled children, looked up once per label set
        self._requests: dict[tuple[str, int], Any] = {}

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
            hist = self._latency.get(path)
            if hist is None:
                hist = self._latency[path] = self.latency.labels(path)
            hist.observe(time.perf_counter() - t0)
            key = (path, status["code"])
            count = self._requests.get(key)
            if count is None:
                count = self._requests[key] = self.requests.labels(path, str(key[1]))
            count.inc()


def withhold_small_cohorts(rows: list[dict[str, Any]], config: dict[str, Any],
                           min_devices: int) -> list[dict[str, Any]]:
    """Drop the device aggregates (``physical_*``, ``grad_devices``) of rows computed over
    fewer than ``min_devices`` devices (issue 12: the API never publishes a small cohort's
    sums; a run with few devices would reveal individual statuses)."""
    out = []
    for r in rows:
        cohort = int(r.get("survivors", config.get("devices", 0)))
        if cohort < min_devices:
            r = {k: v for k, v in r.items()
                 if not (k.startswith("physical_") or k == "grad_devices")}
            r["device_aggregates_withheld"] = True
        out.append(r)
    return out


def _run_quietly(store: CoordinatorStore, run_id: str) -> None:
    try:
        execute_run(store, run_id)
    except Exception:  # noqa: BLE001 - thread boundary: logged, and stored as the run's status
        _log.exception("run %s failed", run_id)


def render_plot(rows: list[dict[str, Any]], title: str = "") -> bytes:
    """PNG of the daily S/I/R series (object-oriented matplotlib: no pyplot global state, so
    it is safe from the threadpool)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=90)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    days = [r["day"] for r in rows]
    for c in ("S", "I", "R"):
        ax.plot(days, [r[c] for r in rows], label=c)
    ax.set_xlabel("day")
    ax.set_ylabel("agents")
    ax.set_title(title)
    ax.legend()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def freeze_startup_heap() -> None:
    """Move everything alive now (FastAPI, pydantic, numpy, matplotlib: ~240k objects) out of
    the cyclic garbage collector's reach (``gc.freeze``), so a full collection scans only what
    requests allocate. Measured before: full collections of ~100–180 ms, twice a second at 100
    clients, were the p99 tail. matplotlib is imported first so that the first /plot.png does
    not bring its module objects into the collected heap."""
    import matplotlib.backends.backend_agg  # noqa: F401
    import matplotlib.figure  # noqa: F401

    gc.collect()
    gc.freeze()


class _CoalescingTransport:
    """A transport whose writes of one event-loop turn leave in one ``send``: uvicorn writes
    a response's status line + headers and its body separately (two syscalls and two TCP
    segments per small response: ~45% of the server's time on a replayed read). Order is
    kept; ``close`` sends what is pending first; everything else is the real transport's."""

    __slots__ = ("_transport", "_loop", "_pending", "_due")

    def __init__(self, transport, loop) -> None:
        self._transport, self._loop = transport, loop
        self._pending: list[bytes] = []
        self._due = False

    def write(self, data: bytes) -> None:
        self._pending.append(data)
        if not self._due:
            self._due = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._due = False
        if not self._pending:
            return
        data = self._pending[0] if len(self._pending) == 1 else b"".join(self._pending)
        self._pending.clear()
        if not self._transport.is_closing():
            self._transport.write(data)

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def _http_protocol() -> Any:
    """uvicorn's httptools protocol with coalesced writes (h11's, unchanged, without it)."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:
        return "auto"

    class CoalescingHttpToolsProtocol(HttpToolsProtocol):
        def connection_made(self, transport) -> None:  # type: ignore[override]
            # duck-typed: forwards every other Transport method to ``transport``
            super().connection_made(cast(asyncio.Transport,
                                         _CoalescingTransport(transport, self.loop)))

    return CoalescingHttpToolsProtocol


def serve(store: CoordinatorStore, token: "str | WriteToken", *, host: str = "127.0.0.1",
          port: int = 8080, log_level: str = "info", access_log: bool = True,
          execute: bool = True) -> None:
    """Run the service with uvicorn in this process (``lpm coordinator``): uvloop when
    installed, httptools with coalesced writes, the startup heap frozen out of the garbage
    collector."""
    import uvicorn

    app = create_app(store, token, execute=execute)
    del token
    freeze_startup_heap()
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=access_log,
                loop="auto", http=_http_protocol())

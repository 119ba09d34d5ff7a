"""Coordinator persistence: runs, completed rounds (one row per day) and signed bundles in
SQLite (WAL).

A round row and the run's resume checkpoint are written in one transaction, so a coordinator
killed at any moment restarts from the last completed day with nothing lost or doubled.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["CoordinatorStore", "StoreError", "RunNotFoundError", "RoundOrderError", "RunRecord",
           "ResumePoint", "Lease", "LeaseHeldError"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,
    created REAL NOT NULL,
    status TEXT NOT NULL,
    config TEXT NOT NULL,
    days INTEGER NOT NULL,
    error TEXT
);
CREATE TABLE IF NOT EXISTS rounds (
    run_id TEXT NOT NULL REFERENCES runs(id),
    day INTEGER NOT NULL,
    completed REAL NOT NULL,
    aggregates TEXT NOT NULL,
    PRIMARY KEY (run_id, day)
);
CREATE TABLE IF NOT EXISTS checkpoints (
    run_id TEXT PRIMARY KEY REFERENCES runs(id),
    day INTEGER NOT NULL,
    state BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS calibration (
    run_id TEXT PRIMARY KEY REFERENCES runs(id),
    result TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS leases (
    run_id TEXT PRIMARY KEY REFERENCES runs(id),
    owner TEXT NOT NULL,
    kind TEXT NOT NULL,
    expires REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS bundles (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created REAL NOT NULL,
    model_version TEXT NOT NULL,
    blob BLOB NOT NULL
);
"""

RUN_STATUSES = ("pending", "running", "completed", "failed")


class StoreError(RuntimeError):
    """Invalid store operation."""


class RunNotFoundError(StoreError, KeyError):
    """No run with that id."""


class RoundOrderError(StoreError):
    """A round was committed out of order (not the day after the last completed one)."""


@dataclass(frozen=True)
class RunRecord:
    """A run's row plus its progress (completed days out of ``days``)."""

    id: str
    created: float
    status: str
    config: dict[str, Any]
    days: int
    completed_days: int
    error: str | None

    @property
    def progress(self) -> float:
        return self.completed_days / self.days if self.days else 1.0


class LeaseHeldError(StoreError):
    """Another runner owns the run (its lease has not expired)."""


@dataclass(frozen=True)
class Lease:
    """Who runs a run: ``owner`` (unique per process), ``kind`` (serverapp, coordinator)."""

    run_id: str
    owner: str
    kind: str
    expires: float


@dataclass(frozen=True)
class ResumePoint:
    """The last completed day of a run and the simulation state saved with it."""

    day: int
    state: bytes


class CoordinatorStore:
    """SQLite store; one connection per thread, WAL journal, safe across processes."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self._local = threading.local()
        try:
            self._con().executescript(_SCHEMA)
            self._con().execute("SELECT COUNT(*) FROM runs").fetchone()
        except sqlite3.Error as exc:
            self.close()
            raise StoreError(f"cannot open coordinator store {self.path}: {exc}") from None

    def check(self) -> None:
        """Full integrity check (``PRAGMA quick_check``, reads every page): raises
        :class:`StoreError` naming the file if it is corrupt or truncated."""
        try:
            rows = self._con().execute("PRAGMA quick_check").fetchall()
        except sqlite3.Error as exc:
            raise StoreError(f"coordinator store {self.path} is unreadable: {exc}") from None
        if rows != [("ok",)]:
            raise StoreError(f"coordinator store {self.path} is corrupt: {rows[0][0]}")

    # ------------------------------------------------------------------ plumbing
    def _con(self) -> sqlite3.Connection:
        con = getattr(self._local, "con", None)
        if con is None:
            con = sqlite3.connect(self.path, timeout=30.0, isolation_level=None,
                                  check_same_thread=False)
            con.execute("PRAGMA journal_mode=WAL")
            con.execute("PRAGMA synchronous=FULL")
            con.execute("PRAGMA foreign_keys=ON")
            self._local.con = con
        return con

    class _Tx:
        def __init__(self, con: sqlite3.Connection) -> None:
            self.con = con

        def __enter__(self) -> sqlite3.Connection:
            self.con.execute("BEGIN IMMEDIATE")
            return self.con

        def __exit__(self, exc_type, exc, tb) -> None:
            self.con.execute("COMMIT" if exc_type is None else "ROLLBACK")

    def _tx(self) -> CoordinatorStore._Tx:
        return CoordinatorStore._Tx(self._con())

    def close(self) -> None:
        con = getattr(self._local, "con", None)
        if con is not None:
            con.close()
            self._local.con = None

    # ------------------------------------------------------------------ runs
    def create_run(self, config: dict[str, Any], days: int, run_id: str | None = None) -> str:
        """Insert a pending run; returns its id."""
        if days < 1:
            raise StoreError("days must be >= 1")
        rid = run_id or uuid.uuid4().hex[:12]
        with self._tx() as con:
            con.execute("INSERT INTO runs VALUES (?, ?, 'pending', ?, ?, NULL)",
                        (rid, time.time(), json.dumps(config, sort_keys=True), int(days)))
        return rid

    def set_status(self, run_id: str, status: str, error: str | None = None) -> None:
        if status not in RUN_STATUSES:
            raise StoreError(f"unknown status {status!r}")
        with self._tx() as con:
            cur = con.execute("UPDATE runs SET status = ?, error = ? WHERE id = ?",
                              (status, error, run_id))
            if cur.rowcount != 1:
                raise RunNotFoundError(run_id)

    @contextmanager
    def running(self, run_id: str, owner: str | None = None) -> Iterator[None]:
        """Mark ``run_id`` running for the block; then completed, or failed with the
        exception's type and message (re-raised). ``owner``'s lease is released either way,
        except on :class:`LeaseHeldError`: another runner owns the run now, so its status and
        lease are left alone."""
        self.set_status(run_id, "running")
        try:
            yield
        except LeaseHeldError:
            raise
        except Exception as exc:  # (an interrupt leaves it running: resumable)
            self.set_status(run_id, "failed", f"{type(exc).__name__}: {exc}")
            if owner is not None:
                self.release_lease(run_id, owner)
            raise
        self.set_status(run_id, "completed")
        if owner is not None:
            self.release_lease(run_id, owner)

    def get_run(self, run_id: str) -> RunRecord:
        row = self._con().execute(
            "SELECT r.id, r.created, r.status, r.config, r.days, r.error, "
            "(SELECT COUNT(*) FROM rounds WHERE run_id = r.id) FROM runs r WHERE r.id = ?",
            (run_id,)).fetchone()
        if row is None:
            raise RunNotFoundError(run_id)
        return RunRecord(row[0], row[1], row[2], json.loads(row[3]), row[4], row[6], row[5])

    def list_runs(self) -> list[RunRecord]:
        ids = [r[0] for r in self._con().execute("SELECT id FROM runs ORDER BY created")]
        return [self.get_run(i) for i in ids]

    # ------------------------------------------------------------------ rounds
    def commit_round(self, run_id: str, day: int, aggregates: dict[str, Any],
                     state: bytes | None = None) -> None:
        """Record completed ``day`` (must follow the last one) and its checkpoint atomically."""
        with self._tx() as con:
            if con.execute("SELECT 1 FROM runs WHERE id = ?", (run_id,)).fetchone() is None:
                raise RunNotFoundError(run_id)
            last = con.execute("SELECT MAX(day) FROM rounds WHERE run_id = ?",
                               (run_id,)).fetchone()[0]
            expected = 1 if last is None else last + 1
            if day != expected:
                raise RoundOrderError(f"run {run_id}: day {day} committed, expected {expected}")
            con.execute("INSERT INTO rounds VALUES (?, ?, ?, ?)",
                        (run_id, day, time.time(), json.dumps(aggregates, sort_keys=True)))
            if state is not None:
                con.execute("INSERT OR REPLACE INTO checkpoints VALUES (?, ?, ?)",
                            (run_id, day, sqlite3.Binary(state)))

    def series(self, run_id: str) -> list[dict[str, Any]]:
        """Completed rounds in day order: ``{"day": d, **aggregates}``."""
        self.get_run(run_id)
        rows = self._con().execute(
            "SELECT day, aggregates FROM rounds WHERE run_id = ? ORDER BY day", (run_id,))
        return [{"day": d, **json.loads(a)} for d, a in rows]

    def last_day(self, run_id: str) -> int | None:
        """Last completed day (``None`` if none); a cheap change marker for caches."""
        row = self._con().execute("SELECT MAX(day) FROM rounds WHERE run_id = ?",
                                  (run_id,)).fetchone()
        return None if row is None else row[0]

    def last_round(self, run_id: str | None = None) -> tuple[str, int] | None:
        """``(run_id, day)`` of the last committed round of ``run_id`` (default: of the newest
        run that has one), ``None`` if there is none; one indexed lookup, for read caches."""
        if run_id is not None:
            day = self.last_day(run_id)
            return None if day is None else (run_id, day)
        row = self._con().execute(
            "SELECT r.run_id, MAX(r.day) FROM rounds r WHERE r.run_id = ("
            " SELECT u.id FROM runs u WHERE EXISTS (SELECT 1 FROM rounds x WHERE x.run_id = u.id)"
            " ORDER BY u.created DESC, u.rowid DESC LIMIT 1)").fetchone()
        return None if row is None or row[0] is None else (row[0], int(row[1]))

    def resume(self, run_id: str) -> ResumePoint | None:
        """Last completed round and its state, or ``None`` if no day completed yet."""
        self.get_run(run_id)
        row = self._con().execute("SELECT day, state FROM checkpoints WHERE run_id = ?",
                                  (run_id,)).fetchone()
        return None if row is None else ResumePoint(int(row[0]), bytes(row[1]))

    # ------------------------------------------------------------------ leases (issue 12)
    def acquire_lease(self, run_id: str, owner: str, kind: str, ttl: float) -> Lease:
        """Own ``run_id`` for ``ttl`` seconds (renewable); raises :class:`LeaseHeldError` if
        another owner holds an unexpired lease. Re-acquiring one's own lease renews it."""
        self.get_run(run_id)
        now = time.time()
        with self._tx() as con:
            row = con.execute("SELECT owner, kind, expires FROM leases WHERE run_id = ?",
                              (run_id,)).fetchone()
            if row is not None and row[0] != owner and float(row[2]) > now:
                raise LeaseHeldError(f"run {run_id} is owned by {row[1]} {row[0]} for another "
                                     f"{float(row[2]) - now:.0f} s")
            con.execute("INSERT OR REPLACE INTO leases VALUES (?, ?, ?, ?)",
                        (run_id, owner, kind, now + ttl))
        return Lease(run_id, owner, kind, now + ttl)

    def release_lease(self, run_id: str, owner: str) -> None:
        """Give up ``owner``'s lease on ``run_id`` (no-op if someone else holds it)."""
        with self._tx() as con:
            con.execute("DELETE FROM leases WHERE run_id = ? AND owner = ?", (run_id, owner))

    def lease(self, run_id: str) -> Lease | None:
        """The current lease of ``run_id`` (expired or not), if any."""
        row = self._con().execute("SELECT owner, kind, expires FROM leases WHERE run_id = ?",
                                  (run_id,)).fetchone()
        return None if row is None else Lease(run_id, row[0], row[1], float(row[2]))

    # ------------------------------------------------------------------ calibration
    def set_calibration(self, run_id: str, result: dict[str, Any]) -> None:
        self.get_run(run_id)
        with self._tx() as con:
            con.execute("INSERT OR REPLACE INTO calibration VALUES (?, ?)",
                        (run_id, json.dumps(result, sort_keys=True)))

    def calibration(self, run_id: str) -> dict[str, Any] | None:
        self.get_run(run_id)
        row = self._con().execute("SELECT result FROM calibration WHERE run_id = ?",
                                  (run_id,)).fetchone()
        return None if row is None else json.loads(row[0])

    # ------------------------------------------------------------------ bundles
    def put_bundle(self, blob: bytes, model_version: str) -> int:
        if not blob:
            raise StoreError("empty bundle")
        with self._tx() as con:
            cur = con.execute("INSERT INTO bundles (created, model_version, blob) VALUES (?, ?, ?)",
                              (time.time(), model_version, sqlite3.Binary(blob)))
            if cur.lastrowid is None:  # pragma: no cover - sqlite sets it after an INSERT
                raise StoreError("bundle insert returned no row id")
            return cur.lastrowid

    def latest_bundle(self) -> tuple[str, bytes] | None:
        row = self._con().execute(
            "SELECT model_version, blob FROM bundles ORDER BY id DESC LIMIT 1").fetchone()
        return None if row is None else (row[0], bytes(row[1]))

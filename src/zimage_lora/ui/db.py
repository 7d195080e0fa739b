"""The UI's own records in ``DATA/ui.db`` (SQLite, WAL): jobs, playground generations, comparisons, captioning runs,
settings.

The run folders stay the truth about training (steps, files, run.json, compare.json); the database holds what only
the UI knows: each job's config as the form shows it, each comparison's setting and values, each captioning run's
options, their queue state
(``device``: the devices it holds, comma-joined), and the process's pid and /proc start time so that a restarted UI
finds its processes again. One connection serves every thread, behind a lock. The schema grows by appending to
``MIGRATIONS``; ``schema_version`` records how many have run.

``Store`` also holds ``DATA/ui.lock`` (an flock) while open: two UIs driving one data folder would start every
queued job twice.
"""

from __future__ import annotations

import fcntl
import json
import sqlite3
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from zimage_lora.errors import UserError

MIGRATIONS = [
    """
    CREATE TABLE jobs (
        name TEXT PRIMARY KEY, config TEXT NOT NULL, status TEXT NOT NULL, prev_status TEXT, device TEXT,
        mode TEXT, pid INTEGER, pid_start INTEGER, exit_code INTEGER, created TEXT NOT NULL, queued REAL,
        started TEXT, finished TEXT, error TEXT);
    CREATE TABLE generations (
        id TEXT PRIMARY KEY, request TEXT NOT NULL, status TEXT NOT NULL, device TEXT, pid INTEGER,
        pid_start INTEGER, exit_code INTEGER, created TEXT NOT NULL, queued REAL, started TEXT, finished TEXT,
        error TEXT);
    CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    """,
    # comparisons (issue 18): one job trained once per value of one setting; ``vals`` are the values as the UI
    # shows them, ``varies`` the ``--vary`` strings the process gets (paths made absolute)
    """
    CREATE TABLE comparisons (
        id TEXT PRIMARY KEY, job TEXT NOT NULL, setting TEXT NOT NULL, vals TEXT NOT NULL, varies TEXT NOT NULL,
        status TEXT NOT NULL, prev_status TEXT, device TEXT, mode TEXT, pid INTEGER, pid_start INTEGER,
        exit_code INTEGER, created TEXT NOT NULL, queued REAL, started TEXT, finished TEXT, error TEXT);
    """,
    # captioning runs (issue 20): ``zimage-lora caption --dry-run`` over a dataset; ``options`` are the request as the
    # UI took it (model, mode, trigger, trigger_style, overwrite, device)
    """
    CREATE TABLE captions (
        id TEXT PRIMARY KEY, dataset TEXT NOT NULL, options TEXT NOT NULL, status TEXT NOT NULL, prev_status TEXT,
        device TEXT, mode TEXT, pid INTEGER, pid_start INTEGER, exit_code INTEGER, created TEXT NOT NULL,
        queued REAL, started TEXT, finished TEXT, error TEXT);
    """,
]
JSON_COLUMNS = {"config", "request", "vals", "varies", "options"}
KEYS = {"jobs": "name", "generations": "id", "comparisons": "id", "captions": "id"}


def now() -> str:
    """Timestamps in the API: ISO 8601, UTC."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class Store:
    def __init__(self, data: Path):
        try:
            data.mkdir(parents=True, exist_ok=True)
            self._lock_file = open(data / "ui.lock", "w")  # noqa: SIM115 - held for the life of the store
        except OSError as e:
            raise UserError(f"--data {data}: cannot write there ({e.strerror}); choose a writable folder") from None
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            raise UserError(
                f"--data {data}: another zimage-lora ui is serving this folder; stop it or choose another folder"
            ) from None
        self.lock = threading.Lock()
        self.conn = sqlite3.connect(data / "ui.db", check_same_thread=False, isolation_level=None)
        self.conn.row_factory = sqlite3.Row
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA busy_timeout=5000")
        self._migrate()

    def _migrate(self) -> None:
        with self.lock:
            self.conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            done = self.conn.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version").fetchone()[0]
            for version, script in enumerate(MIGRATIONS[done:], start=done + 1):
                self.conn.executescript(f"BEGIN; {script}; INSERT INTO schema_version VALUES ({version}); COMMIT;")

    def close(self) -> None:
        with self.lock:
            self.conn.close()
        self._lock_file.close()  # releases the flock

    # --- rows ---------------------------------------------------------------------------------------------------
    def get(self, table: str, key: str) -> dict[str, Any] | None:
        rows = self.select(table, f"{KEYS[table]} = ?", key)
        return rows[0] if rows else None

    def select(self, table: str, where: str = "1", *args: Any, order: str = "created") -> list[dict[str, Any]]:
        with self.lock:
            rows = self.conn.execute(f"SELECT * FROM {table} WHERE {where} ORDER BY {order}", args).fetchall()
        return [_decode(row) for row in rows]

    def insert(self, table: str, **fields: Any) -> None:
        fields = _encode(fields)
        names = ", ".join(fields)
        marks = ", ".join("?" for _ in fields)
        with self.lock:
            self.conn.execute(f"INSERT INTO {table} ({names}) VALUES ({marks})", list(fields.values()))

    def update(self, table: str, key: str, **fields: Any) -> None:
        fields = _encode(fields)
        assignments = ", ".join(f"{name} = ?" for name in fields)
        with self.lock:
            self.conn.execute(f"UPDATE {table} SET {assignments} WHERE {KEYS[table]} = ?", [*fields.values(), key])

    def delete(self, table: str, key: str) -> None:
        with self.lock:
            self.conn.execute(f"DELETE FROM {table} WHERE {KEYS[table]} = ?", (key,))


def _encode(fields: dict[str, Any]) -> dict[str, Any]:
    return {k: json.dumps(v) if k in JSON_COLUMNS else v for k, v in fields.items()}


def _decode(row: sqlite3.Row) -> dict[str, Any]:
    return {k: json.loads(row[k]) if k in JSON_COLUMNS else row[k] for k in row.keys()}  # noqa: SIM118

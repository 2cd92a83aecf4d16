"""The last verdicts, votes and overrides on disk, so a restart serves what was served before.

One SQLite file (`healthplane.db`) in `controlplane.data_dir`, in WAL mode. Every verdict
batch is one transaction: after a crash the file holds the state before or after a batch,
never half of one. Plain synchronous code; the control plane calls it on its own thread.

Tables: `verdict` (the applied verdict per endpoint, what EDS served), `vote` (the latest
verdict per endpoint and prober, for the quorum), `override` (operator pins), `meta` (the last
version epoch, so versions stay monotonic even if the wall clock steps back).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from controlplane.errors import ConfigError
from controlplane.health.store import HealthStatus, Verdict

DB_NAME = "healthplane.db"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS verdict (
    cluster TEXT NOT NULL, endpoint TEXT NOT NULL,
    status INTEGER NOT NULL, reason TEXT NOT NULL, time REAL NOT NULL, source TEXT NOT NULL,
    PRIMARY KEY (cluster, endpoint)
);
CREATE TABLE IF NOT EXISTS vote (
    cluster TEXT NOT NULL, endpoint TEXT NOT NULL, source TEXT NOT NULL,
    status INTEGER NOT NULL, reason TEXT NOT NULL, time REAL NOT NULL,
    PRIMARY KEY (cluster, endpoint, source)
);
CREATE TABLE IF NOT EXISTS override (
    cluster TEXT NOT NULL, endpoint TEXT NOT NULL,
    status INTEGER NOT NULL, reason TEXT NOT NULL, time REAL NOT NULL, source TEXT NOT NULL,
    PRIMARY KEY (cluster, endpoint)
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


@dataclass(frozen=True, slots=True)
class SavedState:
    """What a previous run left: applied verdicts, per-prober votes, overrides, last epoch."""

    verdicts: list[Verdict]
    votes: list[Verdict]
    overrides: list[Verdict]
    epoch: int | None


def _row(v: Verdict) -> tuple[str, str, int, str, float, str]:
    return (v.cluster, v.endpoint, v.status.value, v.reason, v.time, v.source)


def _verdict(row: tuple[str, str, int, str, float, str]) -> Verdict | None:
    try:
        status = HealthStatus(row[2])
    except ValueError:
        return None  # written by a newer version with more statuses: not ours to guess
    return Verdict(row[0], row[1], status, row[3], row[4], row[5])


class VerdictStore:
    """The SQLite file; `ConfigError` (path `controlplane.data_dir`) when it cannot be opened."""

    def __init__(self, data_dir: str | Path) -> None:
        self.path = Path(data_dir) / DB_NAME
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # isolation_level=None: transactions are explicit (BEGIN ... COMMIT per batch).
            self._db = sqlite3.connect(self.path, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            # NORMAL under WAL: a commit survives a process crash; only a power loss may lose the
            # last batches, and the file stays consistent either way.
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise ConfigError(f"cannot use {self.path}: {exc}", path="controlplane.data_dir") from exc
        self.writes = 0

    def load(self) -> SavedState:
        db = self._db
        verdicts = [v for r in db.execute("SELECT * FROM verdict") if (v := _verdict(r)) is not None]
        votes = [
            v
            for r in db.execute("SELECT cluster, endpoint, status, reason, time, source FROM vote")
            if (v := _verdict(r)) is not None
        ]
        overrides = [v for r in db.execute("SELECT * FROM override") if (v := _verdict(r)) is not None]
        row = db.execute("SELECT value FROM meta WHERE key = 'epoch'").fetchone()
        return SavedState(verdicts, votes, overrides, int(row[0]) if row else None)

    def save_batch(self, *, verdicts: Iterable[Verdict] = (), votes: Iterable[Verdict] = ()) -> None:
        """Applied verdicts and received votes of one batch, in one transaction."""
        with self._transaction():
            self._db.executemany("INSERT OR REPLACE INTO verdict VALUES (?, ?, ?, ?, ?, ?)", map(_row, verdicts))
            self._db.executemany(
                "INSERT OR REPLACE INTO vote (cluster, endpoint, status, reason, time, source)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                map(_row, votes),
            )
        self.writes += 1

    def save_override(self, cluster: str, endpoint: str, override: Verdict | None) -> None:
        with self._transaction():
            if override is None:
                self._db.execute("DELETE FROM override WHERE cluster = ? AND endpoint = ?", (cluster, endpoint))
            else:
                self._db.execute("INSERT OR REPLACE INTO override VALUES (?, ?, ?, ?, ?, ?)", _row(override))

    def save_epoch(self, epoch: int) -> None:
        with self._transaction():
            self._db.execute("INSERT OR REPLACE INTO meta VALUES ('epoch', ?)", (str(epoch),))

    def forget_source(self, source: str) -> None:
        """Delete the votes of one prober (`prober:ID`), forgotten by an operator."""
        with self._transaction():
            self._db.execute("DELETE FROM vote WHERE source = ?", (source,))

    def forget(self, keep: set[tuple[str, str]]) -> int:
        """Delete rows of endpoints not in `keep` (gone from the topology); how many endpoints."""
        gone = {
            (c, e)
            for table in ("verdict", "vote", "override")
            for c, e in self._db.execute(f"SELECT cluster, endpoint FROM {table}")
            if (c, e) not in keep
        }
        if gone:
            with self._transaction():
                for table in ("verdict", "vote", "override"):
                    self._db.executemany(f"DELETE FROM {table} WHERE cluster = ? AND endpoint = ?", gone)
        return len(gone)

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)

    def close(self) -> None:
        self._db.close()


class _Transaction:
    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN")

    def __exit__(self, exc_type: object, *_: object) -> None:
        self._db.execute("ROLLBACK" if exc_type is not None else "COMMIT")

"""The last verdicts, votes and overrides on disk, so a restart serves what was served before.

One SQLite file (`healthplane.db`) in `controlplane.data_dir`, in WAL mode. Every verdict
batch is one transaction: after a crash the file holds the state before or after a batch,
never half of one.

`VerdictStore` is plain synchronous code. `BackgroundStore` is what the control plane uses: it
takes changes (verdicts, votes, overrides, forgotten probers, the epoch) without ever failing,
coalesces them by key into `PendingWrites`, and writes them on a thread of its own, one
transaction at a time, so a slow disk or another process holding the lock never holds the event
loop. A write that fails (disk full, locked, read-only) keeps its rows pending under anything
newer, is reported (`on_failure`: an alarm, a metric, `/readyz` degraded) and retried until it
succeeds (`on_recovery`). What was accepted is applied and served either way: the file catches up.

Tables: `verdict` (the applied verdict per endpoint, what EDS served), `vote` (the latest
verdict per endpoint and prober, for the quorum), `override` (operator pins), `held` (failures
the mass-failure guard holds, so a restart keeps the hold and its alarm), `meta` (the last
version epoch, so versions stay monotonic even if the wall clock steps back).
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from controlplane.errors import ConfigError
from controlplane.health.store import HealthStatus, Verdict

DB_NAME = "healthplane.db"
RETRY_SECONDS = 1.0  # a failed write is tried again this long after it failed

log = logging.getLogger("healthplane.persist")

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
CREATE TABLE IF NOT EXISTS held (
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
    held: list[Verdict] = field(default_factory=list)


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

    def __init__(self, data_dir: str | Path, *, busy_timeout: float = 5.0) -> None:
        self.path = Path(data_dir) / DB_NAME
        self._lock = threading.Lock()  # one connection, used by the writer thread and (at start) the caller
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # isolation_level=None: transactions are explicit (BEGIN ... COMMIT per batch).
            self._db = sqlite3.connect(self.path, isolation_level=None, timeout=busy_timeout, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            # NORMAL under WAL: a commit survives a process crash; only a power loss may lose the
            # last batches, and the file stays consistent either way.
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
            # A file with a valid header and broken pages opens fine and fails later, mid-read:
            # look at every page now, while a clear error can still stop the start.
            problems = [row[0] for row in self._db.execute("PRAGMA quick_check(5)")]
            if problems != ["ok"]:
                raise sqlite3.DatabaseError("; ".join(problems))
        except (OSError, sqlite3.Error) as exc:
            raise ConfigError(
                f"cannot use {self.path}: {exc} (a damaged file can be moved aside to start without saved state)",
                path="controlplane.data_dir",
            ) from exc
        self.writes = 0

    def load(self) -> SavedState:
        with self._lock:
            try:
                return self._load()
            except sqlite3.Error as exc:
                raise ConfigError(f"cannot read {self.path}: {exc}", path="controlplane.data_dir") from exc

    def _load(self) -> SavedState:
        db = self._db
        verdicts = [v for r in db.execute("SELECT * FROM verdict") if (v := _verdict(r)) is not None]
        votes = [
            v
            for r in db.execute("SELECT cluster, endpoint, status, reason, time, source FROM vote")
            if (v := _verdict(r)) is not None
        ]
        overrides = [v for r in db.execute("SELECT * FROM override") if (v := _verdict(r)) is not None]
        row = db.execute("SELECT value FROM meta WHERE key = 'epoch'").fetchone()
        held = [v for r in db.execute("SELECT * FROM held") if (v := _verdict(r)) is not None]
        return SavedState(verdicts, votes, overrides, int(row[0]) if row else None, held)

    def save_batch(self, *, verdicts: Iterable[Verdict] = (), votes: Iterable[Verdict] = ()) -> None:
        """Applied verdicts and received votes of one batch, in one transaction."""
        pending = PendingWrites()
        pending.add(verdicts=verdicts, votes=votes)
        self.write(pending)

    def write(self, pending: PendingWrites) -> None:
        """Everything pending, in one transaction: forgotten probers' votes first, then the rows."""
        with self._lock, self._transaction():
            db = self._db
            db.executemany("DELETE FROM vote WHERE source = ?", ((s,) for s in sorted(pending.forgotten)))
            verdicts = map(_row, pending.verdicts.values())
            db.executemany("INSERT OR REPLACE INTO verdict VALUES (?, ?, ?, ?, ?, ?)", verdicts)
            db.executemany(
                "INSERT OR REPLACE INTO vote (cluster, endpoint, status, reason, time, source)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                map(_row, pending.votes.values()),
            )
            for (cluster, endpoint), override in pending.overrides.items():
                if override is None:
                    db.execute("DELETE FROM override WHERE cluster = ? AND endpoint = ?", (cluster, endpoint))
                else:
                    db.execute("INSERT OR REPLACE INTO override VALUES (?, ?, ?, ?, ?, ?)", _row(override))
            for cluster, held in pending.held.items():
                db.execute("DELETE FROM held WHERE cluster = ?", (cluster,))
                db.executemany("INSERT INTO held VALUES (?, ?, ?, ?, ?, ?)", map(_row, held))
            if pending.epoch is not None:
                db.execute("INSERT OR REPLACE INTO meta VALUES ('epoch', ?)", (str(pending.epoch),))
        self.writes += 1

    def save_override(self, cluster: str, endpoint: str, override: Verdict | None) -> None:
        pending = PendingWrites()
        pending.overrides[(cluster, endpoint)] = override
        self.write(pending)

    def save_epoch(self, epoch: int) -> None:
        self.write(PendingWrites(epoch=epoch))

    def forget_source(self, source: str) -> None:
        """Delete the votes of one prober (`prober:ID`), forgotten by an operator."""
        pending = PendingWrites()
        pending.forget_source(source)
        self.write(pending)

    def forget(self, keep: set[tuple[str, str]]) -> int:
        """Delete rows of endpoints not in `keep` (gone from the topology); how many endpoints."""
        with self._lock:
            gone = {
                (c, e)
                for table in ("verdict", "vote", "override", "held")
                for c, e in self._db.execute(f"SELECT cluster, endpoint FROM {table}")
                if (c, e) not in keep
            }
            if gone:
                with self._transaction():
                    for table in ("verdict", "vote", "override", "held"):
                        self._db.executemany(f"DELETE FROM {table} WHERE cluster = ? AND endpoint = ?", gone)
        return len(gone)

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)

    def close(self) -> None:
        with self._lock:
            self._db.close()


class _Transaction:
    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN")

    def __exit__(self, exc_type: object, *_: object) -> None:
        self._db.execute("ROLLBACK" if exc_type is not None else "COMMIT")


@dataclass(slots=True)
class PendingWrites:
    """Rows not written yet, by key: a later change to the same row replaces an earlier one."""

    verdicts: dict[tuple[str, str], Verdict] = field(default_factory=dict)
    votes: dict[tuple[str, str, str], Verdict] = field(default_factory=dict)
    overrides: dict[tuple[str, str], Verdict | None] = field(default_factory=dict)  # None: delete
    forgotten: set[str] = field(default_factory=set)  # vote sources to delete (before the votes above)
    held: dict[str, list[Verdict]] = field(default_factory=dict)  # cluster -> all its held failures
    epoch: int | None = None

    def __len__(self) -> int:
        rows = len(self.verdicts) + len(self.votes) + len(self.overrides) + len(self.forgotten) + len(self.held)
        return rows + (self.epoch is not None)

    def add(self, *, verdicts: Iterable[Verdict] = (), votes: Iterable[Verdict] = ()) -> None:
        for v in verdicts:
            self.verdicts[v.id] = v
        for v in votes:
            self.votes[(v.cluster, v.endpoint, v.source)] = v

    def forget_source(self, source: str) -> None:
        self.votes = {k: v for k, v in self.votes.items() if k[2] != source}
        self.forgotten.add(source)

    def under(self, newer: PendingWrites) -> PendingWrites:
        """These (older, not written) changes with `newer` applied on top."""
        out = PendingWrites(
            verdicts={**self.verdicts, **newer.verdicts},
            votes={k: v for k, v in self.votes.items() if k[2] not in newer.forgotten},
            overrides={**self.overrides, **newer.overrides},
            forgotten=self.forgotten | newer.forgotten,
            held={**self.held, **newer.held},
            epoch=newer.epoch if newer.epoch is not None else self.epoch,
        )
        out.votes.update(newer.votes)
        return out


class BackgroundStore:
    """A `VerdictStore` written on its own thread; changes are taken without failing (see the module doc).

    Without a running event loop (start-up, plain scripts) a change is written before the call
    returns; with one, the call returns at once and the write happens on the writer thread.
    `load` and `close` first wait for what is pending.
    """

    def __init__(
        self,
        store: VerdictStore,
        *,
        on_failure: Callable[[str], None] = lambda _error: None,
        on_recovery: Callable[[], None] = lambda: None,
        retry: float = RETRY_SECONDS,
    ) -> None:
        self.store = store
        self.path = store.path
        self.on_failure = on_failure
        self.on_recovery = on_recovery
        self.retry = retry
        self.pending = PendingWrites()
        self.failures = 0  # failed write attempts, ever
        self.error: str | None = None  # the last failure while failing; None once caught up
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="healthplane-sqlite")
        self._inflight: tuple[Future[None], PendingWrites] | None = None
        self._retry_handle: asyncio.TimerHandle | None = None
        self._closed = False

    # ------------------------------------------------------------------ changes

    def save_batch(self, *, verdicts: Iterable[Verdict] = (), votes: Iterable[Verdict] = ()) -> None:
        self.pending.add(verdicts=verdicts, votes=votes)
        self._kick()

    def save_override(self, cluster: str, endpoint: str, override: Verdict | None) -> None:
        self.pending.overrides[(cluster, endpoint)] = override
        self._kick()

    def save_epoch(self, epoch: int) -> None:
        self.pending.epoch = epoch
        self._kick()

    def save_held(self, cluster: str, held: Iterable[Verdict]) -> None:
        """The failures the guard holds for `cluster`, all of them (none: the hold ended)."""
        self.pending.held[cluster] = list(held)
        self._kick()

    def forget_source(self, source: str) -> None:
        self.pending.forget_source(source)
        self._kick()

    def forget(self, keep: set[tuple[str, str]]) -> int:
        self.drain()
        return self.store.forget(keep)

    # ------------------------------------------------------------------ reads and the end

    def load(self) -> SavedState:
        self.drain()
        return self.store.load()

    @property
    def backlog(self) -> int:
        """Rows accepted and not written yet (pending and in flight)."""
        return len(self.pending) + (len(self._inflight[1]) if self._inflight is not None else 0)

    def drain(self) -> None:
        """Wait for the write in flight, then write what is pending, here; failures stay pending."""
        self._wait_inflight()
        if len(self.pending):
            batch, self.pending = self.pending, PendingWrites()
            self._finish(self._executor.submit(self.store.write, batch), batch)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._retry_handle is not None:
            self._retry_handle.cancel()
        self.drain()
        if len(self.pending):
            log.error("%d changes could not be written to %s: %s", len(self.pending), self.path, self.error)
        self._executor.shutdown(wait=True)
        self.store.close()

    # ------------------------------------------------------------------ the writer

    def _kick(self) -> None:
        if self._closed or self._inflight is not None or not len(self.pending):
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.drain()
            return
        if self._retry_handle is not None and self.error is not None:
            return  # failing: the retry timer writes everything pending at once
        batch, self.pending = self.pending, PendingWrites()
        future = self._executor.submit(self.store.write, batch)
        self._inflight = (future, batch)

        def done(f: Future[None]) -> None:
            try:
                loop.call_soon_threadsafe(self._landed, f)
            except RuntimeError:
                pass  # the loop is gone: close() collects it

        future.add_done_callback(done)

    def _landed(self, future: Future[None]) -> None:
        if self._inflight is None or self._inflight[0] is not future:
            return  # already collected by drain()
        _, batch = self._inflight
        self._inflight = None
        if self._finish(future, batch):
            self._kick()
        elif not self._closed and self._retry_handle is None:
            self._retry_handle = asyncio.get_running_loop().call_later(self.retry, self._retry)

    def _retry(self) -> None:
        self._retry_handle = None
        self._kick()

    def _wait_inflight(self) -> None:
        if self._inflight is None:
            return
        future, batch = self._inflight
        self._inflight = None
        self._finish(future, batch)

    def _finish(self, future: Future[None], batch: PendingWrites) -> bool:
        """Collect a finished write: True if it landed; if not, its rows are pending again."""
        try:
            future.result()
        except (sqlite3.Error, OSError) as exc:
            self.pending = batch.under(self.pending)
            self.failures += 1
            first = self.error is None
            self.error = f"cannot write {self.path}: {exc}"
            if first:
                log.error("%s; %d changes kept in memory, retried every %gs", self.error, len(self.pending), self.retry)
            self.on_failure(self.error)
            return False
        if self.error is not None and not len(self.pending):
            log.warning("caught up with %s after %d failed writes", self.path, self.failures)
            self.error = None
            self.on_recovery()
        return True

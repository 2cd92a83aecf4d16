"""One prober across N processes: `healthplane prober --processes N`.

A Python process checks on one core. `ShardedProber` runs N worker processes, each a `Prober`
over its shard of the endpoints (prober/shards.py: rendezvous hashing of `address:port`), and
looks like one `Prober` to the control-plane link: one prober id, one stream, one quorum vote
per endpoint, whatever N is.

- The parent keeps the topology, sends each worker the whole validated `Topology` (pickled,
  without its source document: a topology may come from no document at all, as the union of
  the control-plane replicas' shares does in prober/link.py; pickled it also loads in half the
  time of parsing the document again), and each worker keeps its own shard of it. A worker
  that dies is started again, with the topology.
- Workers send their verdicts and events as they happen, and every `report_interval` the
  state of the endpoints they checked since (compact tuples, not the targets), which
  `endpoint()` and `current_verdicts()` answer from. The parent writes the event log.
- Workers are spawned (not forked: no event loop or sockets inherited), ignore SIGINT, die with
  the parent (PR_SET_PDEATHSIG), and exit when their pipe closes.

Per-check listeners cannot see checks made in other processes: the parent's `check_listeners`
see nothing. For metrics, each worker sums its checks (`prober.metrics.CheckTally`: counts by
outcome, latency buckets) when the parent has `tally_listeners`, and hands the sums over with
its periodic report; the parent calls each tally listener with them (`CheckMetrics.add`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import enum
import logging
import multiprocessing as mp
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import replace
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from controlplane.health.store import EndpointId, Verdict
from controlplane.topology.model import Topology
from prober.events import JsonLinesLog, NullSink, ProbeEvent, ProberSink
from prober.metrics import CheckCounts, CheckTally
from prober.scheduler import EndpointReport, Prober, ProberStats, TopologyChange, targets
from prober.shards import shard_topology
from prober.state import CheckResult, EndpointState, Target

__all__ = ["ShardedProber"]

log = logging.getLogger("healthplane.prober")

# (cluster, endpoint, status, reason, since, counters, pending, checks, last_result, next_check)
_Report = tuple[Any, ...]


class _State(enum.Enum):
    UNOPENED = "unopened"
    RUNNING = "running"
    CLOSED = "closed"


class _Worker:
    """The parent's end of one worker process."""

    def __init__(self, shard: int, process: BaseProcess, conn: Connection) -> None:
        self.shard = shard
        self.process = process
        self.conn = conn
        self.stats: ProberStats | None = None


class ShardedProber:
    """A `Prober` whose checks run in `processes` worker processes; the same surface for the link."""

    def __init__(
        self,
        processes: int,
        topology: Topology | None = None,
        *,
        sink: ProberSink | None = None,
        source: str = "prober:sharded",
        max_concurrency: int = 512,
        event_log: str | Path | None = None,
        report_interval: float = 1.0,
        wall: Callable[[], float] = time.time,
    ) -> None:
        if processes < 1:
            raise ValueError(f"processes must be >= 1, got {processes}")
        self.processes = processes
        self.source = source
        self.max_concurrency = max_concurrency
        self.report_interval = report_interval
        self.check_listeners: list[Callable[[Target, CheckResult], None]] = []  # see the module docstring
        # Called with the sums of each worker's checks since its last report (CheckMetrics.add).
        # Workers sum their checks only if this has listeners when they start.
        self.tally_listeners: list[Callable[[CheckCounts], None]] = []
        self._sink: ProberSink = sink if sink is not None else NullSink()
        self._log = JsonLinesLog(event_log) if event_log is not None else None
        self._wall = wall
        self._state = _State.UNOPENED
        self._topology: Topology | None = None
        self._targets: dict[EndpointId, Target] = {}
        self._reports: dict[EndpointId, _Report] = {}
        self._workers: list[_Worker] = []
        self._outbox: asyncio.Queue[Verdict | ProbeEvent] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self._restarts = 0
        if topology is not None:
            self.update_topology(topology)

    # ------------------------------------------------------------------ lifecycle

    @property
    def running(self) -> bool:
        return self._state is _State.RUNNING

    async def start(self) -> None:
        """Spawn the workers and hand each the topology."""
        if self._state is _State.RUNNING:
            return
        if self._state is _State.CLOSED:
            raise RuntimeError("prober is closed")
        self._state = _State.RUNNING
        for shard in range(self.processes):
            self._workers.append(self._spawn(shard))
        self._tasks.append(asyncio.create_task(self._deliver(), name="healthplane-prober-deliver"))

    async def aclose(self) -> None:
        """Stop the workers, deliver what is queued, close the log; idempotent."""
        if self._state is _State.CLOSED:
            return
        self._state = _State.CLOSED
        loop = asyncio.get_running_loop()
        for worker in self._workers:
            with contextlib.suppress(OSError, ValueError):
                loop.remove_reader(worker.conn.fileno())
            with contextlib.suppress(OSError):
                worker.conn.send(("stop",))
        for worker in self._workers:
            await asyncio.to_thread(worker.process.join, 5)
            if worker.process.is_alive():
                worker.process.kill()
                await asyncio.to_thread(worker.process.join, 5)
            worker.conn.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        while not self._outbox.empty():
            await self._deliver_one(self._outbox.get_nowait())
        if self._log is not None:
            self._log.close()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    def _spawn(self, shard: int) -> _Worker:
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()
        options = {
            "source": self.source,
            "max_concurrency": self.max_concurrency,
            "interval": self.report_interval,
            "tally": bool(self.tally_listeners),
        }
        process = ctx.Process(
            target=worker_main,
            args=(child, shard, self.processes, options),
            name=f"healthplane-prober-{shard}",
            daemon=True,
        )
        process.start()
        child.close()
        worker = _Worker(shard, process, parent)
        if self._topology is not None:
            parent.send(("topology", self._topology))
        asyncio.get_running_loop().add_reader(parent.fileno(), self._readable, worker)
        return worker

    # ------------------------------------------------------------------ topology

    def update_topology(self, topology: Topology) -> TopologyChange:
        """Hand the workers `topology`; each checks its shard. The change is computed here, for all."""
        if self._state is _State.CLOSED:
            raise RuntimeError("prober is closed")
        wanted = {t.id: t for t in targets(topology)}
        added = tuple(k for k in wanted if k not in self._targets)
        removed = tuple(k for k in self._targets if k not in wanted)
        replaced = tuple(k for k, t in wanted.items() if k in self._targets and self._targets[k] != t)
        kept = len(wanted) - len(added) - len(replaced)
        self._targets = wanted
        for key in removed:
            self._reports.pop(key, None)
        self._topology = replace(topology, document={})
        for worker in self._workers:
            with contextlib.suppress(OSError):
                worker.conn.send(("topology", self._topology))
        return TopologyChange(added, removed, replaced, kept)

    # ------------------------------------------------------------------ reports

    def endpoints(self) -> Iterable[EndpointId]:
        return self._targets.keys()

    def endpoint(self, cluster: str, endpoint: str) -> EndpointReport | None:
        target = self._targets.get((cluster, endpoint))
        if target is None:
            return None
        report = self._reports.get((cluster, endpoint))
        if report is None:
            state = EndpointState.for_target(target)
            return EndpointReport(target, state.status, state.reason, state.since, state.counters, None, 0, None, None)
        _, _, status, reason, since, counters, pending, checks, last_result, next_check = report
        return EndpointReport(target, status, reason, since, counters, pending, checks, last_result, next_check)

    def current_verdicts(self) -> list[Verdict]:
        out = []
        for key in self._targets:
            report = self.endpoint(*key)
            assert report is not None
            out.append(Verdict(key[0], key[1], report.status, report.reason, report.since, self.source))
        return out

    def stats(self) -> ProberStats:
        """The workers' latest stats together: counts summed, lags the worst of them."""
        stats = [w.stats for w in self._workers if w.stats is not None]
        return ProberStats(
            endpoints=len(self._targets),
            in_flight=sum(s.in_flight for s in stats),
            checks_started=sum(s.checks_started for s in stats),
            inconclusive=sum(s.inconclusive for s in stats),
            lag_max=max((s.lag_max for s in stats), default=0.0),
            lag_p50=max((s.lag_p50 for s in stats), default=0.0),
            lag_p99=max((s.lag_p99 for s in stats), default=0.0),
            lag_window=sum(s.lag_window for s in stats),
            failed=sum(s.failed for s in stats),
        )

    # ------------------------------------------------------------------ from the workers

    def _readable(self, worker: _Worker) -> None:
        try:
            while worker.conn.poll():
                self._receive(worker, worker.conn.recv())
        except (EOFError, OSError):
            self._lost(worker)

    def _receive(self, worker: _Worker, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "verdict" or kind == "event":
            self._outbox.put_nowait(message[1])
        elif kind == "reports":
            for report in message[1]:
                key = (report[0], report[1])
                if key in self._targets:
                    self._reports[key] = report
            worker.stats = message[2]
            counts = message[3] if len(message) > 3 else None
            if counts is not None:
                for listener in self.tally_listeners:
                    try:
                        listener(counts)
                    except Exception:
                        log.exception("tally listener failed")

    def _lost(self, worker: _Worker) -> None:
        loop = asyncio.get_running_loop()
        with contextlib.suppress(OSError, ValueError):
            loop.remove_reader(worker.conn.fileno())
        worker.conn.close()
        if self._state is not _State.RUNNING:
            return
        worker.process.join(1)
        self._restarts += 1
        log.error(
            "prober worker %d exited (code %s); starting it again (%d restarts)",
            worker.shard,
            worker.process.exitcode,
            self._restarts,
        )
        self._workers[self._workers.index(worker)] = self._spawn(worker.shard)

    async def _deliver(self) -> None:
        while True:
            await self._deliver_one(await self._outbox.get())

    async def _deliver_one(self, item: Verdict | ProbeEvent) -> None:
        try:
            if isinstance(item, Verdict):
                await self._sink.on_verdict(item)
            else:
                if self._log is not None:
                    self._log.write(item)
                await self._sink.on_event(item)
        except Exception:
            log.exception("prober sink failed on %r", item)


# --------------------------------------------------------------------------- the worker process


class _PipeSink(NullSink):
    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    async def on_verdict(self, verdict: Verdict) -> None:
        self._conn.send(("verdict", verdict))

    async def on_event(self, event: ProbeEvent) -> None:
        self._conn.send(("event", event))


def worker_main(conn: Connection, shard: int, shards: int, options: dict[str, Any]) -> None:
    """A worker process: a `Prober` over shard `shard` of `shards`, driven through `conn`."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s shard {shard} %(name)s %(levelname)s %(message)s")
    asyncio.run(_worker(conn, shard, shards, options))


async def _worker(conn: Connection, shard: int, shards: int, options: dict[str, Any]) -> None:
    from prober.scheduler import tune_gc_for_checks

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    prober = Prober(
        sink=_PipeSink(conn),
        source=options["source"],
        max_concurrency=options["max_concurrency"],
    )

    def readable() -> None:
        try:
            while conn.poll():
                message = conn.recv()
                if message[0] == "topology":
                    prober.update_topology(shard_topology(message[1], shard, shards))
                elif message[0] == "stop":
                    stop.set()
        except (EOFError, OSError):
            stop.set()

    tally = CheckTally() if options.get("tally") else None
    if tally is not None:
        prober.check_listeners.append(tally.on_check)
    loop.add_reader(conn.fileno(), readable)
    sent: dict[EndpointId, int] = {}
    async with prober:
        tune_gc_for_checks()
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(options["interval"]):
                    await stop.wait()
            reports = []
            for key in list(prober.endpoints()):
                r = prober.endpoint(*key)
                if r is None or sent.get(key) == r.checks:
                    continue
                sent[key] = r.checks
                reports.append(
                    (key[0], key[1], r.status, r.reason, r.since, r.counters, r.pending, r.checks, r.last_result, None)
                )
            try:
                conn.send(("reports", reports, prober.stats(), None if tally is None else tally.take()))
            except OSError:
                break
    loop.remove_reader(conn.fileno())

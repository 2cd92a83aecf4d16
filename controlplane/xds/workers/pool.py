"""The main process's side of the xDS workers: start them, hand them snapshots, read their records,
replace the ones that die or stop answering.

- Snapshots: on each published snapshot, one frame per base (every worker normally holds the
  same one, so one encoding for all) written to each worker's channel without waiting; nothing
  per stream happens here. A worker whose channel holds more than `MAX_BUFFERED` unread bytes
  has stopped reading and is replaced.
- Records: each worker's batches go to the `Mirror`, which reports them through the control
  plane's `StreamCallbacks`; `streams` and `close_stream` let the stuck-stream watchdog see and
  close worker streams as it does in-process ones.
- Faults: a worker that exits is started again in its slot (its Envoys have reconnected to the
  others meanwhile; the new one takes its share of new connections); one whose heartbeat stops
  for `stuck_after` seconds while its CPU time stands still (stopped, blocked), or for
  `BUSY_GRACE` times that while it runs (a loop that never yields), is killed and replaced. Each
  is recorded as a `worker` event.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import socket
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from controlplane.events import EventSink, JsonFormatter
from controlplane.snapshots.cache import SnapshotHistory, SnapshotSource
from controlplane.snapshots.snapshot import Snapshot
from controlplane.topology.model import Topology
from controlplane.xds.server import StreamCallbacks
from controlplane.xds.stream import StreamState
from controlplane.xds.workers.channel import Channel
from controlplane.xds.workers.mirror import Mirror
from controlplane.xds.workers.wire import encode_snapshot

log = logging.getLogger("healthplane.xds.workers")

MAX_BUFFERED = 256 * 1024 * 1024  # unread snapshot bytes before a worker counts as stuck
START_TIMEOUT = 60.0
BUSY_GRACE = 6  # a silent worker still using CPU is given this many times `stuck_after`
STOP_TIMEOUT = 8.0
STREAM_IDS_PER_WORKER = 1_000_000_000  # a worker's stream ids: serial * this + 1, 2, ...
_ROOT = str(Path(__file__).resolve().parents[3])


def _cpu_ticks(pid: int) -> int | None:
    """User + system CPU time of a process, in clock ticks (None if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[11]) + int(fields[12])


class Snapshots(SnapshotSource, SnapshotHistory, Protocol):
    """The snapshot cache as the pool reads it: current, wake-ups, history."""


@dataclass(eq=False)
class _Worker:
    slot: int
    serial: int
    proc: asyncio.subprocess.Process | None = None
    channel: Channel | None = None
    base: Snapshot | None = None
    heard: float = 0.0
    stats: dict[str, Any] = field(default_factory=dict)
    ready: asyncio.Future[int] | None = None
    stopped: asyncio.Future[int] | None = None
    reader: asyncio.Task[None] | None = None
    why_killed: str | None = None
    cpu_ticks: int | None = None  # its CPU time when it was last found silent


class _Refused:
    def __init__(self, pool: WorkerPool) -> None:
        self._pool = pool

    @property
    def refused(self) -> int:
        pool = self._pool
        return pool.refused_across + sum(int(w.stats.get("refused", 0)) for w in pool.workers.values())


class WorkerPool:
    """`count` xDS worker processes sharing the xDS port: `start`, then `aclose` (safe twice)."""

    def __init__(
        self,
        count: int,
        source: Snapshots,
        callbacks: StreamCallbacks,
        events: EventSink,
        topology: Callable[[], Topology],
        *,
        stuck_after: float = 10.0,
        heartbeat: float = 0.5,
    ) -> None:
        if count < 1:
            raise ValueError("at least one worker")
        self.count = count
        self.source = source
        self.events = events
        self.topology = topology
        self.stuck_after = stuck_after
        self.heartbeat = heartbeat
        self.mirror = Mirror(callbacks, source.find)
        self.workers: dict[int, _Worker] = {}
        self.restarts = 0
        self.port = 0
        self.peers = _Refused(self)  # what xds_limit_metrics reads, summed over the workers
        self._serials = itertools.count(1)
        self._closing = False
        self._host = ""
        self._services = ""
        self._asked_to_close: set[int] = set()
        self._push_scheduled = False
        self._cancel_wake: Callable[[], None] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._ended_before: Counter[str] = Counter()  # of workers that are gone
        self.refused_across = 0  # streams closed by the per-peer limit across workers (Mirror)
        self.mirror.over_limit = self._over_limit

    # ------------------------------------------------------------------ lifecycle

    async def start(self, host: str, port: int, services: str) -> int:
        """Start every worker on `host:port` (0: the first picks a port, the others share it); the port."""
        self._host, self._services = host, services
        self.mirror.peer_limit = self.topology().controlplane.security.xds_max_streams_per_peer
        first = await self._spawn(0, port)
        self.port = first
        if self.count > 1:
            await asyncio.gather(*(self._spawn(slot, self.port) for slot in range(1, self.count)))
        self._cancel_wake = self.source.subscribe(self._wake)
        self._tasks.append(asyncio.create_task(self._watch(), name="xds-workers-watch"))
        return self.port

    async def _spawn(self, slot: int, port: int) -> int:
        serial = next(self._serials)
        worker = _Worker(slot, serial)
        loop = asyncio.get_running_loop()
        worker.ready = loop.create_future()
        worker.stopped = loop.create_future()
        ours, theirs = socket.socketpair()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_ROOT, env.get("PYTHONPATH", "")) if p)
        try:
            worker.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "controlplane.xds.workers.worker",
                str(theirs.fileno()),
                pass_fds=(theirs.fileno(),),
                env=env,
            )
        finally:
            theirs.close()
        reader, writer = await asyncio.open_connection(sock=ours)
        worker.channel = Channel(reader, writer)
        settings = {
            "slot": slot,
            "host": self._host,
            "port": port,
            "services": self._services,
            "first_stream_id": serial * STREAM_IDS_PER_WORKER + 1,
            "heartbeat": self.heartbeat,
            "log_level": logging.getLevelName(logging.getLogger("healthplane").getEffectiveLevel()),
            # As this process logs (`--log-format`): JSON lines if its root handler writes them.
            "log_format": "json"
            if any(isinstance(h.formatter, JsonFormatter) for h in logging.getLogger().handlers)
            else "text",
        }
        current = self.source.current()
        assert current is not None
        worker.channel.send(("init", settings))
        worker.channel.send_bytes(encode_snapshot(current, None))
        worker.base = current
        worker.heard = time.monotonic()
        self.workers[slot] = worker
        worker.reader = asyncio.create_task(self._read(worker), name=f"xds-worker-{slot}-read")
        try:
            bound = await asyncio.wait_for(asyncio.shield(worker.ready), START_TIMEOUT)
        except BaseException:
            self._kill(worker, "did not start")
            raise
        self._tasks = [t for t in self._tasks if not t.done()]  # the supervisors of workers replaced
        self._tasks.append(asyncio.create_task(self._supervise(worker), name=f"xds-worker-{slot}"))
        log.info("xDS worker %d started (pid %d) on port %d", slot, worker.proc.pid, bound)
        return bound

    async def _read(self, worker: _Worker) -> None:
        assert worker.channel is not None and worker.ready is not None and worker.stopped is not None
        try:
            while True:
                message = await worker.channel.receive()
                worker.heard = time.monotonic()
                kind = message[0]
                if kind == "records":
                    self.mirror.apply(worker.slot, message[1])
                elif kind == "heartbeat":
                    worker.stats = message[2]
                elif kind == "ready":
                    if not worker.ready.done():
                        worker.ready.set_result(int(message[1]))
                elif kind == "failed":
                    if not worker.ready.done():
                        worker.ready.set_exception(OSError(f"xDS worker {worker.slot}: {message[1]}"))
                elif kind == "stopped":
                    if not worker.stopped.done():
                        worker.stopped.set_result(int(message[1]))
        except EOFError:
            pass
        except Exception:
            log.exception("xDS worker %d: bad message; replacing it", worker.slot)
            self._kill(worker, "sent a message that could not be read")
        finally:
            if not worker.ready.done():
                worker.ready.set_exception(OSError(f"xDS worker {worker.slot} exited before it was ready"))
            if not worker.stopped.done():
                worker.stopped.set_result(0)

    async def _supervise(self, worker: _Worker) -> None:
        assert worker.proc is not None and worker.reader is not None
        code = await worker.proc.wait()
        await asyncio.gather(worker.reader, return_exceptions=True)  # every record it sent, applied
        if self._closing:
            return
        if worker.channel is not None:
            worker.channel.close()
        for code_name, n in worker.stats.get("ended_with", {}).items():
            self._ended_before[code_name] += n
        dropped = self.mirror.drop(worker.slot)
        why = worker.why_killed or f"exited with code {code}"
        self.restarts += 1
        message = f"xDS worker {worker.slot} (pid {worker.proc.pid}) {why}: {dropped} streams reconnect to the others"
        log.warning("%s; starting a new one", message)
        self.events.record("worker", message, slot=worker.slot, pid=worker.proc.pid, why=why, streams=dropped)
        delay = 0.1
        while not self._closing:
            try:
                await self._spawn(worker.slot, self.port)
                return
            except Exception as exc:
                log.error("xDS worker %d could not be started again (%s); retrying in %.1fs", worker.slot, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _watch(self) -> None:
        period = max(0.05, min(1.0, self.stuck_after / 4))
        while not self._closing:
            await asyncio.sleep(period)
            now = time.monotonic()
            for worker in list(self.workers.values()):
                if worker.proc is None or worker.proc.returncode is not None or worker.why_killed:
                    continue
                if worker.ready is None or not worker.ready.done():
                    continue  # starting: START_TIMEOUT covers it
                silent = now - worker.heard
                if silent > self.stuck_after:
                    # Busy is not stuck: a worker starved of CPU (a reconnect storm of thousands of
                    # streams on a loaded host) writes no heartbeat for a while but uses CPU. One
                    # whose CPU time stands still (stopped, blocked), or that stays silent for
                    # BUSY_GRACE times the limit (a loop that never yields), is stuck.
                    cpu = _cpu_ticks(worker.proc.pid)
                    busy = cpu is not None and cpu != worker.cpu_ticks
                    worker.cpu_ticks = cpu
                    if busy and silent < self.stuck_after * BUSY_GRACE:
                        continue
                    state = "busy" if busy else "no CPU time either"
                    self._kill(worker, f"stopped answering (no heartbeat for {silent:.1f}s, {state})")
                elif worker.channel is not None and worker.channel.buffered > MAX_BUFFERED:
                    self._kill(worker, f"stopped reading its channel ({worker.channel.buffered} bytes unread)")
                else:
                    worker.cpu_ticks = None

    def _kill(self, worker: _Worker, why: str) -> None:
        worker.why_killed = why
        if worker.proc is not None and worker.proc.returncode is None:
            log.warning("xDS worker %d (pid %d) %s: killing it", worker.slot, worker.proc.pid, why)
            worker.proc.kill()

    async def aclose(self, reason: str, grace: float | None = 0.5) -> int:
        """Stop every worker, each closing its streams with `reason`; how many streams were closed."""
        if self._closing:
            return 0
        self._closing = True
        if self._cancel_wake is not None:
            self._cancel_wake()
        workers = list(self.workers.values())
        for worker in workers:
            if worker.channel is not None:
                worker.channel.send(("stop", reason, grace or 0))
        closed = 0
        for worker in workers:
            assert worker.stopped is not None
            try:
                closed += await asyncio.wait_for(asyncio.shield(worker.stopped), STOP_TIMEOUT)
            except TimeoutError:
                self._kill(worker, "did not stop")
        for worker in workers:
            if worker.proc is not None:
                try:
                    await asyncio.wait_for(worker.proc.wait(), 2.0)
                except TimeoutError:
                    self._kill(worker, "did not exit")
                    await worker.proc.wait()
            if worker.channel is not None:
                worker.channel.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, *(w.reader for w in workers if w.reader), return_exceptions=True)
        for worker in workers:
            self.mirror.drop(worker.slot)
        return closed

    # ------------------------------------------------------------------ snapshots down

    def _wake(self) -> None:
        if not self._push_scheduled:
            self._push_scheduled = True
            asyncio.get_running_loop().call_soon(self.push)

    def push(self) -> None:
        """Hand the current snapshot to every worker that does not hold it: one encoding per base."""
        self._push_scheduled = False
        current = self.source.current()
        if current is None or self._closing:
            return
        frames: dict[int, bytes] = {}
        for worker in self.workers.values():
            if worker.channel is None or worker.base is current or worker.why_killed:
                continue
            key = id(worker.base)
            data = frames.get(key)
            if data is None:
                data = frames[key] = encode_snapshot(current, worker.base)
            worker.channel.send_bytes(data)
            worker.base = current

    def _over_limit(self, stream_id: int, reason: str) -> None:
        if self.close_stream(stream_id, reason, "RESOURCE_EXHAUSTED"):
            self.refused_across += 1
            log.warning("stream %d refused: %s", stream_id, reason)

    # ------------------------------------------------------------------ what the watchdog and the metrics read

    @property
    def streams(self) -> Mapping[int, StreamState]:
        return self.mirror.streams

    def close_stream(self, stream_id: int, reason: str, code: str = "UNAVAILABLE") -> bool:
        """Ask the worker holding `stream_id` to close it with `code` (a grpc.StatusCode name);
        False if it is gone or was asked already."""
        slot = self.mirror.owner.get(stream_id)
        worker = self.workers.get(slot) if slot is not None else None
        if worker is None or worker.channel is None or stream_id in self._asked_to_close:
            return False
        if len(self._asked_to_close) > 100_000:
            self._asked_to_close &= set(self.mirror.streams)
        self._asked_to_close.add(stream_id)
        worker.channel.send(("close", stream_id, reason, code))
        return True

    @property
    def ended_with(self) -> Counter[str]:
        total = Counter(self._ended_before)
        for worker in self.workers.values():
            total.update(worker.stats.get("ended_with", {}))
        return total

    def metrics(self) -> Iterator[Metric]:
        """Scrape-time: the workers running and how often one was replaced."""
        yield GaugeMetricFamily("healthplane_xds_workers", "xDS worker processes running.", value=len(self.pids()))
        yield CounterMetricFamily(
            "healthplane_xds_worker_restarts",
            "xDS worker processes started again after they exited or stopped answering.",
            value=self.restarts,
        )

    def pids(self) -> dict[int, int]:
        """Worker slot -> process id, of the workers running."""
        return {
            slot: w.proc.pid for slot, w in self.workers.items() if w.proc is not None and w.proc.returncode is None
        }

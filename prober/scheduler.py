"""Scheduling: when each endpoint is checked next (pure), and the `Prober` that runs the checks.

Planning (`next_check_time`, unit-tested with an injected `random.Random`):

- The first check comes after a uniform delay in `0..initial_jitter`, which spreads the first
  round of checks.
- Later checks come `interval` after the previous check *completes* (Envoy's rule), so a slow
  check never overlaps the next one.
- While a transition is pending the edge intervals apply, as HAProxy's `fastinter` does:
  `healthy_edge_interval` while heading for HEALTHY, `unhealthy_edge_interval` while heading
  for UNHEALTHY. These are Envoy's field names, but Envoy uses them for the single check right
  *after* a transition. We use them for the checks *during* one, which is what shortens
  detection.
- While UNHEALTHY with nothing pending, `unhealthy_interval` applies (HAProxy `downinter`).
- An unset interval falls back to the one below it: edge -> unhealthy (when UNHEALTHY) -> interval.
- `interval_jitter_percent` then scales the chosen interval by a uniform factor in
  `[1 - p/100, 1 + p/100]`, with a floor of `MIN_DELAY`.

Running (`Prober`): scheduling passes (plain event-loop callbacks) start each check as its time
comes, within a concurrency limit. Due times wait in a FIFO per fixed delay (no jitter, no
state-dependent interval: checks planned at now + delay come due in the order they were
planned) or in a heap (first checks, jittered or state-dependent intervals). Endpoints cost a
queue entry each, not a task, so 10,000 of them are cheap. Every check feeds its endpoint's
`EndpointState`. Each transition becomes a `Verdict` and a `ProbeEvent` for the sink, and a line
in the optional JSON-lines log.
"""

from __future__ import annotations

import asyncio
import enum
import gc
import heapq
import itertools
import logging
import math
import random
import socket
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

from controlplane.health.store import EndpointId, HealthStatus, Verdict
from controlplane.topology.model import HealthCheck, Topology
from prober.checks import Checker, NetworkChecker
from prober.events import JsonLinesLog, NullSink, ProbeEvent, ProberSink
from prober.limits import (
    descriptors_in_use,
    keepalive_connections,
    pool_budget,
    pool_message,
    raise_open_files_limit,
)
from prober.state import CheckResult, Counters, EndpointState, PendingEdge, ResultKind, Target

__all__ = [
    "MIN_DELAY",
    "EndpointReport",
    "Prober",
    "ProberStats",
    "TopologyChange",
    "base_interval",
    "first_check_time",
    "next_check_time",
    "targets",
]

log = logging.getLogger("healthplane.prober")


def tune_gc_for_checks() -> None:
    """Keep the cyclic garbage collector from stalling the check loop; call once the prober runs.

    Measured in bench/prober_load.py at 10,000 endpoints: with CPython's default threshold (700) the
    in-flight checks' objects trigger young collections about 200 times a second, which promote
    them and trigger full collections over every pooled connection: 47% of the time in GC and
    pauses of 267 ms, each delaying every check due during it. Checks leave little cyclic
    garbage, so fewer, larger young collections cost almost nothing.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 10, 10)


# A 100% jitter could plan a delay of 0; a floor keeps one endpoint from spinning.
MIN_DELAY = 0.001
# The scheduling loop starts checks due up to BATCH_AHEAD early and sleeps at least BATCH_SLEEP.
BATCH_AHEAD = 0.0005
BATCH_SLEEP = 0.001


def base_interval(state: EndpointState, policy: HealthCheck) -> float:
    """The interval for `state`'s next check, before jitter."""
    unhealthy = policy.unhealthy_interval if state.status is HealthStatus.UNHEALTHY else None
    pending = state.pending
    if pending == "healthy" and policy.healthy_edge_interval is not None:
        return policy.healthy_edge_interval
    if pending == "unhealthy" and policy.unhealthy_edge_interval is not None:
        return policy.unhealthy_edge_interval
    return unhealthy if unhealthy is not None else policy.interval


def first_check_time(now: float, policy: HealthCheck, rng: random.Random) -> float:
    """When a new endpoint gets its first check: `now` plus uniform 0..initial_jitter."""
    if policy.initial_jitter <= 0:
        return now
    return now + rng.uniform(0.0, policy.initial_jitter)


def next_check_time(now: float, state: EndpointState, policy: HealthCheck, rng: random.Random) -> float:
    """When to check next, given the state after the check that completed at `now`.

    A state with no checks yet gets `first_check_time`.
    """
    if state.checks == 0:
        return first_check_time(now, policy, rng)
    interval = base_interval(state, policy)
    spread = policy.interval_jitter_percent / 100.0
    if spread > 0:
        interval *= 1.0 + rng.uniform(-spread, spread)
    return now + max(interval, MIN_DELAY)


# --------------------------------------------------------------------------- running


def targets(topology: Topology) -> list[Target]:
    """Every endpoint of `topology` that has a health_check, as a Target."""
    return [
        Target(cluster.name, ep.address, ep.port, ep.health_check)
        for cluster in topology.clusters
        for ep in cluster.endpoints
        if ep.health_check is not None
    ]


@dataclass(frozen=True, slots=True)
class TopologyChange:
    """What `Prober.update_topology` did; `replaced` endpoints changed policy (counters restart)."""

    added: tuple[EndpointId, ...] = ()
    removed: tuple[EndpointId, ...] = ()
    replaced: tuple[EndpointId, ...] = ()
    kept: int = 0


@dataclass(frozen=True, slots=True)
class EndpointReport:
    """A read-only view of one probed endpoint."""

    target: Target
    status: HealthStatus
    reason: str
    since: float
    counters: Counters
    pending: PendingEdge | None
    checks: int
    last_result: CheckResult | None
    next_check: float | None  # monotonic clock; None while a check runs or before start


@dataclass(frozen=True, slots=True)
class ProberStats:
    """Counts and scheduling lag (actual start minus planned start, seconds) of recent checks."""

    endpoints: int
    in_flight: int
    checks_started: int
    inconclusive: int  # checks the prober could not judge because its own loop was late
    lag_max: float  # over the prober's life
    lag_p50: float  # over the last `lag_window` checks
    lag_p99: float
    lag_window: int
    failed: int = 0  # checks that failed (HTTP, TCP, timeout) over the prober's life


def _head(source: deque[tuple[float, _Entry]] | list[tuple[float, int, _Entry]]) -> float:
    return source[0][0]


class _State(enum.Enum):
    UNOPENED = "unopened"
    RUNNING = "running"
    CLOSED = "closed"


def fixed_delay(policy: HealthCheck) -> float | None:
    """The delay between checks when it never depends on the state or on chance, else None."""
    if (
        policy.interval_jitter_percent > 0
        or policy.unhealthy_interval is not None
        or policy.healthy_edge_interval is not None
        or policy.unhealthy_edge_interval is not None
    ):
        return None
    return max(policy.interval, MIN_DELAY)


class _Entry:
    """The prober's bookkeeping for one target."""

    __slots__ = ("due", "fixed", "last_result", "removed", "running", "state", "target")

    def __init__(self, target: Target, state: EndpointState) -> None:
        self.target = target
        self.state = state
        self.fixed = fixed_delay(target.health_check)
        self.due: float | None = None
        self.running = False
        self.removed = False
        self.last_result: CheckResult | None = None


class Prober:
    """Checks every endpoint of a topology on its own schedule and reports health transitions.

    Lifecycle: unopened -> `start()` -> running -> `aclose()` -> closed; `async with` does both.
    The prober owns its checker (a `NetworkChecker` unless one is given) and closes it. A
    `NetworkChecker` it makes itself gets a keep-alive pool sized to the open-files limit,
    which `start()` raises to the hard limit first (prober/limits.py).
    """

    def __init__(
        self,
        topology: Topology | None = None,
        *,
        sink: ProberSink | None = None,
        checker: Checker | None = None,
        max_concurrency: int = 512,
        open_files_limit: int | None = None,
        source: str | None = None,
        event_log: str | Path | None = None,
        lag_window: int = 4096,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        self.source = source if source is not None else f"prober:{socket.gethostname()}"
        self.max_concurrency = max_concurrency
        # The open-files limit the keep-alive pool is sized for (prober/limits.py); None: raise
        # the soft limit to the hard one at start and use that.
        self._open_files_limit = open_files_limit
        self._pool_budget: int | None = None
        self._pool_needed_logged = 0
        self._sink: ProberSink = sink if sink is not None else NullSink()
        self._checker = checker
        self._log = JsonLinesLog(event_log) if event_log is not None else None
        self._rng = rng if rng is not None else random.Random()
        self._clock = clock
        self._wall = wall
        self._state = _State.UNOPENED
        self._entries: dict[EndpointId, _Entry] = {}
        # Due checks: a FIFO per fixed delay (checks planned at now + delay arrive in order, so a
        # deque append and popleft replace a heap push and pop), and a heap for the rest (first
        # checks, jittered and state-dependent intervals).
        self._fifos: dict[float, deque[tuple[float, _Entry]]] = {}
        self._heap: list[tuple[float, int, _Entry]] = []
        self._seq = itertools.count()
        self._tick_handle: asyncio.Handle | None = None  # the scheduling pass, when one is planned
        self._wake_at = math.inf  # when the next pass runs; -inf while one runs or is about to
        self._fast_start: Callable[[Target, _Entry, Callable[[_Entry, CheckResult | None], None]], bool] | None = None
        self._finish_callback = self._finish  # one bound method, not one per check
        self._loop: asyncio.AbstractEventLoop  # the running loop, from start()
        self._tasks: set[asyncio.Task[None]] = set()  # checks that run as coroutines
        self._outbox: asyncio.Queue[Verdict | ProbeEvent] = asyncio.Queue()
        self._releases: list[Target] = []
        self._main: asyncio.Task[None] | None = None
        self._in_flight = 0
        self._checks_started = 0
        self._inconclusive = 0
        self._failed = 0
        self._overload_logged = -1.0e9
        self._lags: deque[float] = deque(maxlen=max(lag_window, 1))
        self._lag_max = 0.0
        # Called with every check result (metrics); exceptions are logged and do not stop checks.
        self.check_listeners: list[Callable[[Target, CheckResult], None]] = []
        if topology is not None:
            self.update_topology(topology)

    # ------------------------------------------------------------------ lifecycle

    @property
    def running(self) -> bool:
        return self._state is _State.RUNNING

    async def start(self) -> None:
        """Start checking; the first check of each endpoint comes after its initial jitter."""
        if self._state is _State.RUNNING:
            return
        if self._state is _State.CLOSED:
            raise RuntimeError("prober is closed")
        if self._checker is None:
            self._checker = NetworkChecker(
                clock=self._clock, wall=self._wall, max_idle_connections=self._plan_descriptors()
            )
            self._check_descriptors()
        if isinstance(self._checker, NetworkChecker):
            self._fast_start = self._checker.start_check
        self._loop = asyncio.get_running_loop()
        self._state = _State.RUNNING
        now = self._clock()
        for entry in self._entries.values():
            self._push(entry, first_check_time(now, entry.target.health_check, self._rng))
        self._main = asyncio.create_task(self._run(), name="healthplane-prober-deliver")

    def _plan_descriptors(self) -> int:
        """Raise the open-files limit (unless one was given) and size the keep-alive pool under it."""
        limit = self._open_files_limit
        if limit is None:
            files = raise_open_files_limit()
            if files.raised:
                log.info("prober: open-files limit raised from %d to %d (the hard limit)", files.before, files.soft)
            limit = files.soft
        self._open_files_limit = limit
        self._pool_budget = pool_budget(limit, in_use=descriptors_in_use(), max_concurrency=self.max_concurrency)
        return self._pool_budget

    def _check_descriptors(self) -> None:
        """Say when the keep-alive endpoints stop (or start again) fitting the descriptor budget."""
        if self._pool_budget is None or self._open_files_limit is None:
            return
        needed = keepalive_connections(e.target for e in self._entries.values())
        short = needed > self._pool_budget
        if short and needed != self._pool_needed_logged:
            log.warning("prober: %s", pool_message(needed, self._pool_budget, self._open_files_limit))
            self._pool_needed_logged = needed
        elif not short and self._pool_needed_logged:
            log.info("prober: %d keep-alive endpoints fit the open-files limit again", needed)
            self._pool_needed_logged = 0

    async def aclose(self) -> None:
        """Stop checking, deliver what is still queued, close the checker and the log; idempotent."""
        if self._state is _State.CLOSED:
            return
        self._state = _State.CLOSED
        if self._tick_handle is not None:
            self._tick_handle.cancel()
            self._tick_handle = None
        if self._main is not None:
            self._main.cancel()
            # A loop that crashed has logged why already; closing must still finish.
            await asyncio.gather(self._main, return_exceptions=True)
            self._main = None
        tasks, self._tasks = list(self._tasks), set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        while not self._outbox.empty():
            await self._deliver_one(self._outbox.get_nowait())
        if self._checker is not None:
            await self._checker.aclose()
        if self._log is not None:
            self._log.close()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    # ------------------------------------------------------------------ topology

    def update_topology(self, topology: Topology) -> TopologyChange:
        """Probe the endpoints of `topology`; unchanged targets keep their state and schedule.

        A target whose policy changed keeps its status but restarts its counters and schedule.
        """
        if self._state is _State.CLOSED:
            raise RuntimeError("prober is closed")
        wanted = {t.id: t for t in targets(topology)}
        added: list[EndpointId] = []
        removed: list[EndpointId] = []
        replaced: list[EndpointId] = []
        kept = 0
        for key, entry in list(self._entries.items()):
            target = wanted.get(key)
            if target == entry.target:
                kept += 1
                continue
            self._drop(entry)
            if target is None:
                removed.append(key)
            else:
                replaced.append(key)
                self._add(target, previous=entry.state)
        for key, target in wanted.items():
            if key not in self._entries:
                added.append(key)
                self._add(target, previous=None)
        if added or removed or replaced:
            log.info(
                "prober topology: %d added, %d removed, %d replaced, %d kept",
                len(added),
                len(removed),
                len(replaced),
                kept,
            )
        if added or replaced:
            self._check_descriptors()
        return TopologyChange(tuple(added), tuple(removed), tuple(replaced), kept)

    def _add(self, target: Target, *, previous: EndpointState | None) -> None:
        now = self._wall()
        if previous is None:
            state = EndpointState.for_target(target, since=now)
        else:
            state = previous.restart(target)
        entry = _Entry(target, state)
        self._entries[target.id] = entry
        if previous is None and state.status is not HealthStatus.UNKNOWN:
            # Announce a configured initial status at once; the control plane assumes UNKNOWN.
            self._emit(
                ProbeEvent(
                    target.cluster,
                    target.endpoint,
                    HealthStatus.UNKNOWN,
                    state.status,
                    state.reason,
                    Counters(),
                    now,
                    self.source,
                    target.health_check.kind,
                )
            )
        if self._state is _State.RUNNING:
            self._push(entry, first_check_time(self._clock(), target.health_check, self._rng))

    def _drop(self, entry: _Entry) -> None:
        entry.removed = True
        del self._entries[entry.target.id]
        if not entry.running:
            self._releases.append(entry.target)  # a running check releases when it ends
            self._wake_up()

    # ------------------------------------------------------------------ reports

    def current_verdicts(self) -> list[Verdict]:
        """One verdict per probed endpoint with its current status (for a full resync)."""
        return [
            Verdict(e.target.cluster, e.target.endpoint, e.state.status, e.state.reason, e.state.since, self.source)
            for e in self._entries.values()
        ]

    def endpoint(self, cluster: str, endpoint: str) -> EndpointReport | None:
        """What the prober knows about one endpoint, or None if it does not probe it."""
        entry = self._entries.get((cluster, endpoint))
        if entry is None:
            return None
        s = entry.state
        return EndpointReport(
            target=entry.target,
            status=s.status,
            reason=s.reason,
            since=s.since,
            counters=s.counters,
            pending=s.pending,
            checks=s.checks,
            last_result=entry.last_result,
            next_check=None if entry.running else entry.due,
        )

    def endpoints(self) -> Iterable[EndpointId]:
        return self._entries.keys()

    def stats(self) -> ProberStats:
        lags = sorted(self._lags)

        def pick(q: float) -> float:
            return lags[min(len(lags) - 1, int(q * len(lags)))] if lags else 0.0

        return ProberStats(
            endpoints=len(self._entries),
            in_flight=self._in_flight,
            checks_started=self._checks_started,
            inconclusive=self._inconclusive,
            lag_max=self._lag_max,
            lag_p50=pick(0.5),
            lag_p99=pick(0.99),
            lag_window=len(lags),
            failed=self._failed,
        )

    # ------------------------------------------------------------------ the loop

    def _push(self, entry: _Entry, due: float) -> None:
        """Plan `entry`'s next check at `due`, in the heap."""
        entry.due = due
        heapq.heappush(self._heap, (due, next(self._seq), entry))
        if due < self._wake_at:
            self._wake_up()  # the loop is sleeping until a later time

    def _plan(self, entry: _Entry, now: float) -> None:
        """Plan the check after the one that completed at `now`: `next_check_time`, without a heap.

        With no jitter the next check comes a fixed delay after `now`, and `now` only grows, so
        the checks planned with one delay are due in the order they were planned: a FIFO per
        delay holds them in order at the cost of an append (bench/checkers.py).
        """
        state = entry.state
        delay = entry.fixed
        if delay is None or not state.checks:
            hc = entry.target.health_check
            if not state.checks or hc.interval_jitter_percent > 0:
                self._push(entry, next_check_time(now, state, hc, self._rng))
                return
            delay = max(base_interval(state, hc), MIN_DELAY)
        due = now + delay
        fifo = self._fifos.get(delay)
        if fifo is None:
            fifo = self._fifos[delay] = deque()
        elif fifo and fifo[-1][0] > due:
            self._push(entry, due)  # a clock that went back (an injected one): keep each FIFO in order
            return
        entry.due = due
        fifo.append((due, entry))
        if due < self._wake_at:
            self._wake_up()

    def _wake_up(self) -> None:
        """Run a scheduling pass soon: a check is due before the planned pass, a slot freed, a release."""
        if self._wake_at == -math.inf or self._state is not _State.RUNNING:
            return  # a pass runs now or is about to
        if self._tick_handle is not None:
            self._tick_handle.cancel()
        self._wake_at = -math.inf
        self._tick_handle = self._loop.call_soon(self._tick)

    async def _run(self) -> None:
        await self._deliver()

    def _tick(self) -> None:
        """One scheduling pass: start every check due within `BATCH_AHEAD`, then plan the next pass.

        A pass starts every check due within `BATCH_AHEAD`, and the next comes at least
        `BATCH_SLEEP` later: at 10,000 checks a second that is a few checks per pass instead of a
        timer per check. Passes are plain callbacks of the event loop (a timer each), not a task
        sleeping on a future, which cost a future, a task step and a cancelled timer per pass.
        """
        self._tick_handle = None
        if self._state is not _State.RUNNING:
            return
        self._wake_at = -math.inf  # checks planned during the pass need no pass of their own
        try:
            now, wake_at = self._start_due()
        except Exception:
            # No more passes (_wake_at stays -inf): the prober keeps its state and stops checking.
            log.exception("prober loop crashed; no more checks will run")
            return
        self._wake_at = wake_at
        if wake_at < math.inf:
            loop = self._loop
            # call_at takes the loop's clock; ours may be another (tests inject one), so go by delay.
            self._tick_handle = loop.call_at(loop.time() + (wake_at - now), self._tick)

    def _start_due(self) -> tuple[float, float]:
        """Start the checks that are due; (now, when the next pass should run)."""
        releases = self._releases
        while releases:
            task = self._loop.create_task(self._release(releases.pop()))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        now = self._clock()
        horizon = now + BATCH_AHEAD
        limit = self.max_concurrency
        heap = self._heap
        fifos = self._fifos
        if len(fifos) > 1:
            for delay in [d for d, f in fifos.items() if not f]:
                del fifos[delay]
        # Oldest first: under the concurrency limit the longest-waiting checks start first.
        sources: list[deque[tuple[float, _Entry]] | list[tuple[float, int, _Entry]]] = [f for f in fifos.values() if f]
        if heap:
            sources.append(heap)
        if len(sources) > 1:
            sources.sort(key=_head)
        start = self._start
        for source in sources:
            if source is heap:
                while heap and self._in_flight < limit:
                    due, _, entry = heap[0]
                    if due > horizon:
                        break
                    heapq.heappop(heap)
                    if entry.removed or entry.due != due:
                        continue
                    start(entry, due, now)
            else:
                fifo = source
                assert isinstance(fifo, deque)
                while fifo and self._in_flight < limit:
                    due, entry = fifo[0]
                    if due > horizon:
                        break
                    fifo.popleft()
                    if entry.removed or entry.due != due:
                        continue
                    start(entry, due, now)
        if self._in_flight >= limit:
            return now, math.inf  # a check that ends wakes the loop
        first = heap[0][0] if heap else math.inf
        for fifo in fifos.values():
            if fifo and fifo[0][0] < first:
                first = fifo[0][0]
        if first == math.inf:
            return now, math.inf
        return now, max(first, now + BATCH_SLEEP)

    def _start(self, entry: _Entry, planned: float, now: float) -> None:
        entry.running = True
        self._in_flight += 1
        self._checks_started += 1
        lag = now - planned
        if lag < 0.0:
            lag = 0.0
        elif lag > self._lag_max:
            self._lag_max = lag
        self._lags.append(lag)
        fast = self._fast_start
        if fast is not None and fast(entry.target, entry, self._finish_callback):
            return
        task = self._loop.create_task(self._probe(entry))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _probe(self, entry: _Entry) -> None:
        assert self._checker is not None
        result: CheckResult | None
        try:
            result = await self._checker.check(entry.target)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("checker failed on %s/%s", entry.target.cluster, entry.target.endpoint)
            result = None
        self._finish(entry, result)

    def _finish(self, entry: _Entry, result: CheckResult | None) -> None:
        """Everything after a check: counters, transition, the next check time (plain code, no await)."""
        if self._state is not _State.RUNNING:
            return
        try:
            if entry.removed:
                self._releases.append(entry.target)
                return
            if result is not None:
                entry.last_result = result
                kind = result.kind
                if kind is not ResultKind.SUCCESS:
                    if kind is ResultKind.INCONCLUSIVE:
                        self._inconclusive += 1
                        if self._clock() - self._overload_logged >= 10.0:  # an overloaded loop needs no log storm
                            self._overload_logged = self._clock()
                            log.warning(
                                "%s/%s: %s (%d such checks so far; they count neither way)",
                                entry.target.cluster,
                                entry.target.endpoint,
                                result.reason,
                                self._inconclusive,
                            )
                    else:
                        self._failed += 1
                if self.check_listeners:
                    for listener in self.check_listeners:
                        try:
                            listener(entry.target, result)
                        except Exception:
                            log.exception("check listener failed")
                transition = entry.state.observe(result)
                if transition is not None:
                    self._emit(
                        ProbeEvent.from_transition(
                            transition,
                            source=self.source,
                            check=entry.target.health_check.kind,
                            latency=result.latency,
                        )
                    )
            self._plan(entry, self._clock())
        finally:
            entry.running = False
            self._in_flight -= 1
            if self._in_flight == self.max_concurrency - 1 or self._releases:
                self._wake_up()  # the loop may be waiting for a free slot or have resources to release

    async def _release(self, target: Target) -> None:
        current = self._entries.get(target.id)
        if current is not None and current.target == target:
            return  # the same target came back; its resources are in use again
        if self._checker is not None:
            try:
                await self._checker.release(target)
            except Exception:
                log.exception("releasing %s/%s failed", target.cluster, target.endpoint)

    # ------------------------------------------------------------------ output

    def _emit(self, event: ProbeEvent) -> None:
        log.info("%s/%s %s -> %s: %s", event.cluster, event.endpoint, event.old.name, event.new.name, event.reason)
        if self._log is not None:
            try:
                self._log.write(event)
            except OSError:
                log.exception("cannot write the probe event log %s", self._log.path)
        self._outbox.put_nowait(event.verdict())
        self._outbox.put_nowait(event)

    async def _deliver(self) -> None:
        while True:
            await self._deliver_one(await self._outbox.get())

    async def _deliver_one(self, item: Verdict | ProbeEvent) -> None:
        try:
            if isinstance(item, Verdict):
                await self._sink.on_verdict(item)
            else:
                await self._sink.on_event(item)
        except Exception:
            log.exception("prober sink failed on %r", item)

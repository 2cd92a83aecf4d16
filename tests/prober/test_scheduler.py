"""Scheduling: the pure planning of check times, and the Prober's loop driven by a scripted checker."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator, Iterable
from dataclasses import replace
from pathlib import Path

import pytest

from controlplane.health.store import EndpointId, HealthStatus, Verdict
from controlplane.topology.model import Cluster, Endpoint, HealthCheck, Topology
from prober.events import NullSink, ProbeEvent, QueueSink
from prober.scheduler import (
    MIN_DELAY,
    EndpointReport,
    Prober,
    base_interval,
    first_check_time,
    next_check_time,
    targets,
)
from prober.state import CheckResult, Counters, EndpointState, ResultKind, Target, Thresholds
from tests.prober.backends import eventually

# --------------------------------------------------------------------------- planning (pure)

POLICY = HealthCheck(
    kind="http",
    interval=10.0,
    unhealthy_interval=30.0,
    healthy_edge_interval=1.0,
    unhealthy_edge_interval=2.0,
    healthy_threshold=3,
    unhealthy_threshold=3,
)


def state_after(*kinds: ResultKind, initial: HealthStatus = HealthStatus.UNKNOWN) -> EndpointState:
    state = EndpointState("web", "10.0.0.1:80", Thresholds(3, 3, 3, 3), initial_status=initial)
    for kind in kinds:
        state.observe(CheckResult(kind, kind.value))
    return state


S, F = ResultKind.SUCCESS, ResultKind.HTTP_FAILURE


def test_first_check_is_uniform_within_initial_jitter() -> None:
    rng = random.Random(7)
    policy = replace(POLICY, initial_jitter=2.0)
    times = [next_check_time(100.0, state_after(), policy, rng) for _ in range(2000)]
    assert all(100.0 <= t <= 102.0 for t in times)
    assert min(times) < 100.1 and max(times) > 101.9  # spread over the whole window
    assert first_check_time(100.0, replace(POLICY, initial_jitter=0.0), rng) == 100.0


def test_interval_without_jitter_is_exact() -> None:
    rng = random.Random(1)
    assert next_check_time(5.0, state_after(S, S, S), POLICY, rng) == 15.0


def test_interval_jitter_is_plus_or_minus_percent() -> None:
    rng = random.Random(3)
    policy = replace(POLICY, interval_jitter_percent=20.0)
    healthy = state_after(S, S, S)
    delays = [next_check_time(0.0, healthy, policy, rng) for _ in range(2000)]
    assert all(8.0 <= d <= 12.0 for d in delays)
    assert min(delays) < 8.2 and max(delays) > 11.8


def test_full_jitter_never_plans_zero() -> None:
    class Lowest(random.Random):
        def uniform(self, a: float, b: float) -> float:
            return a

    policy = replace(POLICY, interval_jitter_percent=100.0)
    assert next_check_time(1.0, state_after(S, S, S), policy, Lowest()) == 1.0 + MIN_DELAY


def test_unhealthy_interval_while_unhealthy() -> None:
    down = state_after(F, F, F)
    assert (down.status, down.pending) == (HealthStatus.UNHEALTHY, None)
    assert base_interval(down, POLICY) == 30.0
    assert base_interval(down, replace(POLICY, unhealthy_interval=None)) == 10.0


def test_healthy_edge_while_going_up() -> None:
    rising = state_after(F, F, F, S)
    assert rising.pending == "healthy"
    assert base_interval(rising, POLICY) == 1.0
    # Without an edge interval, an unhealthy endpoint keeps its unhealthy interval.
    assert base_interval(rising, replace(POLICY, healthy_edge_interval=None)) == 30.0
    # Unknown endpoints heading up use the edge interval too.
    assert base_interval(state_after(S), POLICY) == 1.0


def test_unhealthy_edge_while_going_down() -> None:
    falling = state_after(S, S, S, F)
    assert (falling.status, falling.pending) == (HealthStatus.HEALTHY, "unhealthy")
    assert base_interval(falling, POLICY) == 2.0
    assert base_interval(falling, replace(POLICY, unhealthy_edge_interval=None)) == 10.0
    assert base_interval(state_after(F), POLICY) == 2.0


def test_settled_healthy_uses_interval() -> None:
    assert base_interval(state_after(S, S, S), POLICY) == 10.0
    assert base_interval(state_after(S, S, S, S), POLICY) == 10.0


def test_targets_skip_endpoints_without_a_policy() -> None:
    hc = HealthCheck(kind="tcp")
    topo = Topology(clusters=(
        Cluster("a", (Endpoint("10.0.0.1", 80, health_check=hc), Endpoint("10.0.0.2", 80))),
    ))  # fmt: skip
    assert targets(topo) == [Target("a", "10.0.0.1", 80, hc)]


# --------------------------------------------------------------------------- the Prober, scripted

FAST = HealthCheck(kind="http", interval=0.02, timeout=0.01, healthy_threshold=2, unhealthy_threshold=3)


def topology(policy: HealthCheck = FAST, *ports: int, cluster: str = "web") -> Topology:
    endpoints = tuple(Endpoint("127.0.0.1", p, health_check=policy) for p in ports or (1001,))
    return Topology(clusters=(Cluster(cluster, endpoints),))


class ScriptedChecker:
    """Answers each endpoint with its scripted kind (success by default); can hold checks at a gate."""

    def __init__(self) -> None:
        self.kinds: dict[EndpointId, ResultKind] = {}
        self.calls: list[EndpointId] = []
        self.released: list[Target] = []
        self.closed = 0
        self.gate: asyncio.Event | None = None
        self.delay = 0.0
        self.in_flight = 0
        self.max_in_flight = 0
        self.raise_for: set[EndpointId] = set()

    def count(self, key: EndpointId) -> int:
        return sum(1 for c in self.calls if c == key)

    async def check(self, target: Target) -> CheckResult:
        self.calls.append(target.id)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.gate is not None:
                await self.gate.wait()
            if self.delay:
                await asyncio.sleep(self.delay)
            if target.id in self.raise_for:
                raise RuntimeError("scripted checker bug")
            kind = self.kinds.get(target.id, ResultKind.SUCCESS)
            return CheckResult(kind, f"scripted {kind.value}", time=1.0, latency=0.001)
        finally:
            self.in_flight -= 1

    async def release(self, target: Target) -> None:
        self.released.append(target)

    async def aclose(self) -> None:
        self.closed += 1


@pytest.fixture
def scripted() -> ScriptedChecker:
    return ScriptedChecker()


@pytest.fixture
async def sink() -> AsyncIterator[QueueSink]:
    yield QueueSink()


def drain(sink: QueueSink) -> list[Verdict | ProbeEvent]:
    items = []
    while not sink.queue.empty():
        items.append(sink.queue.get_nowait())
    return items


def verdicts(items: Iterable[Verdict | ProbeEvent]) -> list[tuple[str, HealthStatus]]:
    return [(v.endpoint, v.status) for v in items if isinstance(v, Verdict)]


async def test_transitions_become_verdicts_and_events(scripted: ScriptedChecker, sink: QueueSink) -> None:
    key = ("web", "127.0.0.1:1001")
    async with Prober(topology(), checker=scripted, sink=sink, source="prober:test") as prober:
        await eventually(lambda: prober.endpoint(*key).status is HealthStatus.HEALTHY)  # type: ignore[union-attr]
        scripted.kinds[key] = ResultKind.TIMEOUT
        await eventually(lambda: prober.endpoint(*key).status is HealthStatus.UNHEALTHY)  # type: ignore[union-attr]
        await eventually(lambda: sink.queue.qsize() >= 4)
    items = drain(sink)
    assert verdicts(items) == [("127.0.0.1:1001", HealthStatus.HEALTHY), ("127.0.0.1:1001", HealthStatus.UNHEALTHY)]
    v = items[2]
    assert isinstance(v, Verdict)
    assert (v.cluster, v.reason, v.source, v.time) == ("web", "scripted timeout", "prober:test", 1.0)
    e = items[3]
    assert isinstance(e, ProbeEvent)
    assert (e.old, e.new, e.counters, e.check) == (
        HealthStatus.HEALTHY, HealthStatus.UNHEALTHY, Counters(timeouts=3), "http",
    )  # fmt: skip
    assert scripted.closed == 1


async def test_default_source_names_the_host(scripted: ScriptedChecker) -> None:
    prober = Prober(checker=scripted)
    assert prober.source.startswith("prober:") and len(prober.source) > len("prober:")
    await prober.aclose()


async def test_initial_status_is_announced_at_once(scripted: ScriptedChecker, sink: QueueSink) -> None:
    policy = replace(FAST, initial_status="unhealthy", interval=60.0, initial_jitter=60.0)
    prober = Prober(topology(policy), checker=scripted, sink=sink)
    assert [(v.status, v.reason) for v in prober.current_verdicts()] == [
        (HealthStatus.UNHEALTHY, "initial status UNHEALTHY")
    ]
    async with prober:
        await eventually(lambda: sink.queue.qsize() == 2)
    first = drain(sink)[0]
    assert isinstance(first, Verdict) and first.status is HealthStatus.UNHEALTHY
    assert scripted.calls == []  # the first check is still up to a minute away


async def test_current_verdicts_cover_every_endpoint(scripted: ScriptedChecker) -> None:
    async with Prober(topology(FAST, 1, 2, 3), checker=scripted, source="p") as prober:
        await eventually(lambda: all(v.status is HealthStatus.HEALTHY for v in prober.current_verdicts()))
        got = sorted((v.cluster, v.endpoint, v.source) for v in prober.current_verdicts())
    assert got == [("web", f"127.0.0.1:{p}", "p") for p in (1, 2, 3)]


def reports(prober: Prober) -> list[EndpointReport]:
    return [r for r in (prober.endpoint(*key) for key in prober.endpoints()) if r is not None]


async def test_update_topology_keeps_unchanged_endpoints(scripted: ScriptedChecker) -> None:
    slow = replace(FAST, interval=0.05)
    scripted.kinds[("web", "127.0.0.1:1")] = ResultKind.HTTP_FAILURE
    async with Prober(topology(slow, 1, 2, 3), checker=scripted) as prober:
        await eventually(lambda: all(r.status is not HealthStatus.UNKNOWN for r in reports(prober)))
        one = prober.endpoint("web", "127.0.0.1:1")
        two = prober.endpoint("web", "127.0.0.1:2")
        assert one is not None and two is not None
        # Endpoint 1 keeps its policy, 2 gets a new one, 3 goes away, 4 arrives.
        new = Topology(clusters=(Cluster("web", (
            Endpoint("127.0.0.1", 1, health_check=slow, weight=7),
            Endpoint("127.0.0.1", 2, health_check=replace(slow, unhealthy_threshold=5)),
            Endpoint("127.0.0.1", 4, health_check=slow),
        )),))  # fmt: skip
        change = prober.update_topology(new)
        assert change.kept == 1
        assert change.replaced == (("web", "127.0.0.1:2"),)
        assert change.removed == (("web", "127.0.0.1:3"),)
        assert change.added == (("web", "127.0.0.1:4"),)
        after_one = prober.endpoint("web", "127.0.0.1:1")
        after_two = prober.endpoint("web", "127.0.0.1:2")
        assert after_one is not None and after_two is not None
        assert after_one.checks >= one.checks and after_one.counters.http_failures >= 1
        # A policy change restarts the counters but keeps what we know about the endpoint.
        assert after_two.checks == 0 and after_two.counters == Counters()
        assert (after_two.status, after_two.since) == (HealthStatus.HEALTHY, two.since)
        assert after_two.target.health_check.unhealthy_threshold == 5
        assert prober.endpoint("web", "127.0.0.1:3") is None
        await eventually(lambda: {t.port for t in scripted.released} == {2, 3})
        calls_to_3 = scripted.count(("web", "127.0.0.1:3"))
        await eventually(lambda: scripted.count(("web", "127.0.0.1:4")) >= 2)
        assert scripted.count(("web", "127.0.0.1:3")) <= calls_to_3 + 1  # at most the one in flight


async def test_removed_while_in_flight_is_released_after_the_check(scripted: ScriptedChecker, sink: QueueSink) -> None:
    scripted.gate = asyncio.Event()
    scripted.kinds[("web", "127.0.0.1:1")] = ResultKind.TCP_FAILURE
    async with Prober(topology(replace(FAST, unhealthy_threshold=1)), checker=scripted, sink=sink) as prober:
        await eventually(lambda: scripted.in_flight == 1)
        prober.update_topology(Topology())
        await asyncio.sleep(0)
        assert scripted.released == []  # not while its check still runs
        scripted.gate.set()
        await eventually(lambda: len(scripted.released) == 1)
    assert drain(sink) == []  # the late result of a removed endpoint is not a verdict


async def test_concurrency_is_bounded(scripted: ScriptedChecker) -> None:
    scripted.delay = 0.03
    async with Prober(topology(FAST, *range(1, 21)), checker=scripted, max_concurrency=4) as prober:
        await eventually(lambda: len(scripted.calls) >= 40)
        assert prober.stats().in_flight <= 4
    assert scripted.max_in_flight == 4


async def test_scheduling_lag_is_recorded(scripted: ScriptedChecker) -> None:
    scripted.delay = 0.05
    # One slot, five endpoints due at once: the last starts about four checks late.
    async with Prober(topology(replace(FAST, interval=10.0), *range(1, 6)), checker=scripted, max_concurrency=1) as p:
        await eventually(lambda: p.stats().checks_started == 5)
        stats = p.stats()
    assert stats.lag_max >= 0.19
    assert stats.lag_p50 >= 0.09
    assert stats.lag_window == 5 and stats.endpoints == 5


async def test_edge_interval_speeds_up_detection(scripted: ScriptedChecker) -> None:
    key = ("web", "127.0.0.1:1")
    policy = replace(FAST, interval=30.0, unhealthy_edge_interval=0.01, initial_status="healthy")
    scripted.kinds[key] = ResultKind.HTTP_FAILURE
    async with Prober(topology(policy, 1), checker=scripted) as prober:
        # Three failures at the edge interval, not at the 30 s interval.
        await eventually(lambda: prober.endpoint(*key).status is HealthStatus.UNHEALTHY, within=2)  # type: ignore[union-attr]
        report = prober.endpoint(*key)
        assert report is not None and report.pending is None and report.next_check is not None
        assert report.next_check - asyncio.get_running_loop().time() > 20  # back to the long interval


async def test_checker_errors_and_sink_errors_do_not_stop_the_prober(scripted: ScriptedChecker) -> None:
    class Broken(NullSink):
        async def on_verdict(self, verdict: Verdict) -> None:
            raise RuntimeError("sink bug")

    scripted.raise_for.add(("web", "127.0.0.1:1"))
    async with Prober(topology(FAST, 1, 2), checker=scripted, sink=Broken()) as prober:
        await eventually(lambda: scripted.count(("web", "127.0.0.1:1")) >= 3)
        await eventually(lambda: prober.endpoint("web", "127.0.0.1:2").status is HealthStatus.HEALTHY)  # type: ignore[union-attr]
        report = prober.endpoint("web", "127.0.0.1:1")
        assert report is not None and report.checks == 0 and report.status is HealthStatus.UNKNOWN


async def test_event_log_is_json_lines(scripted: ScriptedChecker, tmp_path: Path) -> None:
    path = tmp_path / "logs" / "probe.jsonl"
    key = ("web", "127.0.0.1:1001")
    async with Prober(topology(), checker=scripted, event_log=path, source="p1") as prober:
        await eventually(lambda: prober.endpoint(*key).status is HealthStatus.HEALTHY)  # type: ignore[union-attr]
        scripted.kinds[key] = ResultKind.HTTP_FAILURE
        await eventually(lambda: prober.endpoint(*key).status is HealthStatus.UNHEALTHY)  # type: ignore[union-attr]
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(x["old"], x["new"]) for x in lines] == [("UNKNOWN", "HEALTHY"), ("HEALTHY", "UNHEALTHY")]
    assert lines[1]["counters"] == {"successes": 0, "http_failures": 3, "tcp_failures": 0, "timeouts": 0}
    assert lines[1]["reason"] == "scripted http_failure"
    assert (lines[1]["cluster"], lines[1]["endpoint"], lines[1]["source"]) == ("web", "127.0.0.1:1001", "p1")
    assert lines[1]["latency_ms"] == 1.0


async def test_lifecycle(scripted: ScriptedChecker) -> None:
    prober = Prober(topology(), checker=scripted)
    assert not prober.running
    await prober.start()
    await prober.start()  # idempotent
    assert prober.running
    await prober.aclose()
    await prober.aclose()  # idempotent
    assert not prober.running and scripted.closed == 1
    with pytest.raises(RuntimeError):
        await prober.start()
    with pytest.raises(RuntimeError):
        prober.update_topology(topology())
    with pytest.raises(ValueError):
        Prober(max_concurrency=0)


async def test_closing_an_unstarted_prober(scripted: ScriptedChecker) -> None:
    prober = Prober(topology(), checker=scripted)
    await prober.aclose()
    assert scripted.calls == []


async def test_ten_thousand_endpoints_use_one_loop(scripted: ScriptedChecker) -> None:
    policy = replace(FAST, interval=1.0, initial_jitter=0.5, interval_jitter_percent=10)
    topo = Topology(clusters=tuple(
        Cluster(f"c{c}", tuple(Endpoint("10.0.0.1", 1000 + p, health_check=policy) for p in range(1000)))
        for c in range(10)
    ))  # fmt: skip
    before = len(asyncio.all_tasks())
    async with Prober(topo, checker=scripted, rng=random.Random(5)) as prober:
        assert len(prober.current_verdicts()) == 10_000
        await eventually(lambda: len(set(scripted.calls)) == 10_000, within=10)
        # Between checks, endpoints are heap entries, not tasks: only the loop and delivery run.
        await eventually(lambda: prober.stats().in_flight == 0 and len(asyncio.all_tasks()) - before <= 3)
        stats = prober.stats()
    assert stats.endpoints == 10_000 and stats.checks_started >= 10_000

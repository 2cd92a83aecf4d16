"""`healthplane lab scenario`: the seed's experiment, measured, with an exit status.

Steady traffic through the front proxy; one backend's /livez starts failing (the app still
serves `/`); later it recovers. The timeline says when the prober decided, when each Envoy ACKed
the new EDS version, when the last request reached the failed backend and when traffic came back.
Steps that must hold (exit status 0 only if all do):

- every backend answers through the front proxy before the failure;
- the failed backend stops receiving requests within unhealthy_threshold x interval + timeout + slack;
- (central) every Envoy ACKs the EDS version that takes it out;
- it receives requests again within healthy_threshold x interval + timeout + slack of recovering;
- no request fails: the failing backend still answers `/`, so leaving the rotation costs nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import random
import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import aiohttp

from controlplane.errors import ConfigError
from controlplane.snapshots.snapshot import version_key
from controlplane.topology.durations import format_duration
from lab.run import Interrupted, Lab, run_until_signal
from lab.topology import WEB_CLUSTER, HealthCheckSpec, Mode, config_from_args

__all__ = [
    "Sample",
    "ScenarioResult",
    "Step",
    "TimelineEntry",
    "Traffic",
    "format_result",
    "run_scenario",
    "scenario_command",
]

_SERVER_NAME = re.compile(r"ServerName: ([^,\s]+)")
# How often the front proxies' view of cluster `web` is polled (their admin /stats).
_FRONT_POLL = 0.1
# How often the control plane's /snapshot and /nodes are polled while a change propagates.
_CONTROLPLANE_POLL = 0.05
# Timeline lines per kind before they are summarized as first/last.
_MAX_LINES_PER_KIND = 4


# ----------------------------------------------------------------------------- traffic


@dataclass(frozen=True, slots=True)
class Sample:
    """One request: when it was sent (time.time()), what came back, from which backend."""

    sent: float
    latency: float
    status: int  # 0: no answer (error says why)
    server: str | None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.server is not None


class Traffic:
    """Open-loop load: `rate` requests a second to `url`, each on a new connection, until aclose()."""

    def __init__(self, url: str, rate: float, *, timeout: float = 2.0) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.url = url
        self.rate = rate
        self.timeout = timeout
        self.samples: list[Sample] = []
        self.started: float | None = None
        self.stopped: float | None = None
        self._last_ok: dict[str, float] = {}
        self._session: aiohttp.ClientSession | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._in_flight: set[asyncio.Task[None]] = set()
        self._closed = False

    async def start(self) -> None:
        if self._session is not None or self._closed:
            raise RuntimeError("Traffic.start() can be called only once")
        # A new connection per request: several front proxies share one listener port
        # (SO_REUSEPORT), and the kernel spreads connections, not requests, over them.
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(force_close=True, limit=0),
            timeout=aiohttp.ClientTimeout(total=self.timeout),
        )
        self.started = time.time()
        self._ticker = asyncio.create_task(self._tick(), name="traffic")

    async def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        for i in itertools.count():
            # Paced from the start, not from the previous send: a late tick does not slow the rate.
            delay = t0 + i / self.rate - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(self._one())
            self._in_flight.add(task)
            task.add_done_callback(self._in_flight.discard)

    async def _one(self) -> None:
        assert self._session is not None
        sent = time.time()
        began = time.monotonic()
        try:
            async with self._session.get(self.url) as resp:
                body = await resp.text()
                status = resp.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            sample = Sample(sent, time.monotonic() - began, 0, None, f"{type(exc).__name__}: {exc}")
        else:
            match = _SERVER_NAME.search(body)
            server = match.group(1) if match else None
            sample = Sample(sent, time.monotonic() - began, status, server)
            if sample.ok and server is not None and sent > self._last_ok.get(server, 0.0):
                self._last_ok[server] = sent
        self.samples.append(sample)

    def last_seen(self, server: str) -> float | None:
        """When the latest request answered by `server` was sent (of those answered so far)."""
        return self._last_ok.get(server)

    def answered_by(self, server: str, *, since: float, until: float = float("inf")) -> list[Sample]:
        """Successful requests sent in [since, until) that `server` answered, oldest first."""
        return sorted(
            (s for s in self.samples if s.ok and s.server == server and since <= s.sent < until),
            key=lambda s: s.sent,
        )

    async def aclose(self) -> None:
        """Stop sending and wait for the requests in flight (each bounded by `timeout`)."""
        if self._closed:
            return
        self._closed = True
        if self._ticker is not None:
            self._ticker.cancel()
            await asyncio.gather(self._ticker, return_exceptions=True)
        self.stopped = time.time()
        if self._in_flight:
            await asyncio.gather(*self._in_flight, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()


# ----------------------------------------------------------------------------- result


@dataclass(frozen=True, slots=True)
class Step:
    """Something the scenario requires, and whether it held."""

    description: str
    held: bool


@dataclass(frozen=True, slots=True)
class TimelineEntry:
    at: float  # time.time()
    text: str


@dataclass
class ScenarioResult:
    """Everything a scenario run measured; times are time.time() seconds."""

    mode: Mode
    front_proxies: int
    netns: bool
    health_check: HealthCheckSpec
    rate: float
    victim: str
    slack: float
    failed_at: float
    recovered_at: float
    traffic_started: float
    traffic_stopped: float
    requests: int
    failed: int
    answered_by: dict[str, int]
    health_checks_per_second: dict[str, float]
    last_to_victim: float | None
    first_after_recovery: float | None
    # When each front proxy dropped the failed backend, and took it back (polled).
    front_exclusion: dict[str, float] = field(default_factory=dict)
    front_readmission: dict[str, float] = field(default_factory=dict)
    timeline: list[TimelineEntry] = field(default_factory=list)
    steps: list[Step] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)  # a few failed requests, for the report

    @property
    def ok(self) -> bool:
        return all(s.held for s in self.steps)

    @property
    def detection(self) -> float:
        """Seconds from the failure to the last request that reached the failed backend."""
        return 0.0 if self.last_to_victim is None else self.last_to_victim - self.failed_at

    @property
    def recovery(self) -> float | None:
        """Seconds from the recovery to the first request that reached the backend again."""
        return None if self.first_after_recovery is None else self.first_after_recovery - self.recovered_at

    @property
    def exclusion_spread(self) -> float | None:
        """Seconds between the first and the last front proxy dropping the failed backend."""
        return self._spread(self.front_exclusion)

    @property
    def readmission_spread(self) -> float | None:
        """Seconds between the first and the last front proxy taking it back."""
        return self._spread(self.front_readmission)

    def _spread(self, times: dict[str, float]) -> float | None:
        # Only meaningful when every one of several front proxies was seen to change.
        if self.front_proxies < 2 or len(times) < self.front_proxies:
            return None
        return max(times.values()) - min(times.values())

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["mode"] = self.mode.value
        doc["ok"] = self.ok
        doc["detection"] = self.detection
        doc["recovery"] = self.recovery
        doc["exclusion_spread"] = self.exclusion_spread
        doc["readmission_spread"] = self.readmission_spread
        return doc


# ----------------------------------------------------------------------------- watching


@dataclass
class _Propagation:
    """A prober verdict and the EDS version carrying it, as ACKed by each node (central mode)."""

    verdict_at: float | None = None
    verdict: str = ""
    version: str | None = None
    acks: dict[str, float] = field(default_factory=dict)
    nodes: int = 0

    @property
    def complete(self) -> bool:
        return self.version is not None and self.nodes > 0 and len(self.acks) == self.nodes


async def _poll(probe: Callable[[], Awaitable[bool] | bool], deadline: float, interval: float) -> bool:
    """Call (and await) `probe` until it holds (True) or time.time() passes `deadline` (False)."""
    while True:
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            held = probe()
            if held if isinstance(held, bool) else await held:
                return True
        if time.time() >= deadline:
            return False
        await asyncio.sleep(interval)


async def _watch_propagation(lab: Lab, endpoint: str, status: str, since: float, deadline: float) -> _Propagation:
    """Poll /snapshot until `endpoint` is `status`, then /nodes until every node ACKed that EDS version."""
    result = _Propagation()

    async def verdict() -> bool:
        snap = await lab.controlplane_get("/snapshot")
        web = next(c for c in snap["clusters"] if c["name"] == WEB_CLUSTER)
        ep = next(e for e in web["endpoints"] if f"{e['address']}:{e['port']}" == endpoint)
        if ep["status"] != status:
            return False
        # The version at which cluster web's ClusterLoadAssignment last changed: this verdict.
        result.version = str(web["version"])
        return True

    if not await _poll(verdict, deadline, _CONTROLPLANE_POLL):
        return result
    assert result.version is not None
    wanted = version_key(result.version)

    async def acked() -> bool:
        doc = await lab.controlplane_get("/nodes")
        result.nodes = len(doc["nodes"])
        for node in doc["nodes"]:
            eds = node["types"].get("eds", {})
            if eds.get("version_acked") and version_key(eds["version_acked"]) >= wanted:
                # Recorded once: a later version would move acked_at past this one's ACK.
                result.acks.setdefault(node["id"], float(eds["acked_at"]))
        return result.nodes > 0 and len(result.acks) == result.nodes

    await _poll(acked, deadline, _CONTROLPLANE_POLL)
    events = (await lab.controlplane_get("/events?kind=probe&limit=1000"))["events"]
    for event in events:
        if (
            event.get("endpoint") == endpoint
            and event["time"] >= since
            and event["message"].endswith(f"-> {status} ({event.get('reason', '')})")
        ):
            result.verdict_at = float(event["time"])
            result.verdict = event["message"]
            break
    return result


async def _watch_fronts(lab: Lab, healthy: int, deadline: float) -> dict[str, float]:
    """When each front proxy's cluster web first had `healthy` healthy hosts (polled)."""
    seen: dict[str, float] = {}
    names = [f.name for f in lab.fronts]

    async def probe() -> bool:
        counts = await lab.front_healthy()
        now = time.time()
        for name, count in zip(names, counts, strict=True):
            if count == healthy:
                seen.setdefault(name, now)
        return len(seen) == len(names)

    await _poll(probe, deadline, _FRONT_POLL)
    return seen


# ----------------------------------------------------------------------------- the scenario


async def run_scenario(
    lab: Lab,
    *,
    rate: float = 200.0,
    victim: str = "webserver01",
    slack: float = 1.0,
    steady: float | None = None,
) -> ScenarioResult:
    """Fail `victim`'s /livez under steady traffic, then recover it; measure and judge every step.

    `steady`: seconds of traffic before the failure (plus a random part of one interval) and
    after the recovery (default: 2 intervals, at least 1 s)."""
    config = lab.config
    hc = config.health_check
    layout = lab.layout
    target = layout.backend(victim)
    names = [b.name for b in layout.backends]
    steady = max(1.0, 2 * hc.interval) if steady is None else steady
    detection_bound = hc.detection_bound(slack)
    recovery_bound = hc.recovery_bound(slack)
    # No request to the victim for this long (after the failure) means it is out of rotation.
    quiet = max(0.5, hc.interval)
    steps: list[Step] = []
    timeline: list[TimelineEntry] = []
    central = config.mode is Mode.CENTRAL

    await lab.wait_healthy()
    before = await lab.counters()
    counted_from = time.time()
    async with Traffic(layout.front_url, rate) as traffic:
        assert traffic.started is not None
        all_serving = await _poll(
            lambda: all(traffic.last_seen(n) for n in names), time.time() + max(5.0, 3 * hc.interval), 0.02
        )
        steps.append(Step("every backend answered through the front proxy before the failure", all_serving))
        # Steady traffic first; then fail at a random point of the check interval, as a real
        # failure would (right after `wait_healthy` it would always land just after a check).
        await asyncio.sleep(max(0.0, traffic.started + steady + random.uniform(0, hc.interval) - time.time()))

        # -- failure
        failed_at = await lab.set_livez(victim, "FAIL")
        watch_deadline = failed_at + detection_bound + quiet
        out = await _observe(
            lab, target.endpoint, "UNHEALTHY", len(names) - 1, failed_at, watch_deadline, central,
            until=lambda: time.time() - max(traffic.last_seen(victim) or 0.0, failed_at) >= quiet,
        )  # fmt: skip
        prop_down, fronts_down, excluded = out

        # -- recovery, again at a random point of the interval (the wait above ends in step
        # with the check that took the backend out)
        await asyncio.sleep(random.uniform(0, hc.interval))
        recovered_at = await lab.set_livez(victim, "OK")
        back_deadline = recovered_at + recovery_bound
        prop_up, fronts_up, came_back = await _observe(
            lab, target.endpoint, "HEALTHY", len(names), recovered_at, back_deadline + quiet, central,
            until=lambda: (traffic.last_seen(victim) or 0.0) > recovered_at,
        )  # fmt: skip
        await asyncio.sleep(steady)  # steady traffic again, over all three
    after = await lab.counters()
    counted_until = time.time()
    assert traffic.stopped is not None

    # -- judging, from the complete set of samples
    samples = traffic.samples
    out_window = traffic.answered_by(victim, since=failed_at, until=recovered_at)
    last_to_victim = out_window[-1].sent if out_window else None
    back = traffic.answered_by(victim, since=recovered_at)
    first_back = back[0].sent if back else None
    failed = [s for s in samples if not s.ok]
    detection = 0.0 if last_to_victim is None else last_to_victim - failed_at
    bound_text = f"bound {detection_bound:.2f}s = {_bound_text(hc.unhealthy_threshold, hc, slack)}"
    if excluded:
        text = f"{victim} stopped receiving requests {detection:.2f}s after its /livez failed ({bound_text})"
    else:
        text = f"{victim} kept receiving requests after its /livez failed, {detection:.2f}s at least ({bound_text})"
    steps.append(Step(text, excluded and detection <= detection_bound))
    if central:
        steps.append(
            Step(
                f"every Envoy ACKed the EDS version that took {victim} out "
                f"({len(prop_down.acks)} of {prop_down.nodes} nodes, version {prop_down.version})",
                prop_down.complete,
            )
        )
    recovery = None if first_back is None else first_back - recovered_at
    steps.append(
        Step(
            f"{victim} received requests again "
            + ("never" if recovery is None else f"{recovery:.2f}s")
            + f" after its /livez recovered (bound {recovery_bound:.2f}s = "
            f"{_bound_text(hc.healthy_threshold, hc, slack)})",
            came_back and recovery is not None and recovery <= recovery_bound,
        )
    )
    steps.append(Step(f"no failed requests ({len(failed)} of {len(samples)})", not failed))

    answered = Counter(s.server for s in samples if s.ok and s.server is not None)
    span = max(counted_until - counted_from, 1e-9)
    per_second = {n: (after[n].health_checks - before[n].health_checks) / span for n in names}

    # -- timeline
    t = timeline.append
    t(TimelineEntry(traffic.started, f"traffic starts: {rate:g} requests/s through {_fronts(config.front_proxies)}"))
    t(TimelineEntry(failed_at, f"{victim} /livez -> FAIL (it still answers /)"))
    _propagation_lines(timeline, prop_down)
    _front_lines(timeline, fronts_down, f"dropped {victim}", len(names) - 1, len(names))
    if last_to_victim is not None:
        t(TimelineEntry(last_to_victim, f"last request answered by {victim}"))
    t(TimelineEntry(recovered_at, f"{victim} /livez -> OK"))
    _propagation_lines(timeline, prop_up)
    _front_lines(timeline, fronts_up, f"took {victim} back", len(names), len(names))
    if first_back is not None:
        t(TimelineEntry(first_back, f"first request answered by {victim} again"))
    t(TimelineEntry(traffic.stopped, f"traffic stops: {len(samples)} requests sent"))
    timeline.sort(key=lambda e: e.at)

    return ScenarioResult(
        mode=config.mode,
        front_proxies=config.front_proxies,
        netns=config.netns,
        health_check=hc,
        rate=rate,
        victim=victim,
        slack=slack,
        failed_at=failed_at,
        recovered_at=recovered_at,
        traffic_started=traffic.started,
        traffic_stopped=traffic.stopped,
        requests=len(samples),
        failed=len(failed),
        answered_by={n: answered.get(n, 0) for n in names},
        health_checks_per_second=per_second,
        last_to_victim=last_to_victim,
        first_after_recovery=first_back,
        front_exclusion=fronts_down,
        front_readmission=fronts_up,
        timeline=timeline,
        steps=steps,
        failures=[f"{s.status or s.error} at {s.sent - failed_at:+.3f}s" for s in failed[:5]],
    )


async def _observe(
    lab: Lab,
    endpoint: str,
    status: str,
    front_healthy: int,
    since: float,
    deadline: float,
    central: bool,
    *,
    until: Callable[[], bool],
) -> tuple[_Propagation, dict[str, float], bool]:
    """Watch one change propagate (control plane, front proxies) while waiting for `until` to hold."""
    propagation = asyncio.create_task(_watch_propagation(lab, endpoint, status, since, deadline)) if central else None
    fronts = asyncio.create_task(_watch_fronts(lab, front_healthy, deadline))
    try:
        held = await _poll(until, deadline, 0.02)
        prop = await propagation if propagation is not None else _Propagation()
        return prop, await fronts, held
    finally:
        for task in (propagation, fronts):
            if task is not None and not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)


def _bound_text(threshold: int, hc: HealthCheckSpec, slack: float) -> str:
    return (
        f"{threshold} x {format_duration(hc.interval)} + {format_duration(hc.timeout)} timeout "
        f"+ {format_duration(slack)} slack"
    )


def _fronts(n: int) -> str:
    return "the front proxy" if n == 1 else f"{n} front proxies"


def _propagation_lines(timeline: list[TimelineEntry], prop: _Propagation) -> None:
    if prop.verdict_at is not None:
        timeline.append(TimelineEntry(prop.verdict_at, f"prober: {prop.verdict}; EDS version {prop.version}"))
    if not prop.acks:
        return
    acks = sorted(prop.acks.items(), key=lambda kv: kv[1])
    if len(acks) <= _MAX_LINES_PER_KIND:
        for node, at in acks:
            timeline.append(TimelineEntry(at, f"{node} ACKed EDS {prop.version}"))
    else:
        n = len(acks)
        timeline.append(TimelineEntry(acks[0][1], f"{acks[0][0]} ACKed EDS {prop.version}, first of {n} Envoys"))
        timeline.append(TimelineEntry(acks[-1][1], f"{acks[-1][0]} ACKed EDS {prop.version}, last of {n} Envoys"))


def _front_lines(timeline: list[TimelineEntry], seen: dict[str, float], what: str, healthy: int, total: int) -> None:
    rows = sorted(seen.items(), key=lambda kv: kv[1])
    note = f"({healthy}/{total} healthy in cluster web; polled every {int(_FRONT_POLL * 1000)}ms)"
    if len(rows) <= _MAX_LINES_PER_KIND:
        for name, at in rows:
            timeline.append(TimelineEntry(at, f"{name} {what} {note}"))
    else:
        n = len(rows)
        timeline.append(TimelineEntry(rows[0][1], f"{rows[0][0]} {what}, first of {n} front proxies {note}"))
        timeline.append(TimelineEntry(rows[-1][1], f"{rows[-1][0]} {what}, last of {n} front proxies"))


# ----------------------------------------------------------------------------- output


def format_result(result: ScenarioResult) -> str:
    """The timeline, the counts and the steps, for a terminal."""
    hc = result.health_check
    where = "network namespaces" if result.netns else "loopback"
    lines = [
        f"healthplane lab scenario: {result.mode.title}, {_fronts(result.front_proxies)}, "
        f"3 backends ({where}), {result.rate:g} requests/s; {hc.describe()}",
        "",
        "timeline (seconds from the failure)",
    ]
    for entry in result.timeline:
        lines.append(f"  {entry.at - result.failed_at:+8.3f}  {entry.text}")
    answered = ", ".join(f"{n} {c}" for n, c in result.answered_by.items())
    checks = ", ".join(f"{n} {v:.1f}" for n, v in result.health_checks_per_second.items())
    lines += [
        "",
        "counts",
        f"  requests sent {result.requests}, failed {result.failed}",
        f"  answered by {answered}",
        f"  {hc.path} checks received per second: {checks}",
    ]
    if result.failures:
        lines.append(f"  first failures: {'; '.join(result.failures)}")
    lines += ["", "steps"]
    lines += [f"  [{'ok' if s.held else 'FAILED'}] {s.description}" for s in result.steps]
    lines.append("")
    lines.append("every step held" if result.ok else "some steps did not hold")
    return "\n".join(lines)


def scenario_command(args: argparse.Namespace) -> int:
    """`healthplane lab scenario`: exit 0 when every step held, 1 when one did not."""
    config = config_from_args(args)
    if args.rate <= 0:
        raise ConfigError("must be positive", path="--rate")

    async def main() -> ScenarioResult:
        async with Lab(config) as lab:
            return await run_scenario(lab, rate=args.rate, victim=args.fail, slack=args.slack)

    try:
        result = asyncio.run(run_until_signal(main()))
    except Interrupted:
        return 130
    print(format_result(result), flush=True)
    if args.json is not None:
        write_json(args.json, [result])
    return 0 if result.ok else 1


def write_json(path: Path, results: Sequence[ScenarioResult]) -> None:
    path.write_text(json.dumps([r.to_json() for r in results], indent=1) + "\n")

"""The prober's end of the link to the control plane (protos/healthplane/v1/prober.proto).

`ControlPlaneLink` keeps one `Report` stream open, reconnecting with exponential backoff and
full jitter. On every (re)connection it says hello, sends the prober's full current state, then
forwards verdicts and events as they happen. The control plane sends the clusters to check; each
topology message is loaded with the same validator as the topology file and handed to the
prober, so an edit reaches the prober without a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections import deque
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import Any, Protocol

import grpc

from controlplane.errors import ConfigError
from controlplane.health.store import EndpointId, Verdict
from controlplane.topology.model import Topology
from controlplane.topology.parse import parse_topology
from healthplane.v1 import prober_pb2, prober_pb2_grpc
from prober.events import ProbeEvent
from prober.scheduler import EndpointReport, TopologyChange


class ProbedEndpoints(Protocol):
    """What the link needs from a prober: a `Prober`, or a `ShardedProber` across processes."""

    def update_topology(self, topology: Topology) -> TopologyChange: ...

    def current_verdicts(self) -> list[Verdict]: ...

    def endpoints(self) -> Iterable[EndpointId]: ...

    def endpoint(self, cluster: str, endpoint: str) -> EndpointReport | None: ...


log = logging.getLogger("healthplane.prober.link")

VERSION = "0.1.0"


def _timestamp(seconds: float) -> Any:
    from google.protobuf.timestamp_pb2 import Timestamp

    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def verdict_message(v: Verdict) -> prober_pb2.Verdict:
    return prober_pb2.Verdict(
        cluster=v.cluster, endpoint=v.endpoint, status=v.status.name, reason=v.reason, time=_timestamp(v.time)
    )


def event_message(e: ProbeEvent) -> prober_pb2.ProbeEvent:
    c = e.counters
    return prober_pb2.ProbeEvent(
        cluster=e.cluster,
        endpoint=e.endpoint,
        old_status=e.old.name,
        new_status=e.new.name,
        reason=e.reason,
        counters=prober_pb2.Counters(
            successes=c.successes, http_failures=c.http_failures, tcp_failures=c.tcp_failures, timeouts=c.timeouts
        ),
        time=_timestamp(e.time),
    )


def check_state_message(report: EndpointReport) -> prober_pb2.CheckState:
    """One endpoint's policy, counters and last result, for the control plane's /endpoints."""
    hc = report.target.health_check
    c = report.counters
    last = report.last_result
    message = prober_pb2.CheckState(
        cluster=report.target.cluster,
        endpoint=report.target.endpoint,
        check=hc.kind,
        rise=hc.healthy_threshold,
        fall=hc.unhealthy_threshold,
        counters=prober_pb2.Counters(
            successes=c.successes, http_failures=c.http_failures, tcp_failures=c.tcp_failures, timeouts=c.timeouts
        ),
        checks=report.checks,
    )
    if last is not None:
        message.last_result = last.kind.value
        message.last_reason = last.reason
        message.last_time.CopyFrom(_timestamp(last.time))
        message.last_latency_seconds = last.latency
    return message


def backoff_delays(base: float, cap: float, rng: random.Random) -> Iterator[float]:
    """Exponential backoff with full jitter: uniform(0, min(cap, base * 2**attempt))."""
    attempt = 0
    while True:
        yield rng.uniform(0, min(cap, base * 2**attempt))
        attempt += 1


class ControlPlaneLink:
    """Streams a prober's verdicts to a control plane and its topology back; a `ProberSink`."""

    def __init__(
        self,
        target: str,
        prober: ProbedEndpoints | None = None,
        *,
        prober_id: str,
        backoff_base: float = 0.2,
        backoff_cap: float = 10.0,
        max_pending_events: int = 10_000,
        rng: random.Random | None = None,
        check_report_interval: float = 1.0,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        self.target = target
        # TLS (mutual when it holds a client certificate): controlplane.security.channel_credentials.
        self.credentials = credentials
        self.prober = prober
        self.prober_id = prober_id
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self._rng = rng or random.Random()
        self._outbox: asyncio.Queue[prober_pb2.ProberMessage | None] | None = None
        self._events: deque[ProbeEvent] = deque(maxlen=max_pending_events)
        self._verdicts: dict[tuple[str, str], Verdict] = {}
        self._flush = asyncio.Event()
        self.connected = asyncio.Event()
        self.connections = 0
        self.topology_version = ""
        self.check_report_interval = check_report_interval
        self._checks_sent: dict[tuple[str, str], tuple[int, float | None]] = {}

    def _prober(self) -> ProbedEndpoints:
        if self.prober is None:
            raise RuntimeError("ControlPlaneLink.prober is not set")
        return self.prober

    # ------------------------------------------------------------------ ProberSink

    async def on_verdict(self, verdict: Verdict) -> None:
        self._verdicts[verdict.id] = verdict  # only the latest per endpoint matters
        self._flush.set()

    async def on_event(self, event: ProbeEvent) -> None:
        self._events.append(event)
        self._flush.set()

    # ------------------------------------------------------------------ connection

    async def run(self) -> None:
        """Stay connected until cancelled. `prober` must be set (it takes this link as its sink)."""
        if self.prober is None:
            raise RuntimeError("ControlPlaneLink.prober is not set")
        delays = backoff_delays(self.backoff_base, self.backoff_cap, self._rng)
        while True:
            started = time.monotonic()
            try:
                await self._connect_once()
            except grpc.aio.AioRpcError as exc:
                log.warning("link to %s: %s %s", self.target, exc.code().name, exc.details())
            finally:
                self.connected.clear()
            if time.monotonic() - started > self.backoff_cap:  # it was up for a while: start over
                delays = backoff_delays(self.backoff_base, self.backoff_cap, self._rng)
            await asyncio.sleep(next(delays))

    async def _connect_once(self) -> None:
        channel_cm = (
            grpc.aio.insecure_channel(self.target)
            if self.credentials is None
            else grpc.aio.secure_channel(self.target, self.credentials)
        )
        async with channel_cm as channel:
            outbox: asyncio.Queue[prober_pb2.ProberMessage | None] = asyncio.Queue()
            call = prober_pb2_grpc.ProberLinkStub(channel).Report(self._requests(outbox))
            hello = prober_pb2.Hello(prober_id=self.prober_id, version=VERSION)
            await outbox.put(prober_pb2.ProberMessage(hello=hello))
            # Whatever was pending is superseded by the full state sent first.
            self._verdicts.clear()
            self._checks_sent.clear()
            await outbox.put(
                prober_pb2.ProberMessage(
                    verdicts=prober_pb2.VerdictBatch(
                        full_state=True,
                        verdicts=[verdict_message(v) for v in self._prober().current_verdicts()],
                        events=[event_message(e) for e in self._drain_events()],
                        checks=self._changed_checks(),
                    )
                )
            )
            self.connections += 1
            self.connected.set()
            log.info("connected to control plane %s", self.target)
            sender = asyncio.create_task(self._send_changes(outbox))
            checks = asyncio.create_task(self._send_checks(outbox))
            try:
                while (message := await call.read()) is not grpc.aio.EOF:
                    self._apply(message)
            finally:
                for task in (sender, checks):
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
                await outbox.put(None)

    @staticmethod
    async def _requests(
        outbox: asyncio.Queue[prober_pb2.ProberMessage | None],
    ) -> AsyncIterator[prober_pb2.ProberMessage]:
        while (message := await outbox.get()) is not None:
            yield message

    def _drain_events(self) -> list[ProbeEvent]:
        events = list(self._events)
        self._events.clear()
        return events

    async def _send_changes(self, outbox: asyncio.Queue[prober_pb2.ProberMessage | None]) -> None:
        while True:
            await self._flush.wait()
            self._flush.clear()
            verdicts = list(self._verdicts.values())
            self._verdicts.clear()
            events = self._drain_events()
            if verdicts or events:
                await outbox.put(
                    prober_pb2.ProberMessage(
                        verdicts=prober_pb2.VerdictBatch(
                            verdicts=[verdict_message(v) for v in verdicts], events=[event_message(e) for e in events]
                        )
                    )
                )

    def _changed_checks(self) -> list[prober_pb2.CheckState]:
        """Check states of the endpoints checked since they were last sent on this connection."""
        prober = self._prober()
        out = []
        for key in list(prober.endpoints()):
            report = prober.endpoint(*key)
            if report is None:
                continue
            mark = (report.checks, report.last_result.time if report.last_result else None)
            if self._checks_sent.get(key) != mark:
                self._checks_sent[key] = mark
                out.append(check_state_message(report))
        return out

    async def _send_checks(self, outbox: asyncio.Queue[prober_pb2.ProberMessage | None]) -> None:
        while True:
            await asyncio.sleep(self.check_report_interval)
            changed = self._changed_checks()
            if changed:
                await outbox.put(prober_pb2.ProberMessage(verdicts=prober_pb2.VerdictBatch(checks=changed)))

    def _apply(self, message: prober_pb2.ControlPlaneMessage) -> None:
        if message.WhichOneof("message") != "topology":
            return
        try:
            document = json.loads(message.topology.clusters_json)
            topology = parse_topology(document, source=f"control plane {self.target}")
        except (ValueError, ConfigError) as exc:
            # The control plane validated it; a failure here means mismatched versions. Keep checking
            # what we have rather than stopping.
            log.error("topology %s from the control plane rejected: %s", message.topology.version, exc)
            return
        change = self._prober().update_topology(topology)
        self.topology_version = message.topology.version
        log.info("topology %s: %s", message.topology.version, change)

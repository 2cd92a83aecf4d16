"""The control plane's end of the prober link (protos/healthplane/v1/prober.proto).

Probers connect to the xDS port's gRPC server, say Hello, send their full state, then changes.
The control plane sends each prober the clusters to check, and again after every topology edit.
Verdicts become `Verdict`s handed to a `VerdictSink` (the control plane batches and admits them
like every other verdict); when a prober goes away its verdicts stay (the control plane says
how old they are) rather than being guessed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from controlplane.errors import LimitExceeded, ProtocolError
from controlplane.events import EventSink
from controlplane.health.checks import CheckInfo
from controlplane.health.store import HealthStatus, Verdict
from controlplane.snapshots.cache import SnapshotSource
from controlplane.topology.model import Topology
from controlplane.topology.security import TlsFiles
from controlplane.xds.limits import PeerStreams
from controlplane.xds.tls import certificate_names
from healthplane.v1 import prober_pb2

log = logging.getLogger("healthplane.prober_link")

MAX_BATCH = 100_000
# Probe events recorded one by one per batch; past it, one event says how many more there were
# (50,000 events in one batch were 50,000 log lines, 0.85 s with the loop held).
MAX_EVENTS_PER_BATCH = 100
# A verdict's time is clamped to [now - MAX_VERDICT_AGE, now]: a prober's clock (or a hostile
# link client) dating a verdict in the future or in 1970 would skew its age in /endpoints, the
# cause time of the version it makes, and the propagation figures measured from that.
MAX_VERDICT_AGE = 86_400.0


@dataclass(slots=True)
class ProberRecord:
    """A prober as the control plane knows it."""

    prober_id: str
    peer: str
    version: str
    connected_at: float
    disconnected_at: float | None = None
    last_message_at: float | None = None
    full_state_at: float | None = None
    verdicts: int = 0

    @property
    def connected(self) -> bool:
        return self.disconnected_at is None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.prober_id,
            "peer": self.peer,
            "version": self.version,
            "connected": self.connected,
            "connected_at": self.connected_at,
            "disconnected_at": self.disconnected_at,
            "last_message_at": self.last_message_at,
            "full_state_at": self.full_state_at,
            "verdicts": self.verdicts,
        }


def topology_message(topology: Topology, version: str) -> prober_pb2.ControlPlaneMessage:
    clusters = topology.document.get("clusters", [])
    return prober_pb2.ControlPlaneMessage(
        topology=prober_pb2.Topology(version=version, clusters_json=json.dumps({"clusters": clusters}))
    )


def _timestamp_seconds(ts: Timestamp, fallback: float) -> float:
    if ts.seconds == 0 and ts.nanos == 0:
        return fallback
    return float(ts.seconds + ts.nanos / 1e9)


def _status_name(value: int) -> str:
    try:
        return HealthStatus(value).name
    except ValueError:
        return f"status {value}"


def verdicts_from_batch(batch: prober_pb2.VerdictBatch, source: str, now: float) -> list[Verdict]:
    """The batch's verdicts; ProtocolError naming the first bad one."""
    if len(batch.verdicts) > MAX_BATCH:
        raise ProtocolError(f"a batch may carry at most {MAX_BATCH} verdicts, got {len(batch.verdicts)}")
    out = []
    for i, v in enumerate(batch.verdicts):
        if not v.cluster or ":" not in v.endpoint:
            raise ProtocolError(f"verdicts[{i}]: needs cluster and endpoint ADDRESS:PORT")
        try:
            status = HealthStatus(v.status)
        except ValueError:
            raise ProtocolError(f"verdicts[{i}].status: unknown value {v.status}") from None
        when = _timestamp_seconds(v.time, now)
        out.append(Verdict(v.cluster, v.endpoint, status, v.reason, min(max(when, now - MAX_VERDICT_AGE), now), source))
    return out


def check_info(state: prober_pb2.CheckState, source: str) -> CheckInfo:
    c = state.counters
    has_last = bool(state.last_result)
    return CheckInfo(
        check=state.check,
        rise=state.rise,
        fall=state.fall,
        successes=c.successes,
        http_failures=c.http_failures,
        tcp_failures=c.tcp_failures,
        timeouts=c.timeouts,
        checks=state.checks,
        last_result=state.last_result or None,
        last_reason=state.last_reason,
        last_time=_timestamp_seconds(state.last_time, 0.0) if has_last else None,
        last_latency=state.last_latency_seconds if has_last else None,
        prober=source,
    )


class VerdictSink(Protocol):
    """Where the link hands verdicts: applied together with others that arrive close by."""

    def submit_verdicts_soon(self, verdicts: Sequence[Verdict]) -> None: ...


class ProberLinkService:
    """Serves `healthplane.v1.ProberLink/Report`: verdicts in, the topology to check out."""

    def __init__(
        self,
        verdicts: VerdictSink,
        snapshots: SnapshotSource,
        events: EventSink,
        *,
        tls: Callable[[], TlsFiles | None] = lambda: None,
    ) -> None:
        self.verdicts = verdicts
        self.snapshots = snapshots
        self.events = events
        self.tls = tls
        self.probers: dict[str, ProberRecord] = {}
        self.refused_duplicates = 0  # connections refused because their prober id was connected
        self._live: tuple[Topology | None, set[tuple[str, str]]] = (None, set())
        self.peers = PeerStreams(kind="prober-link")  # controlplane.xds.max_streams_per_peer
        # The latest check state per endpoint from any remote prober, for /endpoints and /status.
        self.checks: dict[tuple[str, str], CheckInfo] = {}
        self._tasks: set[asyncio.Task[Any]] = set()  # each open Report call's task, to close it
        self._closing = ""  # why close_all ended the streams

    def close_all(self, reason: str) -> list[asyncio.Task[Any]]:
        """End every prober's stream with UNAVAILABLE and `reason` (a shutdown); the tasks to wait for."""
        self._closing = reason
        tasks = [t for t in self._tasks if not t.done()]
        for task in tasks:
            task.cancel()
        return tasks

    def forget(self, prober_id: str) -> None:
        """Drop a prober's record and the check states it reported (its votes are the quorum's)."""
        self.probers.pop(prober_id, None)
        source = f"prober:{prober_id}"
        for key in [k for k, info in self.checks.items() if info.prober == source]:
            del self.checks[key]

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            "healthplane.v1.ProberLink",
            {
                "Report": grpc.stream_stream_rpc_method_handler(
                    self.Report,
                    request_deserializer=prober_pb2.ProberMessage.FromString,
                    response_serializer=prober_pb2.ControlPlaneMessage.SerializeToString,
                )
            },
        )

    async def Report(self, requests: AsyncIterator[prober_pb2.ProberMessage], context: Any) -> None:
        try:
            peer = self.peers.acquire(context.peer() or "")
        except LimitExceeded as exc:
            log.warning("prober link refused: %s", exc)
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        try:
            await self._report(requests, context)
        finally:
            self.peers.release(peer)

    async def _report(self, _requests: AsyncIterator[prober_pb2.ProberMessage], context: Any) -> None:
        tls = self.tls()
        if tls is not None and tls.prober_names:
            presented = certificate_names(context.auth_context())
            if not set(presented) & set(tls.prober_names):
                shown = ", ".join(presented) or "none"
                log.warning("prober link refused (%s): certificate names %s", context.peer(), shown)
                await context.abort(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"prober link: the client certificate's names ({shown}) are not in "
                    "controlplane.xds.tls.prober_names",
                )
        first = await context.read()
        if first is grpc.aio.EOF:
            return
        if first.WhichOneof("message") != "hello" or not first.hello.prober_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first message must be hello with a prober_id")
        hello = first.hello
        record = ProberRecord(hello.prober_id, context.peer() or "", hello.version, time.time())
        previous = self.probers.get(hello.prober_id)
        if previous is not None and previous.connected:
            # One connection per id: a twin (two probers configured alike) would otherwise share one
            # record, its disconnect would mark the live one gone, and its votes would count as the
            # other's. A prober that restarted before its old stream was seen closing gets this
            # too, and retries until the old one is gone (gRPC keepalive ends it).
            log.warning("prober link refused (%s): prober id %s is connected from %s", record.peer, hello.prober_id,
                        previous.peer)  # fmt: skip
            self.refused_duplicates += 1
            await context.abort(
                grpc.StatusCode.ALREADY_EXISTS,
                f"prober id {hello.prober_id!r} is already connected (from {previous.peer}): "
                "each prober needs its own id (prober --id)",
            )
        self.probers[hello.prober_id] = record
        self.events.record(
            "prober",
            f"prober {hello.prober_id} connected from {record.peer}",
            prober=hello.prober_id,
            peer=record.peer,
        )
        wake = asyncio.Event()
        cancel = self.snapshots.subscribe(wake.set)
        reader = asyncio.create_task(self._read(record, context, wake), name=f"prober-read-{hello.prober_id}")
        sent: Topology | None = None
        if (task := asyncio.current_task()) is not None:
            self._tasks.add(task)
        try:
            # The only writer on this call: a write in flight and an error status cannot overlap.
            while not reader.done():
                snapshot = self.snapshots.current()
                assert snapshot is not None  # the control plane publishes before it serves
                if snapshot.topology is not sent:
                    sent = snapshot.topology
                    await context.write(topology_message(sent, snapshot.version))
                await wake.wait()
                wake.clear()
            error = None if reader.cancelled() else reader.exception()
            if isinstance(error, ProtocolError):
                log.warning("prober %s (%s): %s", hello.prober_id, record.peer, error)
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        except asyncio.CancelledError:
            if not self._closing:
                raise
            await context.abort(grpc.StatusCode.UNAVAILABLE, self._closing)
        finally:
            if task is not None:
                self._tasks.discard(task)
            cancel()
            reader.cancel()
            record.disconnected_at = time.time()
            self.events.record(
                "prober",
                f"prober {hello.prober_id} disconnected; its last verdicts are kept",
                prober=hello.prober_id,
            )

    async def _read(self, record: ProberRecord, context: Any, wake: asyncio.Event) -> None:
        source = f"prober:{record.prober_id}"
        try:
            while (message := await context.read()) is not grpc.aio.EOF:
                if message.WhichOneof("message") != "verdicts":
                    raise ProtocolError("after hello, a prober sends only verdicts")
                now = time.time()
                record.last_message_at = now
                verdicts = verdicts_from_batch(message.verdicts, source, now)
                record.verdicts += len(verdicts)
                if message.verdicts.full_state:
                    record.full_state_at = now
                events = message.verdicts.events
                for event in events[:MAX_EVENTS_PER_BATCH]:
                    self._record_event(record, event)
                if len(events) > MAX_EVENTS_PER_BATCH:
                    more = len(events) - MAX_EVENTS_PER_BATCH
                    self.events.record(
                        "probe",
                        f"prober {record.prober_id}: {more} more probe events in one batch, not recorded one by one",
                        prober=record.prober_id,
                        dropped=more,
                    )
                live = self._live_endpoints()
                for state in message.verdicts.checks:
                    key = (state.cluster, state.endpoint)
                    if key in live:  # an endpoint the topology does not have is nobody's business
                        self.checks[key] = check_info(state, source)
                self.verdicts.submit_verdicts_soon(verdicts)
        finally:
            wake.set()

    def _live_endpoints(self) -> set[tuple[str, str]]:
        """The topology's (cluster, endpoint) pairs; check states of others are dropped as the topology moves."""
        snapshot = self.snapshots.current()
        topology = snapshot.topology if snapshot is not None else None
        if self._live[0] is not topology:
            live = {(c.name, e.key) for c in topology.clusters for e in c.endpoints} if topology else set()
            self._live = (topology, live)
            for key in [k for k in self.checks if k not in live]:
                del self.checks[key]
        return self._live[1]

    def _record_event(self, record: ProberRecord, event: prober_pb2.ProbeEvent) -> None:
        counters = event.counters
        self.events.record(
            "probe",
            f"{event.cluster} {event.endpoint}: {_status_name(event.old_status)} -> "
            f"{_status_name(event.new_status)} ({event.reason})",
            cluster=event.cluster,
            endpoint=event.endpoint,
            reason=event.reason,
            prober=record.prober_id,
            counters={
                "successes": counters.successes,
                "http_failures": counters.http_failures,
                "tcp_failures": counters.tcp_failures,
                "timeouts": counters.timeouts,
            },
        )

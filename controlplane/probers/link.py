"""The control plane's end of the prober link (protos/healthplane/v1/prober.proto).

Probers connect to the xDS port's gRPC server, say Hello, send their full state, then changes.
The control plane sends each prober the clusters to check, and again after every topology edit.
Verdicts become `Verdict`s handed to a `VerdictSink` (the control plane batches and admits them
like every other verdict); when a prober goes away its verdicts stay (the control plane says
how old they are) rather than being guessed.

Probers that take a share (`Hello.shards`, issue 17) split the endpoints: the members are the
connected sharing probers heard within `prober_staleness`, each endpoint is owned by
`probers.replicas` of them (probers/ownership.py), and each is sent only its share. The owners
are computed here, so the replica that counts a vote is the one that told its prober to check,
from a member list handed in by `member_source`: this replica's own link records (every prober
links to every replica, so every replica derives the same members), or with a store the
probers registered in etcd, the same list on every replica, and the link records again while
etcd is unavailable (docs/scaling.md, "Probers with shards", "Members from etcd").
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
from controlplane.health.store import EndpointId, HealthStatus, Verdict
from controlplane.probers.ownership import Members, Ownership
from controlplane.snapshots.cache import SnapshotSource
from controlplane.topology.model import Topology
from controlplane.topology.security import TlsFiles
from controlplane.xds.limits import PeerStreams
from controlplane.xds.tls import caller_certificate_names, caller_peer
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
SOURCE_PREFIX = "prober:"  # a remote prober's verdicts carry the source `prober:ID`


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
    shards: bool = False  # it takes a share (Hello.shards); False: it checks everything, as before shards
    left: bool = False  # it said goodbye (a clean stop): its share moved, no staleness alarm

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
            "shards": self.shards,
            "left": self.left,
        }


def last_heard(record: ProberRecord) -> float:
    return max(record.last_message_at or 0.0, record.connected_at)


def live_members(records: Sequence[ProberRecord], limit: float, now: float) -> list[str]:
    """The ids of the probers that share the endpoints now: connected, taking a share, and heard
    within `limit` seconds (0: no limit), so a hung prober's share moves within the staleness bound."""
    return [r.prober_id for r in records if r.shards and r.connected and (limit <= 0 or now - last_heard(r) <= limit)]


def topology_message(topology: Topology, version: str) -> prober_pb2.ControlPlaneMessage:
    clusters = topology.document.get("clusters", [])
    return prober_pb2.ControlPlaneMessage(
        topology=prober_pb2.Topology(version=version, clusters_json=json.dumps({"clusters": clusters}))
    )


def share_message(
    topology: Topology,
    version: str,
    share: Callable[[str, str], bool],
    served: Callable[[str, str], HealthStatus] | None = None,
) -> prober_pb2.ControlPlaneMessage:
    """The topology message with only the endpoints `share(cluster, endpoint)` keeps (a prober's share).

    An endpoint `served` with a known status has its `initial_status` sent as `unknown`: a prober
    that takes it over (a share that moved) must not announce a configured initial status over
    the verdict being served; it reports what its checks find. A new endpoint keeps its own.
    """
    clusters = []
    # The document's clusters and endpoints are the parsed topology's, in the same order.
    for doc, cluster in zip(topology.document.get("clusters", []), topology.clusters, strict=True):
        kept = []
        for ep_doc, ep in zip(doc.get("endpoints", []), cluster.endpoints, strict=True):
            if not share(cluster.name, ep.key):
                continue
            hc = ep.health_check
            if (
                served is not None
                and hc is not None
                and hc.initial_status != "unknown"
                and served(cluster.name, ep.key) is not HealthStatus.UNKNOWN
            ):
                ep_doc = {**ep_doc, "health_check": {**ep_doc.get("health_check", {}), "initial_status": "unknown"}}
            kept.append(ep_doc)
        if kept:
            clusters.append({**doc, "endpoints": kept})
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
        served: Callable[[str, str], HealthStatus] | None = None,
    ) -> None:
        self.verdicts = verdicts
        self.served = served  # each endpoint's status as served (a share's handover, see share_message)
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
        # Who shares the endpoints and who owns each (issue 17); every change is handed to
        # `on_ownership` (the control plane's quorum counts the owners' votes only).
        self.ownership = Ownership.of((), 1)
        self.on_ownership: Callable[[Ownership], None] = lambda _ownership: None
        # Where the members come from: given this replica's live sharing links, the list to use
        # (these links, or with a store the probers registered in etcd: ownership.choose_members).
        self.member_source: Callable[[Sequence[str]], Members] = lambda local: Members(tuple(sorted(local)), "local")
        self.members = Members((), "local")
        self._share_wakes: set[asyncio.Event] = set()  # each sharing prober's stream: its share changed

    # ------------------------------------------------------------------ shards (issue 17)

    def refresh_members(self, now: float | None = None) -> bool:
        """Recompute the members and the owners from the link records; True if they changed."""
        snapshot = self.snapshots.current()
        topology = snapshot.topology if snapshot is not None else Topology()
        limit = topology.controlplane.prober_staleness
        local = live_members(list(self.probers.values()), limit, time.time() if now is None else now)
        members = self.member_source(local)
        if (members.source, members.reason) != (self.members.source, self.members.reason):
            self.events.record(
                "prober",
                "prober members from "
                + ("etcd (every replica computes the owners from the same list)" if members.source == "etcd" else "")
                + (f"this replica's own links: {members.reason}" if members.source == "local" else ""),
                source=members.source,
                reason=members.reason,
            )
        self.members = members
        ownership = Ownership.of(members.ids, topology.probers.replicas)
        if ownership == self.ownership:
            return False
        before, self.ownership = self.ownership, ownership
        for wake in self._share_wakes:
            wake.set()
        self.on_ownership(ownership)
        if before.members == ownership.members == ():
            return True  # probers.replicas edited with no prober sharing: nothing to tell
        joined = sorted(set(ownership.members) - set(before.members))
        gone = sorted(set(before.members) - set(ownership.members))
        self.events.record(
            "prober",
            f"probers sharing the endpoints: {', '.join(ownership.members) or 'none'} "
            f"({ownership.replicas} per endpoint)"
            + (f"; joined: {', '.join(joined)}" if joined else "")
            + (
                f"; gone: {', '.join(gone)} (their shares move, their endpoints keep their last verdicts)"
                if gone
                else ""
            ),
            members=list(ownership.members),
            replicas=ownership.replicas,
        )
        return True

    def counts(self, verdict: Verdict) -> bool:
        """Whether a remote prober's vote counts now: with probers sharing the endpoints, only the
        endpoint's owners' (and those of probers without shards); without, every one."""
        if not self.ownership.members or not verdict.source.startswith(SOURCE_PREFIX):
            return True
        prober_id = verdict.source[len(SOURCE_PREFIX) :]
        record = self.probers.get(prober_id)
        if record is not None and not record.shards:
            return True
        return self.ownership.owns(prober_id, verdict.cluster, verdict.endpoint)

    def owners(self, cluster: str, endpoint: str) -> tuple[str, ...]:
        """The probers that check this endpoint (empty without probers sharing the endpoints)."""
        return self.ownership.owners(cluster, endpoint)

    def record_json(self, record: ProberRecord, shares: dict[str, int]) -> dict[str, Any]:
        """One prober for GET /probers: its record, whether it shares the endpoints now and how many it owns."""
        return {
            **record.to_json(),
            "member": record.prober_id in self.ownership.members,
            "owns": shares.get(record.prober_id, 0) if record.shards else None,
        }

    def _share_message(self, record: ProberRecord, topology: Topology, version: str) -> prober_pb2.ControlPlaneMessage:
        ownership, prober_id = self.ownership, record.prober_id
        return share_message(
            topology, version, lambda cluster, key: ownership.owns(prober_id, cluster, key), self.served
        )

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
            peer = self.peers.acquire(caller_peer(context))
        except LimitExceeded as exc:
            log.warning("prober link refused: %s", exc)
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        try:
            await self._report(requests, context)
        finally:
            self.peers.release(peer)

    async def _report(self, _requests: AsyncIterator[prober_pb2.ProberMessage], context: Any) -> None:
        # The hello is read before any refusal: a refusal sent while the caller's first write is
        # still in flight reaches gRPC's aio clients as INTERNAL (a failed write) instead of the
        # status, and an xDS worker's relay (controlplane.xds.workers.relay) is such a client.
        first = await context.read()
        tls = self.tls()
        if tls is not None and tls.prober_names:
            presented = caller_certificate_names(context)
            if not set(presented) & set(tls.prober_names):
                shown = ", ".join(presented) or "none"
                log.warning("prober link refused (%s): certificate names %s", caller_peer(context), shown)
                await context.abort(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"prober link: the client certificate's names ({shown}) are not in "
                    "controlplane.xds.tls.prober_names",
                )
        if first is grpc.aio.EOF:
            return
        if first.WhichOneof("message") != "hello" or not first.hello.prober_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first message must be hello with a prober_id")
        hello = first.hello
        record = ProberRecord(hello.prober_id, caller_peer(context), hello.version, time.time(), shards=hello.shards)
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
            f"prober {hello.prober_id} connected from {record.peer}" + (" (takes a share)" if record.shards else ""),
            prober=hello.prober_id,
            peer=record.peer,
        )
        wake = asyncio.Event()
        cancel = self.snapshots.subscribe(wake.set)
        if record.shards:
            self._share_wakes.add(wake)
            self.refresh_members()
        reader = asyncio.create_task(self._read(record, context, wake), name=f"prober-read-{hello.prober_id}")
        sent: Topology | None = None
        sent_ownership: Ownership | None = None
        if (task := asyncio.current_task()) is not None:
            self._tasks.add(task)
        try:
            # The only writer on this call: a write in flight and an error status cannot overlap.
            while not reader.done():
                snapshot = self.snapshots.current()
                assert snapshot is not None  # the control plane publishes before it serves
                if snapshot.topology is not sent or (record.shards and self.ownership is not sent_ownership):
                    sent, sent_ownership = snapshot.topology, self.ownership
                    if record.shards:
                        await context.write(self._share_message(record, sent, snapshot.version))
                    else:
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
            self._share_wakes.discard(wake)
            record.disconnected_at = time.time()
            if record.shards:
                self.refresh_members()
            self.events.record(
                "prober",
                f"prober {hello.prober_id} "
                + ("left (it said goodbye)" if record.left else "disconnected")
                + (
                    "; its share moves to the probers that remain (its endpoints keep their last verdicts)"
                    if record.shards
                    else "; its last verdicts are kept"
                ),
                prober=hello.prober_id,
                left=record.left,
            )

    async def _read(self, record: ProberRecord, context: Any, wake: asyncio.Event) -> None:
        source = f"{SOURCE_PREFIX}{record.prober_id}"
        try:
            while (message := await context.read()) is not grpc.aio.EOF:
                kind = message.WhichOneof("message")
                if kind == "goodbye":
                    record.left = True  # a clean stop: what follows is the end of the stream
                    continue
                if kind != "verdicts":
                    raise ProtocolError("after hello, a prober sends only verdicts (and a goodbye last)")
                now = time.time()
                record.last_message_at = now
                if record.shards and record.prober_id not in self.ownership.members:
                    self.refresh_members(now)  # silent past the staleness bound, heard again: back in
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
                    # An endpoint the topology does not have is nobody's business; with shards, one
                    # the prober does not own is its owners' (it may check it for another replica).
                    if key in live and self._reports(record, key):
                        self.checks[key] = check_info(state, source)
                if verdicts:  # an empty batch says the prober is alive, nothing more
                    self.verdicts.submit_verdicts_soon(verdicts)
        finally:
            wake.set()

    def _reports(self, record: ProberRecord, key: EndpointId) -> bool:
        members = self.ownership.members
        return not (record.shards and members) or self.ownership.owns(record.prober_id, *key)

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

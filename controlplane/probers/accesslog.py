"""Passive health verdicts from the Envoys' access logs (issue 15): Envoy's gRPC access-log service.

Listeners whose routes lead to a cluster with `passive` checks log every request to
`envoy.service.accesslog.v3.AccessLogService/StreamAccessLogs` on the xDS port (through the
bootstrap's control-plane cluster). Each entry names the upstream cluster and host, the status
code and the response flags; `PassiveHealth` (health/passive.py) counts them per endpoint across
all Envoys and says when one is ejected. Verdicts go to the same verdict sink as the probers'
(quorum, mass-failure guard, persistence); ended holds are returned by `expire`, run on a timer.

A stream that is not an access log (garbage, no node id, TCP logs, a message over `MAX_ENTRIES`,
a cluster the topology lacks) is closed with INVALID_ARGUMENT naming what is wrong; other
streams are not affected. Entries are parsed and counted in chunks of `CHUNK` with a yield
between them, so a big message cannot hold an EDS push back for long.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any, Protocol

import grpc
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2
from google.protobuf.message import DecodeError
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from controlplane.errors import LimitExceeded, ProtocolError
from controlplane.events import EventSink
from controlplane.health.passive import Failure, PassiveHealth
from controlplane.health.store import Verdict
from controlplane.topology.model import PassiveCheck, Topology
from controlplane.xds.limits import PeerStreams
from controlplane.xds.tls import caller_peer

log = logging.getLogger("healthplane.accesslog")

SERVICE = "envoy.service.accesslog.v3.AccessLogService"
MAX_ENTRIES = 10_000  # per message; Envoy's 16 KiB buffer sends about 50
CHUNK = 500  # entries counted between two yields to the event loop

_TCP_FLAGS = frozenset({"upstream_connection_failure", "upstream_connection_termination", "upstream_remote_reset"})
_TIMEOUT_FLAGS = frozenset({"upstream_request_timeout"})


class VerdictSink(Protocol):
    """Where passive verdicts go: the same admission as the probers' (quorum, guard, persistence)."""

    def submit_verdicts(self, verdicts: Sequence[Verdict]) -> object: ...


class _Clusters:
    """The topology's clusters as the ingest needs them: policy and endpoint keys, built once per topology."""

    def __init__(self, topology: Topology) -> None:
        self.topology = topology
        self.policies: dict[str, PassiveCheck | None] = {c.name: c.passive for c in topology.clusters}
        self.endpoints: dict[str, frozenset[str]] = {
            c.name: frozenset(e.key for e in c.endpoints) for c in topology.clusters if c.passive is not None
        }


def failure_of(flags: accesslog_pb2.ResponseFlags) -> Failure | None:
    """What the response flags say about the upstream: a TCP failure, a timeout, or nothing."""
    for descriptor, value in flags.ListFields():
        if value and descriptor.name in _TIMEOUT_FLAGS:
            return Failure.TIMEOUT
        if value and descriptor.name in _TCP_FLAGS:
            return Failure.TCP
    return None


class AccessLogService:
    """Serves `StreamAccessLogs`: entries in, passive verdicts to the sink."""

    def __init__(self, verdicts: VerdictSink, events: EventSink, topology: Callable[[], Topology]) -> None:
        self.verdicts = verdicts
        self.events = events
        self.topology = topology
        self.peers = PeerStreams(kind="access-log")  # controlplane.xds.max_streams_per_peer
        self._clusters = _Clusters(topology())
        self._cut_short: list[Verdict] = []
        self.passive = PassiveHealth(lambda name: self._current().policies.get(name))
        self.entries: dict[str, int] = dict.fromkeys(("counted", "no_upstream", "not_passive", "unknown_endpoint"), 0)
        self.rejected_streams = 0
        self.streams = 0

    def _current(self) -> _Clusters:
        topology = self.topology()
        if self._clusters.topology is not topology:
            self._clusters = _Clusters(topology)
            keep = {(c, e) for c, keys in self._clusters.endpoints.items() for e in keys}
            # A cluster that lost `passive` must not keep its endpoints out: `expire` ends those holds.
            self._cut_short.extend(self.passive.forget(keep, time.time()))
        return self._clusters

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                # Raw bytes in: a message that does not parse gets INVALID_ARGUMENT, not INTERNAL.
                "StreamAccessLogs": grpc.stream_unary_rpc_method_handler(
                    self.StreamAccessLogs,
                    response_serializer=als_pb2.StreamAccessLogsResponse.SerializeToString,
                )
            },
        )

    async def StreamAccessLogs(self, requests: AsyncIterator[bytes], context: Any) -> als_pb2.StreamAccessLogsResponse:
        try:
            peer = self.peers.acquire(caller_peer(context))
        except LimitExceeded as exc:
            log.warning("access-log stream refused: %s", exc)
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        try:
            return await self._stream(requests, context)
        finally:
            self.peers.release(peer)

    async def _stream(self, requests: AsyncIterator[bytes], context: Any) -> als_pb2.StreamAccessLogsResponse:
        node = ""
        self.streams += 1
        try:
            async for raw in requests:
                message = parse_message(raw)
                if not node:
                    node = message.identifier.node.id
                    if not node:
                        raise ProtocolError("the first message must carry identifier.node.id")
                for verdicts in self.ingest(message, node):
                    if verdicts:
                        self.verdicts.submit_verdicts(verdicts)
                    await asyncio.sleep(0)
        except ProtocolError as exc:
            self.rejected_streams += 1
            peer = caller_peer(context)
            log.warning("access-log stream from %s (%s) refused: %s", node or "?", peer, exc)
            message = f"access-log stream from {node or peer} refused: {exc}"
            self.events.record("accesslog", message, node=node, peer=peer, error=str(exc))
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"access log: {exc}")
        finally:
            self.streams -= 1
        return als_pb2.StreamAccessLogsResponse()

    def ingest(self, message: als_pb2.StreamAccessLogsMessage, node: str) -> Iterator[list[Verdict]]:
        """Count a message's entries, a chunk at a time; yields each chunk's verdicts."""
        if message.HasField("tcp_logs"):
            raise ProtocolError("TCP access logs are not taken: healthplane counts HTTP entries only")
        entries = message.http_logs.log_entry
        if len(entries) > MAX_ENTRIES:
            raise ProtocolError(f"a message may carry at most {MAX_ENTRIES} entries, got {len(entries)}")
        clusters = self._current()
        observe = self.passive.observe
        counted = 0
        now = time.time()
        out: list[Verdict] = []
        for i, entry in enumerate(entries):
            common = entry.common_properties
            cluster = common.upstream_cluster
            if not cluster:
                self.entries["no_upstream"] += 1
                continue
            if cluster not in clusters.policies:
                raise ProtocolError(f"http_logs.log_entry[{i}]: no cluster named {cluster!r} in the topology")
            keys = clusters.endpoints.get(cluster)
            if keys is None:
                self.entries["not_passive"] += 1
                continue
            socket = common.upstream_remote_address.socket_address
            endpoint = f"{socket.address}:{socket.port_value}"
            if endpoint not in keys:
                # Removed by an edit while its requests were in flight, or no host was picked (UH).
                self.entries["unknown_endpoint"] += 1
                continue
            failure = failure_of(common.response_flags)
            verdict = observe(
                cluster, endpoint, status=entry.response.response_code.value, failure=failure, node=node, now=now
            )
            counted += 1
            if verdict is not None:
                out.append(verdict)
            if counted % CHUNK == 0:
                self.entries["counted"] += CHUNK
                yield out
                out = []
                now = time.time()
        self.entries["counted"] += counted % CHUNK
        yield out

    def expire(self, now: float | None = None) -> None:
        """End the holds that are over, or whose cluster lost `passive` (run by the process's timer)."""
        self._current()
        ended, self._cut_short = self._cut_short, []
        ended += self.passive.expire(time.time() if now is None else now)
        if ended:
            self.verdicts.submit_verdicts(ended)

    def restore(self, votes: Sequence[Verdict]) -> None:
        """The holds of passive votes reloaded at start."""
        self.passive.restore(votes)

    def metrics(self) -> Iterator[Metric]:
        """Entries by outcome, ejections, endpoints ejected now, open streams, for /metrics."""
        entries = CounterMetricFamily(
            "healthplane_passive_entries", "Access-log entries received, by outcome.", labels=["result"]
        )
        for result, n in self.entries.items():
            entries.add_metric([result], n)
        yield entries
        yield CounterMetricFamily(
            "healthplane_passive_ejections", "Passive ejections since start.", value=self.passive.ejected_total
        )
        ejected = GaugeMetricFamily(
            "healthplane_passive_ejected", "Endpoints held out by a passive ejection, by cluster.", labels=["cluster"]
        )
        by_cluster: dict[str, int] = {}
        for e in self.passive.ejected():
            by_cluster[e.verdict.cluster] = by_cluster.get(e.verdict.cluster, 0) + 1
        for cluster, n in sorted(by_cluster.items()):
            ejected.add_metric([cluster], n)
        yield ejected
        yield GaugeMetricFamily("healthplane_passive_streams", "Open access-log streams.", value=self.streams)
        yield CounterMetricFamily(
            "healthplane_passive_rejected_streams",
            "Access-log streams closed for malformed or hostile input.",
            value=self.rejected_streams,
        )


def parse_message(raw: bytes) -> als_pb2.StreamAccessLogsMessage:
    """One StreamAccessLogsMessage; ProtocolError if the bytes are not one."""
    try:
        return als_pb2.StreamAccessLogsMessage.FromString(raw)
    except DecodeError as exc:
        raise ProtocolError(f"not a StreamAccessLogsMessage ({len(raw)} bytes): {exc}") from None

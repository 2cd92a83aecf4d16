"""CSDS (envoy.service.status.v3.ClientStatusDiscoveryService) from the per-node ACK/NACK records.

For every connected node, every resource it subscribes to (or was sent) with its status as the
control plane knows it, and the resource as sent:

- DOES_NOT_EXIST: subscribed by name, but no such resource is served.
- REQUESTED: served and subscribed, but not sent yet, or sent and not answered yet.
- ACKED: the node ACKed a response carrying this version of the resource (or a later response
  in which it was unchanged).
- NACKED: the node rejected the latest response, which changed this resource; `error_state`
  holds Envoy's error text and the rejected version.

`config_status` says how that compares with what is served now: SYNCED (ACKed the current
version), STALE (ACKed or sent an older version, or not answered yet), ERROR (NACKed), NOT_SENT.

Everything here is pure: `client_status` takes the streams and snapshots and returns the
response message. `CsdsService` puts it on the gRPC server next to ADS.

Node ids are matched as Envoy matches them: `safe_regex` is RE2 (google-re2: linear in the id,
no backreferences or lookaround, which are refused with INVALID_ARGUMENT like any bad pattern),
its compiled program bounded in memory. Anyone who can reach the xDS port can ask, so an answer
is built one node at a time, giving the event loop back in between, and is bounded in size
(`MAX_RESPONSE_BYTES`): past it the request is refused with RESOURCE_EXHAUSTED, saying how to
narrow it, rather than building tens of megabytes while ADS pushes wait.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from typing import Any

import grpc
import re2
from envoy.admin.v3 import config_dump_shared_pb2 as dump
from envoy.config.core.v3 import base_pb2
from envoy.service.status.v3 import csds_pb2
from envoy.type.matcher.v3 import node_pb2, string_pb2
from google.protobuf.any_pb2 import Any as AnyMessage
from google.protobuf.timestamp_pb2 import Timestamp

from controlplane.errors import LimitExceeded, ProtocolError
from controlplane.snapshots import resources as rs
from controlplane.snapshots.cache import SnapshotHistory
from controlplane.snapshots.snapshot import Resource, Snapshot, version_key
from controlplane.xds.limits import PeerStreams
from controlplane.xds.stream import StreamState, TypeState
from controlplane.xds.tls import caller_peer

CSDS_SERVICE = "envoy.service.status.v3.ClientStatusDiscoveryService"

RS = dump.ClientResourceStatus
CS = csds_pb2.ConfigStatus

# An answer past this is refused (RESOURCE_EXHAUSTED): 50 nodes x 2,000 clusters with contents
# is ~44 MB; the statuses alone (exclude_resource_contents) are a tenth of that.
MAX_RESPONSE_BYTES = 16 * 1024 * 1024
# RE2's memory budget for one compiled node-id pattern (Envoy's safe_regex has a program-size cap).
MAX_REGEX_MEMORY = 1 << 20
MAX_REGEX_LENGTH = 1024


def _timestamp(seconds: float | None) -> Timestamp | None:
    if seconds is None:
        return None
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def find_resource(snapshots: Sequence[Snapshot], type_url: str, name: str, version: str) -> Resource | None:
    """The resource `name` at `version`, from the newest snapshot that still has it."""
    for snap in reversed(snapshots):
        r = snap.resources.get(type_url, {}).get(name)
        if r is not None and r.version == version:
            return r
        if r is not None and version_key(r.version) < version_key(version):
            return None  # older than what we look for: it is not further back either
    return None


def _acked_resource(snapshots: Sequence[Snapshot], ts: TypeState, name: str) -> Resource | None:
    for snap in reversed(snapshots):
        if snap.version == ts.acked_version:
            return snap.resources.get(ts.type_url, {}).get(name)
    return None


def _any(resource: Resource | None) -> AnyMessage | None:
    if resource is None:
        return None
    return AnyMessage(type_url=resource.type_url, value=resource.serialized)


def _not_after(version: str, acked: str | None) -> bool:
    return acked is not None and version_key(version) <= version_key(acked)


def resource_status(ts: TypeState, name: str, current: Resource | None) -> tuple[int, int]:
    """(ClientResourceStatus, ConfigStatus) of one resource on one stream."""
    sent = ts.sent.get(name)
    if sent is None:
        if current is None:
            return RS.DOES_NOT_EXIST, CS.UNKNOWN
        return RS.REQUESTED, CS.NOT_SENT
    if _not_after(sent, ts.acked_version):
        synced = current is not None and current.version == sent
        return RS.ACKED, CS.SYNCED if synced else CS.STALE
    nack = ts.last_nack
    if nack is not None and not ts.awaiting_ack and nack.version == ts.sent_version:
        return RS.NACKED, CS.ERROR
    return RS.REQUESTED, CS.STALE


def type_configs(
    stream: StreamState,
    ts: TypeState,
    snapshots: Sequence[Snapshot],
    *,
    include_contents: bool = True,
) -> list[csds_pb2.ClientConfig.GenericXdsConfig]:
    snapshot = snapshots[-1]
    table = snapshot.resources.get(ts.type_url, {})
    if ts.type_url == rs.LISTENER:
        available = list(snapshot.listener_names_for(stream.node_cluster, wildcard=ts.wildcard))
    else:
        available = list(table)
    names = list(ts.subscribed(available))
    if not ts.wildcard:
        names += sorted(n for n in ts.names if n not in table)  # asked for, but not served
    names += sorted(n for n in ts.sent if n not in names)
    out = []
    for name in names:
        current = table.get(name)
        status, config_status = resource_status(ts, name, current)
        sent_version = ts.sent.get(name)
        config = csds_pb2.ClientConfig.GenericXdsConfig(
            type_url=ts.type_url, name=name, client_status=status, config_status=config_status
        )
        if sent_version is not None:
            config.version_info = sent_version
            delta = stream.protocol == "delta"
            as_sent = find_resource(snapshots, ts.type_url, name, sent_version) if include_contents or delta else None
            if delta and as_sent is not None:
                # A delta node holds each resource at its own version (the digest of its bytes),
                # which is what Envoy's own config dump shows; the snapshot version is kept where
                # the resource as sent has left the history.
                config.version_info = as_sent.delta_version
            if not include_contents:
                as_sent = None
            when = ts.acked_at if status == RS.ACKED else ts.sent_at
            if (stamp := _timestamp(when)) is not None:
                config.last_updated.CopyFrom(stamp)
            if status == RS.NACKED and ts.last_nack is not None:
                nack = ts.last_nack
                config.error_state.details = nack.error
                config.error_state.version_info = nack.version
                if (stamp := _timestamp(nack.time)) is not None:
                    config.error_state.last_update_attempt.CopyFrom(stamp)
                if (failed := _any(as_sent)) is not None:
                    config.error_state.failed_configuration.CopyFrom(failed)
                # What the node runs is the resource as it was in the version it last ACKed.
                as_sent = _acked_resource(snapshots, ts, name) if include_contents else None
            if (packed := _any(as_sent)) is not None:
                config.xds_config.CopyFrom(packed)
        out.append(config)
    return out


def client_config(
    stream: StreamState, snapshots: Sequence[Snapshot], *, include_contents: bool = True
) -> csds_pb2.ClientConfig:
    """One node's ClientConfig: every resource of every type it subscribes to, in ADS order."""
    config = csds_pb2.ClientConfig(node=base_pb2.Node(id=stream.node_id or "", cluster=stream.node_cluster))
    for type_url in rs.ADS_ORDER:
        ts = stream.types.get(type_url)
        if ts is not None:
            config.generic_xds_configs.extend(type_configs(stream, ts, snapshots, include_contents=include_contents))
    return config


NodePredicate = Callable[[str], bool]


def _regex(pattern: str) -> NodePredicate:
    if len(pattern) > MAX_REGEX_LENGTH:
        raise ProtocolError(f"node_matchers: node_id.safe_regex is {len(pattern)} characters, over {MAX_REGEX_LENGTH}")
    options = re2.Options()
    options.max_mem = MAX_REGEX_MEMORY
    options.log_errors = False
    try:
        compiled = re2.compile(pattern, options)
    except re2.error as exc:
        raise ProtocolError(f"node_matchers: node_id.safe_regex: {_text(exc)} (RE2 syntax)") from None
    return lambda value: compiled.fullmatch(value) is not None


def _text(exc: Exception) -> str:
    arg = exc.args[0] if exc.args else exc
    return arg.decode("utf-8", "replace") if isinstance(arg, bytes) else str(arg)


def string_matcher(matcher: string_pb2.StringMatcher) -> NodePredicate:
    """A node-id predicate from a StringMatcher; ProtocolError for what is not supported or does not compile."""
    kind = str(matcher.WhichOneof("match_pattern") or "")
    if kind == "safe_regex":
        return _regex(str(matcher.safe_regex.regex))
    if kind not in ("exact", "prefix", "suffix", "contains"):
        raise ProtocolError(f"node_matchers: node_id: unsupported match {kind or '(none)'}")
    pattern = str(getattr(matcher, kind))
    fold = bool(matcher.ignore_case)
    if fold:
        pattern = pattern.lower()
    test: Callable[[str], bool] = {
        "exact": lambda v: v == pattern,
        "prefix": lambda v: v.startswith(pattern),
        "suffix": lambda v: v.endswith(pattern),
        "contains": lambda v: pattern in v,
    }[kind]
    return (lambda v: test(v.lower())) if fold else test


def string_matches(matcher: string_pb2.StringMatcher, value: str) -> bool:
    return string_matcher(matcher)(value)


def node_matcher(matcher: node_pb2.NodeMatcher) -> NodePredicate:
    if matcher.node_metadatas:
        raise ProtocolError("node_matchers: node_metadatas is not supported (match on node_id)")
    if not matcher.HasField("node_id"):
        return lambda _id: True
    return string_matcher(matcher.node_id)


def node_matches(matcher: node_pb2.NodeMatcher, stream: StreamState) -> bool:
    return node_matcher(matcher)(stream.node_id or "")


def matching_streams(request: csds_pb2.ClientStatusRequest, streams: Iterable[StreamState]) -> list[StreamState]:
    """The streams the request's matchers pick (all of them without matchers), by node id."""
    predicates = [node_matcher(m) for m in request.node_matchers]  # compiled once, refused before any work
    return [
        s
        for s in sorted(streams, key=lambda s: s.node_id or "")
        if not predicates or any(p(s.node_id or "") for p in predicates)
    ]


def client_configs(
    request: csds_pb2.ClientStatusRequest,
    streams: Iterable[StreamState],
    snapshots: Sequence[Snapshot],
    *,
    max_bytes: int = MAX_RESPONSE_BYTES,
) -> Iterator[csds_pb2.ClientConfig]:
    """One ClientConfig per matching node, lazily; LimitExceeded once their total passes `max_bytes`."""
    total = 0
    for stream in matching_streams(request, streams):
        config = client_config(stream, snapshots, include_contents=not request.exclude_resource_contents)
        total += config.ByteSize() + 8  # the field's tag and length
        if total > max_bytes:
            raise LimitExceeded(
                f"the CSDS answer would exceed {max_bytes} bytes: narrow node_matchers"
                + ("" if request.exclude_resource_contents else " or set exclude_resource_contents")
            )
        yield config


def client_status(
    request: csds_pb2.ClientStatusRequest,
    streams: Iterable[StreamState],
    snapshots: Sequence[Snapshot],
    *,
    max_bytes: int = MAX_RESPONSE_BYTES,
) -> csds_pb2.ClientStatusResponse:
    """The CSDS answer: one ClientConfig per connected node matching any of the request's matchers."""
    return csds_pb2.ClientStatusResponse(config=client_configs(request, streams, snapshots, max_bytes=max_bytes))


class CsdsService:
    """Serves CSDS (both the streaming and the unary method) from the node streams and the snapshot history."""

    def __init__(
        self,
        streams: Callable[[], Sequence[StreamState]],
        history: SnapshotHistory,
        *,
        max_bytes: int = MAX_RESPONSE_BYTES,
    ) -> None:
        self.streams = streams
        self.history = history
        self.max_bytes = max_bytes
        self.peers = PeerStreams(kind="CSDS")  # controlplane.xds.max_streams_per_peer

    def answer(self, request: csds_pb2.ClientStatusRequest) -> csds_pb2.ClientStatusResponse:
        return client_status(request, self.streams(), self.history.recent(), max_bytes=self.max_bytes)

    async def answer_async(self, request: csds_pb2.ClientStatusRequest) -> csds_pb2.ClientStatusResponse:
        """`answer`, one node at a time with the event loop given back in between."""
        response = csds_pb2.ClientStatusResponse()
        configs = client_configs(request, self.streams(), self.history.recent(), max_bytes=self.max_bytes)
        for config in configs:
            response.config.append(config)
            await asyncio.sleep(0)
        return response

    async def _answer_or_abort(self, request: csds_pb2.ClientStatusRequest, context: Any) -> Any:
        try:
            return await self.answer_async(request)
        except LimitExceeded as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        except ProtocolError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))

    async def FetchClientStatus(self, request: csds_pb2.ClientStatusRequest, context: Any) -> Any:
        return await self._answer_or_abort(request, context)

    async def StreamClientStatus(
        self, requests: AsyncIterator[csds_pb2.ClientStatusRequest], context: Any
    ) -> AsyncIterator[csds_pb2.ClientStatusResponse]:
        try:
            peer = self.peers.acquire(caller_peer(context))
        except LimitExceeded as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        try:
            async for request in requests:
                yield await self._answer_or_abort(request, context)
        finally:
            self.peers.release(peer)

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            CSDS_SERVICE,
            {
                "StreamClientStatus": grpc.stream_stream_rpc_method_handler(
                    self.StreamClientStatus,
                    request_deserializer=csds_pb2.ClientStatusRequest.FromString,
                    response_serializer=csds_pb2.ClientStatusResponse.SerializeToString,
                ),
                "FetchClientStatus": grpc.unary_unary_rpc_method_handler(
                    self.FetchClientStatus,
                    request_deserializer=csds_pb2.ClientStatusRequest.FromString,
                    response_serializer=csds_pb2.ClientStatusResponse.SerializeToString,
                ),
            },
        )

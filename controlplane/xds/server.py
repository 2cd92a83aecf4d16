"""The ADS gRPC server (state of the world and delta): how snapshots reach Envoy streams.

The server depends on one narrow seam, `SnapshotSource` (the current snapshot, and a way to be
woken when it changes), and reports what happens through `StreamCallbacks`. It never decides
what a snapshot holds; `StreamState` decides what each stream is due.

Responses are written as bytes: the snapshot encodes each (type, resource set) body once and
each stream appends its nonce, so a push to N streams costs N writes and one encoding.

Both methods, `StreamAggregatedResources` and `DeltaAggregatedResources`, run the same loop and
differ only in their `StreamState` (`controlplane.xds.delta.DeltaStreamState` for delta) and the
request they parse: one set of streams, callbacks, limits, delay and watchdog serves both.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import grpc

from controlplane.errors import ProtocolError
from controlplane.snapshots.cache import SnapshotSource
from controlplane.snapshots.snapshot import Snapshot, encode_response
from controlplane.topology.security import DEFAULT_MAX_MESSAGE_BYTES
from controlplane.xds.delta import DeltaStreamState
from controlplane.xds.limits import PeerStreams, parse_delta_request, parse_request, status_code
from controlplane.xds.stream import PendingResponse, RequestOutcome, StreamState

log = logging.getLogger("healthplane.xds")

ADS_SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"
REFUSAL_READ_TIMEOUT = 1.0

# grpc.aio drops new streams beyond ~1,000 pending in a reconnect storm unless these are raised.
SERVER_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.server.max_pending_requests", 50_000),
    ("grpc.server.max_pending_requests_hard_limit", 100_000),
    ("grpc.max_concurrent_streams", 100_000),
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    # Envoy may ping to keep idle ADS connections alive; do not answer that with GOAWAY.
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.http2.max_ping_strikes", 0),
    ("grpc.so_reuseport", 0),
    # gRPC answers every received data frame with a BDP-probe PING by default: on ADS, where each
    # ACK is a tiny frame, that doubles the writes per push for no flow-control benefit.
    ("grpc.http2.bdp_probe", 0),
]


class StreamCallbacks:
    """Hooks into the stream lifecycle; the defaults do nothing. Raising closes the stream."""

    def on_stream_open(self, stream: StreamState) -> None:
        pass

    def on_stream_closed(self, stream: StreamState) -> None:
        pass

    def on_request(self, stream: StreamState, outcome: RequestOutcome) -> None:
        pass

    def on_response(self, stream: StreamState, response: PendingResponse, snapshot: Snapshot) -> None:
        """A response is about to be written: always before the node can answer it."""


class AdsServer:
    """`StreamAggregatedResources` and `DeltaAggregatedResources` over grpc.aio, one task pair
    (reader, writer) per stream."""

    def __init__(
        self,
        source: SnapshotSource,
        callbacks: StreamCallbacks | None = None,
        *,
        delay: Callable[[StreamState], float] | None = None,
        first_stream_id: int = 1,
    ) -> None:
        self.source = source
        self.callbacks = callbacks or StreamCallbacks()
        # The propagation model (controlplane.delaymodel): seconds to hold a node's responses.
        self.delay = delay
        self.streams: dict[int, StreamState] = {}
        self._handlers: dict[int, asyncio.Task[Any]] = {}  # stream id -> its RPC's task, to close it
        self._closing: dict[int, tuple[str, grpc.StatusCode]] = {}  # stream id -> why close_stream closed it
        self._writing: set[int] = set()  # streams whose handler awaits a write (the node may not read)
        self._detached: set[int] = set()  # closed while writing: gone from the views, status after the write
        self._stream_ids = itertools.count(first_stream_id)  # an xDS worker's ids differ from every other's
        # Limits (controlplane.security): requests are parsed here, not by gRPC, to name the field.
        self.max_message_bytes = DEFAULT_MAX_MESSAGE_BYTES
        self.peers = PeerStreams()
        self.ended_with: Counter[str] = Counter()  # streams this server ended with an error, by status code

    def handler(self) -> grpc.GenericRpcHandler:
        sotw = grpc.stream_stream_rpc_method_handler(
            self._sotw_stream, request_deserializer=_identity, response_serializer=_identity
        )
        delta = grpc.stream_stream_rpc_method_handler(
            self._delta_stream, request_deserializer=_identity, response_serializer=_identity
        )
        return grpc.method_handlers_generic_handler(
            ADS_SERVICE, {"StreamAggregatedResources": sotw, "DeltaAggregatedResources": delta}
        )

    async def _sotw_stream(self, _requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await self._stream(StreamState(next(self._stream_ids), peer=context.peer() or ""), context, parse_request)

    async def _delta_stream(self, _requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        state = DeltaStreamState(next(self._stream_ids), peer=context.peer() or "")
        await self._stream(state, context, parse_delta_request)

    async def _stream(
        self, state: StreamState, context: grpc.aio.ServicerContext[Any, Any], parse: Callable[[bytes, int], Any]
    ) -> None:
        try:
            peer_key = self.peers.acquire(state.peer)
        except ProtocolError as exc:
            log.warning("stream refused (%s): %s", state.peer, exc)
            self.ended_with[status_code(exc).name] += 1
            # Refused once its first request is in (or after a second): a status sent while the
            # node's first write is in flight reaches gRPC's aio clients as INTERNAL, not as this.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(context.read(), REFUSAL_READ_TIMEOUT)
            await context.abort(status_code(exc), str(exc))
        wake = asyncio.Event()
        cancel = self.source.subscribe(wake.set)
        reader = asyncio.create_task(self._read(state, context, wake, parse), name=f"ads-read-{state.stream_id}")
        self.streams[state.stream_id] = state
        if (task := asyncio.current_task()) is not None:
            self._handlers[state.stream_id] = task
        opened = False
        writing = False
        try:
            while True:
                await wake.wait()
                wake.clear()
                if reader.done():
                    break
                if not opened and state.identified:
                    opened = True
                    self.callbacks.on_stream_open(state)
                snapshot = self.source.current()
                if snapshot is None or not opened:
                    continue
                due = state.due(snapshot)
                if due and self.delay is not None and (pause := self.delay(state)) > 0:
                    state.stamp_sent(due, None)  # not sent yet, for the views meanwhile
                    await asyncio.sleep(pause)  # a modelled slow network, not a wait for an event
                    state.stamp_sent(due, time.time())
                for pending in due:
                    body = state.response_body(snapshot, pending)
                    # Before the write: its await lets the reader run, and the node's ACK of this
                    # response could otherwise reach the callbacks before the response itself.
                    self.callbacks.on_response(state, pending, snapshot)
                    writing = True
                    self._writing.add(state.stream_id)
                    await context.write(encode_response(body, pending.nonce))
                    writing = False
                    self._writing.discard(state.stream_id)
                    if (closing := self._closing.get(state.stream_id)) is not None:
                        # Closed while this write was blocked: the node read it, now the reason.
                        self.ended_with[closing[1].name] += 1
                        await context.abort(closing[1], closing[0])
            error = None if reader.cancelled() else reader.exception()
            if isinstance(error, ProtocolError):
                log.warning("stream %d (%s, %s): %s", state.stream_id, state.node_id, state.peer, error)
                self.ended_with[status_code(error).name] += 1
                await context.abort(status_code(error), str(error))
            elif error is not None and not isinstance(error, grpc.RpcError | grpc.aio.UsageError):
                log.error("stream %d (%s, %s) failed", state.stream_id, state.node_id, state.peer, exc_info=error)
                self.ended_with["INTERNAL"] += 1
                await context.abort(grpc.StatusCode.INTERNAL, f"the control plane failed on this stream: {error!r}")
        except asyncio.CancelledError:
            closing = self._closing.get(state.stream_id)
            if closing is None or writing:
                # A write blocked by a client that stopped reading cannot be called off: gRPC core
                # keeps that one message until the client reads or its connection closes, and
                # refuses a status meanwhile. The stream's state here is freed all the same.
                raise
            self.ended_with[closing[1].name] += 1
            await context.abort(closing[1], closing[0])
        finally:
            self.peers.release(peer_key)
            cancel()
            reader.cancel()
            self.streams.pop(state.stream_id, None)
            self._handlers.pop(state.stream_id, None)
            self._closing.pop(state.stream_id, None)
            self._writing.discard(state.stream_id)
            if opened and state.stream_id not in self._detached:
                self.callbacks.on_stream_closed(state)
            self._detached.discard(state.stream_id)

    def close_stream(self, stream_id: int, reason: str, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE) -> bool:
        """End a stream from the server side with `code` (UNAVAILABLE: the node reconnects at once)
        and `reason`; False if it is gone."""
        task = self._handlers.get(stream_id)
        if task is None or task.done() or stream_id in self._closing:
            return False
        self._closing[stream_id] = (reason, code)
        state = self.streams.get(stream_id)
        if stream_id in self._writing and state is not None:
            # A write blocked by a node that stopped reading cannot be called off, and a cancelled
            # handler would leave the node, once it reads again, with that response and then
            # silence. So the stream leaves the views now, and the handler, still in its write,
            # ends it with `code` as soon as the write completes (or the connection drops).
            self.streams.pop(stream_id, None)
            if state.node_id is not None:
                self._detached.add(stream_id)
                self.callbacks.on_stream_closed(state)
            return True
        task.cancel()
        return True

    def close_all(self, reason: str) -> list[asyncio.Task[Any]]:
        """`close_stream` every open stream (a deliberate shutdown); the tasks to wait for."""
        return [task for stream_id, task in list(self._handlers.items()) if self.close_stream(stream_id, reason)]

    async def _read(
        self,
        state: StreamState,
        context: grpc.aio.ServicerContext[Any, Any],
        wake: asyncio.Event,
        parse: Callable[[bytes, int], Any],
    ) -> None:
        try:
            while True:
                data = await context.read()
                if data is grpc.aio.EOF:
                    return
                request = parse(data, self.max_message_bytes)
                outcome = state.on_request(request)
                self.callbacks.on_request(state, outcome)
                if state.needs_due(self.source.current()):
                    wake.set()
        finally:
            wake.set()


def _identity(data: bytes) -> bytes:
    return data


def create_server(*handlers: grpc.GenericRpcHandler, options: list[tuple[str, Any]] | None = None) -> grpc.aio.Server:
    """A grpc.aio server with options for thousands of long-lived streams."""
    server = grpc.aio.server(options=SERVER_OPTIONS if options is None else options)
    server.add_generic_rpc_handlers(handlers)
    return server

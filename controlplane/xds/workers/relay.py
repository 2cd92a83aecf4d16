"""The other services of the xDS port, relayed from a worker to the main process as raw bytes.

With SO_REUSEPORT the kernel spreads every connection to the xDS port over the workers: the
prober link, the Envoys' access logs (passive health) and CSDS land on workers too. They keep
one state each (verdicts, passive counters, every node's records), so the main process serves
them, on a private Unix-domain socket, and a worker relays each call there: generic handlers
with identity serializers, so nothing is parsed or encoded on the way, and the main process's
status code and message come back as they were. Envoys, probers and CSDS clients see one port
as before; nothing changes in their configuration.

The caller's address and the names of its verified client certificate (mutual TLS on the xDS
port) travel in metadata, `x-healthplane-peer` and `x-healthplane-cert-names`: the main process
sees the relay's Unix socket as the peer, so `caller_peer` and `caller_certificate_names` read
them there, and only from a Unix-socket peer (the socket sits in a directory only this user can
enter). The per-peer stream limit of the relayed services is applied here, per worker, and again
by each service in the main process over the relayed peer, so it holds across the workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc

from controlplane.errors import LimitExceeded
from controlplane.xds.limits import PeerStreams
from controlplane.xds.server import ADS_SERVICE, REFUSAL_READ_TIMEOUT
from controlplane.xds.tls import NAMES_METADATA, PEER_METADATA, certificate_names

log = logging.getLogger("healthplane.xds.workers")


def _identity(data: bytes) -> bytes:
    return data


class Relay(grpc.GenericRpcHandler):  # type: ignore[misc]
    """Every method but ADS, relayed to the main process's services socket."""

    def __init__(self, target: str, *, max_streams_per_peer: int = 0) -> None:
        self.target = target
        self.max_streams_per_peer = max_streams_per_peer
        self.peers: dict[str, PeerStreams] = {}
        self._channel: grpc.aio.Channel | None = None
        self.calls = 0

    def channel(self) -> grpc.aio.Channel:
        if self._channel is None:
            self._channel = grpc.aio.insecure_channel(
                self.target,
                options=[("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)],
            )
        return self._channel

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method
        if method.startswith(f"/{ADS_SERVICE}/"):
            return None

        async def relay(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            async for response in self._relay(method, requests, context):
                yield response

        return grpc.stream_stream_rpc_method_handler(
            relay, request_deserializer=_identity, response_serializer=_identity
        )

    async def _relay(
        self, method: str, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[bytes]:
        service = method.split("/")[1] if method.count("/") >= 2 else method
        peers = self.peers.get(service)
        if peers is None:
            peers = self.peers[service] = PeerStreams(self.max_streams_per_peer, kind=service.rsplit(".", 1)[-1])
        peer = context.peer() or ""
        try:
            key = peers.acquire(peer)
        except LimitExceeded as exc:
            # As AdsServer does: refused once the first message is in (a status racing the caller's
            # first write reaches gRPC aio clients as INTERNAL).
            with contextlib.suppress(Exception):
                await asyncio.wait_for(anext(aiter(requests)), REFUSAL_READ_TIMEOUT)
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        self.calls += 1
        metadata = [(k, v) for k, v in (context.invocation_metadata() or ()) if not k.startswith(("grpc-", ":"))]
        metadata = [(k, v) for k, v in metadata if k not in (PEER_METADATA, NAMES_METADATA) and isinstance(v, str)]
        metadata.append((PEER_METADATA, peer))
        names = [
            n for n in certificate_names(context.auth_context()) if n.isascii() and n.isprintable() and "," not in n
        ]
        metadata.append((NAMES_METADATA, ",".join(names)))
        # The call to the main process starts with the caller's first message in hand, written at
        # once: a service that refuses a call before reading (the prober link's certificate check)
        # then answers after that write, not during it. gRPC's aio client reports a write that
        # races the server's status as INTERNAL ("Internal error from Core") instead of the status.
        iterator = aiter(requests)
        try:
            first: bytes | None = await anext(iterator)
        except StopAsyncIteration:
            first = None
        call = self.channel().stream_stream(method, request_serializer=_identity, response_deserializer=_identity)(
            metadata=tuple(metadata)
        )

        async def forward() -> None:
            if first is not None:
                await call.write(first)
                async for request in iterator:
                    await call.write(request)
            await call.done_writing()

        pump = asyncio.create_task(forward())
        try:
            async for response in call:
                yield response
            if pump.done() and not pump.cancelled() and (error := pump.exception()) is not None:
                raise error
        except grpc.aio.AioRpcError as exc:
            await context.abort(exc.code(), exc.details() or "")
        finally:
            peers.release(key)
            pump.cancel()
            call.cancel()

    async def aclose(self) -> None:
        if self._channel is not None:
            await self._channel.close()

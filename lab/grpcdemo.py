"""A gRPC demo server for proxyless clients: answers with its name, serves grpc.health.v1.

    python -m lab.grpcdemo --port 50051 --name g1

`/healthplane.demo.Demo/Who` (and `Hello`, the same answer under a second method, for per-method
routes) answers with the server's name (UTF-8), so a client sees which backend took each call;
`/grpc.health.v1.Health/Check` answers SERVING until `set_serving(False)`, which the prober's
gRPC check turns into a verdict. Messages are raw bytes on every method, so no generated code is
needed; the health messages are one field each and encoded by hand.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import signal
import time
from typing import Any

import grpc

__all__ = ["DEMO_SERVICE", "LAST_CALLS_METHOD", "WHO_METHOD", "GrpcDemoServer", "main"]

DEMO_SERVICE = "healthplane.demo.Demo"
WHO_METHOD = f"/{DEMO_SERVICE}/Who"
# JSON {client: time of its latest call}: how benchmarks see when each client stopped calling.
LAST_CALLS_METHOD = f"/{DEMO_SERVICE}/LastCalls"
CLIENT_METADATA = "x-demo-client"  # callers may name themselves; the server keeps when it last saw each
_SERVING, _NOT_SERVING, _SERVICE_UNKNOWN = 1, 2, 3


def _health_service(request: bytes) -> str:
    """The `service` field (1) of a grpc.health.v1.HealthCheckRequest."""
    if len(request) >= 2 and request[0] == 0x0A and request[1] < 0x80:
        return request[2 : 2 + request[1]].decode("utf-8", "replace")
    return ""


def _identity(data: bytes) -> bytes:
    return data


class GrpcDemoServer:
    """One grpc.aio server on 127.0.0.1: the Who method and the health service."""

    def __init__(self, name: str, *, service: str = "") -> None:
        self.name = name
        self.health_service = service  # the service name the health check asks about ("" = server)
        self.serving = True
        self.port = 0
        self.served = 0
        self.last_call: dict[str, float] = {}  # caller (x-demo-client) -> time of its latest call
        self.calls_by_client: collections.Counter[str] = collections.Counter()
        self._server: grpc.aio.Server | None = None

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        server = grpc.aio.server()
        handlers = {
            "Who": grpc.unary_unary_rpc_method_handler(
                self._who, request_deserializer=_identity, response_serializer=_identity
            ),
            "Hello": grpc.unary_unary_rpc_method_handler(
                self._who, request_deserializer=_identity, response_serializer=_identity
            ),
            "LastCalls": grpc.unary_unary_rpc_method_handler(
                self._last_calls, request_deserializer=_identity, response_serializer=_identity
            ),
        }
        health = {
            "Check": grpc.unary_unary_rpc_method_handler(
                self._check, request_deserializer=_identity, response_serializer=_identity
            )
        }
        server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(DEMO_SERVICE, handlers),
                grpc.method_handlers_generic_handler("grpc.health.v1.Health", health),
            )
        )
        self.port = server.add_insecure_port(f"{host}:{port}")
        await server.start()
        self._server = server
        return self.port

    def set_serving(self, serving: bool) -> None:
        self.serving = serving

    async def _who(self, request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        self.served += 1
        for key, value in context.invocation_metadata() or ():
            if key == CLIENT_METADATA:
                client = value if isinstance(value, str) else value.decode()
                self.last_call[client] = time.time()
                self.calls_by_client[client] += 1
        return self.name.encode()

    async def _last_calls(self, request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        return json.dumps(self.last_call).encode()

    async def _check(self, request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        service = _health_service(request)
        if service not in ("", self.health_service):
            return bytes([0x08, _SERVICE_UNKNOWN])
        return bytes([0x08, _SERVING if self.serving else _NOT_SERVING])

    async def stop(self, grace: float | None = None) -> None:
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None


async def _serve(args: argparse.Namespace) -> None:
    server = GrpcDemoServer(args.name)
    port = await server.start(args.host, args.port)
    print(f"grpc demo {args.name} on {args.host}:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)

    def toggle() -> None:
        server.set_serving(not server.serving)
        print(f"grpc demo {args.name}: health {'SERVING' if server.serving else 'NOT_SERVING'}", flush=True)

    # `kill -USR1 PID` flips the health service, for the lab's "fail a backend" step.
    with contextlib.suppress(NotImplementedError):
        loop.add_signal_handler(signal.SIGUSR1, toggle)
    await stop.wait()
    await server.stop(0.5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab.grpcdemo", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=50051)
    parser.add_argument("--name", default="grpc-demo")
    asyncio.run(_serve(parser.parse_args(argv)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

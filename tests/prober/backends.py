"""Small real backends for the prober tests: HTTP(S) with a switchable status, TCP, gRPC health."""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from aiohttp import web
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

LOCALHOST = "127.0.0.1"


@dataclass
class SeenRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    connection: int  # which accepted connection served it (1-based)


@dataclass
class HttpBackend:
    """An HTTP server whose /livez answers `status` (switchable), counting connections and requests.

    /hang sleeps for `hang` seconds before answering. Connections are counted as they are
    accepted, so keep-alive reuse shows as requests > connections.
    """

    status: int = 200
    body: str = "OK"
    hang: float = 30.0
    ssl_context: ssl.SSLContext | None = None
    port: int = 0
    connections: int = 0
    requests: list[SeenRequest] = field(default_factory=list)
    statuses_served: list[int] = field(default_factory=list)
    _server: asyncio.Server | None = None
    _web: web.Server | None = None
    _numbers: dict[int, int] = field(default_factory=dict)

    async def start(self, port: int = 0) -> HttpBackend:
        self._web = web.Server(self._handle)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._factory, LOCALHOST, port, ssl=self.ssl_context)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def _factory(self) -> asyncio.Protocol:
        assert self._web is not None
        self.connections += 1
        handler = self._web()
        # RequestHandler has __slots__; remember which connection it is by identity.
        self._numbers[id(handler)] = self.connections
        return handler

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        number = self._numbers[id(request.protocol)]
        self.requests.append(
            SeenRequest(request.method, request.path_qs, dict(request.headers), await request.read(), number)
        )
        if request.path == "/hang":
            await asyncio.sleep(self.hang)
        if request.path in ("/livez", "/hang"):
            self.statuses_served.append(self.status)
            return web.Response(status=self.status, text=self.body)
        if request.path == "/big":
            return web.Response(body=b"x" * 200_000)
        return web.Response(text="hello")

    def requests_per_connection(self) -> dict[int, int]:
        counts: dict[int, int] = {}
        for r in self.requests:
            counts[r.connection] = counts.get(r.connection, 0) + 1
        return counts

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            assert self._web is not None
            await self._web.shutdown(0.1)
            await self._server.wait_closed()
            self._server = None


@dataclass
class TcpBackend:
    """A TCP listener; `reply(data)` decides what to answer to what it reads (None: stay silent)."""

    reply: Callable[[bytes], bytes | None] | None = None
    close_after_reply: bool = True
    port: int = 0
    connections: int = 0
    _server: asyncio.Server | None = None
    _writers: list[asyncio.StreamWriter] = field(default_factory=list)

    async def start(self, port: int = 0) -> TcpBackend:
        self._server = await asyncio.start_server(self._serve, LOCALHOST, port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.append(writer)
        try:
            if self.reply is None:
                return
            data = await reader.read(1024)
            answer = self.reply(data)
            if answer is None:
                await reader.read()  # silent until the prober gives up
                return
            writer.write(answer)
            await writer.drain()
            if not self.close_after_reply:
                await reader.read()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for w in self._writers:
                w.close()
            await self._server.wait_closed()
            self._server = None


class _SlowHealth(health_pb2_grpc.HealthServicer):  # type: ignore[misc]
    def __init__(self, delay: float) -> None:
        self.delay = delay

    async def Check(self, request: Any, context: Any) -> Any:
        await asyncio.sleep(self.delay)
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)


@dataclass
class GrpcHealthBackend:
    """A grpc.aio server with the standard grpc.health.v1 servicer (or a slow one)."""

    slow: float | None = None
    port: int = 0
    servicer: Any = None
    # (cert, key) to serve TLS with; client_ca: require client certificates signed by it.
    tls: tuple[Path, Path] | None = None
    client_ca: Path | None = None
    _server: Any = None

    async def start(self, port: int = 0) -> GrpcHealthBackend:
        self._server = grpc.aio.server()
        if self.slow is not None:
            self.servicer = _SlowHealth(self.slow)
        else:
            self.servicer = self.servicer or health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, self._server)
        if self.tls is None:
            self.port = self._server.add_insecure_port(f"{LOCALHOST}:{port}")
        else:
            cert, key = self.tls
            credentials = grpc.ssl_server_credentials(
                [(key.read_bytes(), cert.read_bytes())],
                root_certificates=None if self.client_ca is None else self.client_ca.read_bytes(),
                require_client_auth=self.client_ca is not None,
            )
            self.port = self._server.add_secure_port(f"{LOCALHOST}:{port}", credentials)
        await self._server.start()
        return self

    async def set(self, service: str, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        await self.servicer.set(service, status)

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(None)
            self._server = None


def closed_port() -> int:
    """A port with nothing listening on it (bound and released, so connects are refused)."""
    import socket

    with socket.socket() as s:
        s.bind((LOCALHOST, 0))
        port: int = s.getsockname()[1]
    return port


def self_signed_cert(directory: Path, name: str = "backend.test") -> tuple[Path, Path] | None:
    """A self-signed certificate for `name` made with the openssl CLI, or None without it."""
    if shutil.which("openssl") is None:
        return None
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-subj", f"/CN={name}", "-addext", f"subjectAltName=DNS:{name}",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


async def eventually(
    predicate: Callable[[], bool | Awaitable[bool]], *, within: float = 5.0, interval: float = 0.01
) -> None:
    """Poll `predicate` until it is true; fail after `within` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        value = predicate()
        if not isinstance(value, bool):
            value = await value
        if value:
            return
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {within}s")
        await asyncio.sleep(interval)

"""The admin port's connections: a cap, and a deadline for the first request's headers.

aiohttp never drops a connection that sends half a request, and accepts connections until
the process runs out of file descriptors, which it shares with the xDS port: a few hundred
half-open sockets stopped the admin API and starved xDS of descriptors (issue 19). So:

- at most `max_connections` at once (by default a quarter of the descriptor limit, at most
  1,024): past it a connection gets `503` and is closed, counted in `refused`; xDS keeps the
  other three quarters;
- a connection must deliver its first request's headers within `header_timeout` seconds, or
  it is closed (counted in `timed_out`); between requests aiohttp's keep-alive timeout applies;
- bodies are read under a deadline by the admin middleware (`BODY_TIMEOUT`, 408).
"""

from __future__ import annotations

import asyncio
import resource
from collections.abc import Callable
from typing import Any

from aiohttp import web

HEADER_TIMEOUT = 10.0
BODY_TIMEOUT = 30.0
KEEPALIVE_TIMEOUT = 15.0
_REFUSAL = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n"
    b"Content-Length: 58\r\n\r\n"
    b'{"error": "too many admin connections, try again later"}\r\n'
)


def default_max_connections() -> int:
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1024
    return max(8, min(1024, soft // 4))


class ConnectionLimits:
    """Counts the admin port's connections and wraps aiohttp's protocol factory with the limits."""

    def __init__(self, max_connections: int | None = None, header_timeout: float = HEADER_TIMEOUT) -> None:
        self.max_connections = max_connections if max_connections is not None else default_max_connections()
        self.header_timeout = header_timeout
        self.open = 0
        self.refused = 0
        self.timed_out = 0

    def wrap(self, factory: Callable[[], asyncio.Protocol]) -> Callable[[], asyncio.Protocol]:
        def make() -> asyncio.Protocol:
            if self.open >= self.max_connections:
                self.refused += 1
                return _Refuse()
            self.open += 1
            return _Guarded(factory(), self)

        return make


class _Refuse(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.write(_REFUSAL)
        transport.close()


class _Guarded(asyncio.Protocol):
    """aiohttp's protocol, with the header deadline and the count of open connections."""

    def __init__(self, inner: asyncio.Protocol, limits: ConnectionLimits) -> None:
        self.inner = inner
        self.limits = limits
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.tail = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.timer = asyncio.get_running_loop().call_later(self.limits.header_timeout, self._too_slow)
        self.inner.connection_made(transport)

    def _too_slow(self) -> None:
        self.timer = None
        self.limits.timed_out += 1
        if self.transport is not None:
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        if self.timer is not None:
            self.tail = (self.tail + data)[-(len(data) + 3) :]
            if b"\r\n\r\n" in self.tail:
                self.timer.cancel()
                self.timer = None
                self.tail = b""
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.limits.open -= 1
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


class LimitedSite(web.TCPSite):
    """A TCPSite whose connections go through `ConnectionLimits`."""

    def __init__(self, runner: web.BaseRunner, host: str, port: int, *, limits: ConnectionLimits, **kw: Any) -> None:
        super().__init__(runner, host, port, **kw)
        self.limits = limits

    async def start(self) -> None:
        await web.BaseSite.start(self)
        server = self._runner.server
        assert server is not None
        self._server = await asyncio.get_running_loop().create_server(
            self.limits.wrap(server),
            self._host,
            self._port,
            ssl=self._ssl_context,
            backlog=self._backlog,
            reuse_address=self._reuse_address,
            reuse_port=self._reuse_port,
        )

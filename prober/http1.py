"""A lean HTTP/1.1 client for plain-HTTP health checks: one pooled connection per endpoint.

Why not aiohttp here: bench/prober_load.py measured aiohttp's `ClientSession` at about half of the
prober's CPU for a two-byte answer (request and header objects, connector, response objects per
check). A health check needs far less: the request bytes are the same every time, and all we
read is the status line, the framing headers and at most `max_body` bytes of body. With this
client one process checks 10,000 keep-alive endpoints a second at half a core (see
docs/benchmarks.md). HTTPS checks keep using aiohttp, whose TLS handling we do not want to
rewrite.

Connections are bare non-blocking sockets in an epoll of the pool's own (`_Reactor`), which the
event loop watches as one descriptor: no asyncio transport and protocol callbacks per answer.

`ResponseParser` is pure and incremental (bytes in, a response out), so the framing rules are
unit-tested without sockets: Content-Length, chunked transfer coding, bodies delimited by close,
HEAD, 1xx interim responses, 204/304, and HTTP/1.0 keep-alive defaults (RFC 9112).
"""

from __future__ import annotations

import asyncio
import enum
import select
import socket
import time
from collections.abc import Callable
from typing import NamedTuple, cast

__all__ = [
    "Http1Connection",
    "Http1Pool",
    "HttpProtocolError",
    "HttpResponse",
    "NothingReceived",
    "ResponseParser",
    "build_request",
]

MAX_HEAD = 64 * 1024


class HttpProtocolError(ValueError):
    """The endpoint answered something that is not a valid HTTP/1.x response."""


class HttpResponse(NamedTuple):
    """A response as a check sees it (a NamedTuple: built once per check, cheaper than a dataclass)."""

    status: int
    body: bytes  # at most max_body bytes
    complete: bool  # the whole body was read (else it was longer than max_body)
    keep_alive: bool  # the connection may carry another request


def build_request(
    method: str, target: str, host: str, headers: tuple[tuple[str, str], ...], body: bytes | None, *, close: bool
) -> bytes:
    """The request bytes of a check, built once per endpoint and policy.

    The topology refuses what could split a request; this refuses it again (ValueError), for
    checks that reach the prober by another way (the prober link, a test)."""
    for part in (method, target, host, *(x for pair in headers for x in pair)):
        if any((ord(c) < 0x20 and c != "\t") or ord(c) == 0x7F for c in part):
            raise ValueError(f"control character in an HTTP request part: {part!r}")
    if any(c in " \t" for c in method + target):
        raise ValueError(f"space in the request line: {method!r} {target!r}")
    lines = [f"{method} {target} HTTP/1.1"]
    names = {name.lower() for name, _ in headers}
    if "host" not in names:
        lines.append(f"Host: {host}")
    if "user-agent" not in names:
        lines.append("User-Agent: healthplane-prober")
    lines.extend(f"{name}: {value}" for name, value in headers)
    if body is not None or method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(body or b'')}")
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")


class _Stage(enum.Enum):
    HEAD = 0
    LENGTH = 1  # a body of Content-Length bytes
    CHUNK_SIZE = 2
    CHUNK_DATA = 3
    CHUNK_END = 4  # the CRLF after a chunk
    TRAILERS = 5
    UNTIL_CLOSE = 6
    DONE = 7


class ResponseParser:
    """Incremental parser of one HTTP/1.x response; `feed` returns True once it is complete."""

    __slots__ = (
        "_buffer",
        "_remaining",
        "_stage",
        "body",
        "body_seen",
        "head_request",
        "keep_alive",
        "max_body",
        "received",
        "status",
    )

    def __init__(self, *, head_request: bool = False, max_body: int = 64 * 1024) -> None:
        self.body = bytearray()
        self._buffer = bytearray()
        self.reset(head_request=head_request, max_body=max_body)

    def reset(self, *, head_request: bool = False, max_body: int = 64 * 1024) -> None:
        """Start over for the next response (a pooled connection keeps one parser)."""
        self.head_request = head_request
        self.max_body = max_body
        self.status = 0
        self.keep_alive = True
        self.body.clear()  # response() copied what it returned
        self.body_seen = 0  # body bytes consumed, kept or not
        self.received = 0  # every byte fed, to tell "nothing came back" from "cut short"
        self._stage = _Stage.HEAD
        self._buffer.clear()
        self._remaining = 0

    @property
    def done(self) -> bool:
        return self._stage is _Stage.DONE

    def response(self) -> HttpResponse:
        if not self.done:
            raise HttpProtocolError("response is not complete")
        return HttpResponse(self.status, bytes(self.body), self.body_seen <= self.max_body, self.keep_alive)

    def feed(self, data: bytes) -> bool:
        """Consume bytes; True when the response is complete. Bytes after it are an error."""
        self.received += len(data)
        if self._stage is _Stage.DONE:
            if data:
                raise HttpProtocolError("data after the end of the response")
            return True
        if self._stage is _Stage.HEAD and not self._buffer:
            # The usual case: the whole head (and often the whole response) in one read. Parse it
            # straight from `data`, without copying it through the buffer.
            end = data.find(b"\r\n\r\n")
            if end >= 0:
                self._parse_head(data[:end])
                rest = data[end + 4 :]
                stage = cast(_Stage, self._stage)  # moved on in _parse_head
                if stage is _Stage.LENGTH and len(rest) == self._remaining:
                    self._keep(rest)
                    self._remaining = 0
                    self._stage = _Stage.DONE
                    return True
                if stage is _Stage.DONE and not rest:
                    return True
                data = rest
        self._buffer += data
        while self._step():
            pass
        if self.done and self._buffer:
            raise HttpProtocolError("data after the end of the response")
        return self.done

    def eof(self) -> bool:
        """The peer closed; True if that completes the response (a body delimited by close)."""
        if self._stage is _Stage.UNTIL_CLOSE:
            self._stage = _Stage.DONE
            self.keep_alive = False
            return True
        return self._stage is _Stage.DONE

    # ------------------------------------------------------------------ stages

    def _step(self) -> bool:
        stage = self._stage
        if stage is _Stage.HEAD:
            return self._head()
        if stage is _Stage.LENGTH or stage is _Stage.UNTIL_CLOSE:
            if not self._buffer:
                return False
            take = len(self._buffer) if stage is _Stage.UNTIL_CLOSE else min(self._remaining, len(self._buffer))
            self._keep(self._buffer[:take])
            del self._buffer[:take]
            if stage is _Stage.LENGTH:
                self._remaining -= take
                if self._remaining == 0:
                    self._stage = _Stage.DONE
            return self._stage is not _Stage.DONE and bool(self._buffer)
        if stage is _Stage.CHUNK_SIZE:
            line = self._line()
            if line is None:
                return False
            size_text = line.split(b";", 1)[0].strip()
            try:
                self._remaining = int(size_text, 16)
            except ValueError:
                raise HttpProtocolError(f"bad chunk size {size_text[:20]!r}") from None
            if self._remaining < 0:
                raise HttpProtocolError("negative chunk size")
            self._stage = _Stage.TRAILERS if self._remaining == 0 else _Stage.CHUNK_DATA
            return True
        if stage is _Stage.CHUNK_DATA:
            if not self._buffer:
                return False
            take = min(self._remaining, len(self._buffer))
            self._keep(self._buffer[:take])
            del self._buffer[:take]
            self._remaining -= take
            if self._remaining == 0:
                self._stage = _Stage.CHUNK_END
            return True
        if stage is _Stage.CHUNK_END:
            if len(self._buffer) < 2:
                return False
            if self._buffer[:2] != b"\r\n":
                raise HttpProtocolError("chunk not followed by CRLF")
            del self._buffer[:2]
            self._stage = _Stage.CHUNK_SIZE
            return True
        if stage is _Stage.TRAILERS:
            line = self._line()
            if line is None:
                return False
            if not line:
                self._stage = _Stage.DONE
            return True
        return False

    def _line(self) -> bytes | None:
        end = self._buffer.find(b"\r\n")
        if end < 0:
            if len(self._buffer) > MAX_HEAD:
                raise HttpProtocolError(f"line longer than {MAX_HEAD} bytes")
            return None
        line = bytes(self._buffer[:end])
        del self._buffer[: end + 2]
        return line

    def _keep(self, data: bytes | bytearray) -> None:
        room = self.max_body + 1 - len(self.body)  # one byte more than allowed tells "longer than max_body"
        if room > 0:
            self.body += data[:room]
        self.body_seen += len(data)

    def _head(self) -> bool:
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buffer) > MAX_HEAD:
                raise HttpProtocolError(f"response head longer than {MAX_HEAD} bytes")
            return False
        head = bytes(self._buffer[:end])
        del self._buffer[: end + 4]
        return self._parse_head(head)

    def _parse_head(self, head: bytes) -> bool:
        """Take in a response head (without its blank line); True if more of the response follows."""
        # Bytes all the way: decoding and splitting the head as str cost more than the rest of a
        # keep-alive check's parsing (bench/checkers.py profile).
        line_end = head.find(b"\r\n")
        status_line = head if line_end < 0 else head[:line_end]
        version = status_line[:8]
        code = status_line[9:12]
        if (
            (version != b"HTTP/1.1" and version != b"HTTP/1.0")
            or status_line[8:9] != b" "
            or len(code) != 3
            or not code.isdigit()  # bytes.isdigit() is ASCII digits only
            or (len(status_line) > 12 and status_line[12:13] != b" ")
        ):
            raise HttpProtocolError(f"bad status line {status_line[:60].decode('latin-1')!r}")
        status = int(code)
        length: int | None = None
        chunked = False
        connection = b""
        if line_end >= 0:
            for line in head[line_end + 2 :].split(b"\r\n"):
                name, sep, value = line.partition(b":")
                if not sep or not name or name != name.strip():
                    raise HttpProtocolError(f"bad header line {line[:60].decode('latin-1')!r}")
                lname = name.lower()
                if lname == b"content-length":
                    value = value.strip()
                    if not value.isdigit() or (length is not None and int(value) != length):
                        raise HttpProtocolError(f"bad Content-Length {value[:20].decode('latin-1')!r}")
                    length = int(value)
                elif lname == b"transfer-encoding":
                    chunked = value.lower().rsplit(b",", 1)[-1].strip() == b"chunked"
                    if not chunked:
                        shown = value.strip()[:40].decode("latin-1")
                        raise HttpProtocolError(f"unsupported Transfer-Encoding {shown!r}")
                elif lname == b"connection":
                    connection = value.strip().lower()
        if 100 <= status < 200:
            if status == 101:
                raise HttpProtocolError("unexpected 101 Switching Protocols")
            return True  # an interim response (100 Continue, 103 Early Hints): the real one follows
        self.status = status
        if connection:
            tokens = {t.strip() for t in connection.split(b",")}
            self.keep_alive = b"keep-alive" in tokens if version == b"HTTP/1.0" else b"close" not in tokens
        else:
            self.keep_alive = version == b"HTTP/1.1"
        if self.head_request or status in (204, 304):
            self._stage = _Stage.DONE
        elif chunked:
            self._stage = _Stage.CHUNK_SIZE
        elif length is not None:
            self._remaining = length
            self._stage = _Stage.LENGTH if length else _Stage.DONE
        else:
            self._stage = _Stage.UNTIL_CLOSE
            self.keep_alive = False
        return self._stage is not _Stage.DONE


OnDone = Callable[["Http1Connection", "HttpResponse | BaseException"], None]


# One receive buffer for every connection: reads happen one at a time on the loop's thread, and
# each copies out what it got before the next. recv(n) would allocate n bytes per read instead.
_READ_BUFFER = bytearray(256 * 1024)
_READ_VIEW = memoryview(_READ_BUFFER)
_EPOLLIN = getattr(select, "EPOLLIN", 1)
_EPOLLOUT = getattr(select, "EPOLLOUT", 4)
_EPOLLRDHUP = getattr(select, "EPOLLRDHUP", 0x2000)


class _Reactor:
    """The pool's connections in an epoll of their own, which the event loop watches as one descriptor.

    Each connection is registered once, for input (level-triggered), for its whole life: no
    system call per request to arm anything, and a server closing an idle connection is seen at
    once. When the loop finds the epoll readable, one `poll` returns every connection with
    something to read, and each is read straight from its socket. Measured in bench/checkers.py
    against asyncio transports, which cost per answer a selector key lookup, a handle, the
    transport's read path and the protocol's buffer callbacks.
    """

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._connections: dict[int, Http1Connection] = {}
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._epoll.fileno(), self._events)
        self.closed = False

    def add(self, conn: Http1Connection) -> None:
        self._epoll.register(conn.fd, _EPOLLIN | _EPOLLRDHUP)
        self._connections[conn.fd] = conn

    def want_write(self, conn: Http1Connection, on: bool) -> None:
        self._epoll.modify(conn.fd, _EPOLLIN | _EPOLLRDHUP | (_EPOLLOUT if on else 0))

    def remove(self, conn: Http1Connection) -> None:
        """Forget `conn` (it is about to close its socket, which leaves the epoll with it)."""
        if self._connections.get(conn.fd) is conn:
            del self._connections[conn.fd]

    def call_soon(self, callback: Callable[..., object], *args: object) -> None:
        self._loop.call_soon(callback, *args)

    def _events(self) -> None:
        connections = self._connections
        for fd, events in self._epoll.poll(0):
            conn = connections.get(fd)
            if conn is None:
                continue
            if events & _EPOLLOUT:
                conn.writable()
            if events != _EPOLLOUT:
                conn.readable()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._loop.remove_reader(self._epoll.fileno())
        self._epoll.close()
        self._connections.clear()


class Http1Connection:
    """One connection to an endpoint over a bare non-blocking socket; at most one request in flight.

    `begin` sends a request and calls `on_done(connection, response or exception)` from the
    reactor's callbacks: no task, future or timer per request, which is the whole cost of a
    keep-alive check once the socket is open (the caller keeps the deadline). `exchange` is the
    same as a coroutine.
    """

    __slots__ = ("_on_done", "_parser", "_reactor", "_unsent", "closed", "context", "fd", "idle_since", "sock", "uses")

    def __init__(self, sock: socket.socket, reactor: _Reactor) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.closed = False
        self.uses = 0
        self.idle_since = 0.0
        self.context: object = None  # the caller's, for the request in flight
        self._parser = ResponseParser()
        self._on_done: OnDone | None = None
        self._reactor = reactor
        self._unsent = b""  # what a full socket buffer did not take yet
        reactor.add(self)

    @property
    def busy(self) -> bool:
        return self._on_done is not None

    def readable(self) -> None:
        if self.closed:
            return
        try:
            n = self.sock.recv_into(_READ_BUFFER)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._lost(exc)
            return
        if n == 0:
            self._lost(None)  # the server closed its side: close ours too
            return
        self.data_received(bytes(_READ_VIEW[:n]))

    def writable(self) -> None:
        if self.closed or not self._unsent:
            return
        try:
            sent = self.sock.send(self._unsent)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._lost(exc)
            return
        self._unsent = self._unsent[sent:]
        if not self._unsent:
            self._reactor.want_write(self, False)

    def data_received(self, data: bytes) -> None:
        if self._on_done is None:
            self.close()  # bytes nobody asked for: the connection cannot be trusted again
            return
        try:
            if self._parser.feed(data):
                self._finish(self._parser.response())
        except HttpProtocolError as exc:
            self.close()
            self._finish(exc)

    def _lost(self, exc: Exception | None) -> None:
        if self.closed:
            return
        self.close()
        if self._on_done is None:
            return
        parser = self._parser
        if parser.eof():
            self._finish(parser.response())
        elif parser.received:
            self._finish(HttpProtocolError("connection closed in the middle of the response"))
        else:
            self._finish(NothingReceived(exc))

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._reactor.remove(self)
        self.sock.close()

    def begin(self, request: bytes, *, head_request: bool, max_body: int, on_done: OnDone) -> None:
        """Send `request`; `on_done` gets the response or the error, once, unless `abandon` comes first."""
        assert not self.closed and self._on_done is None
        self._parser.reset(head_request=head_request, max_body=max_body)
        self._on_done = on_done
        self.uses += 1
        try:
            sent = self.sock.send(request)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            # Reported from the loop, as a transport would: the caller has not finished starting.
            self._reactor.call_soon(self._lost, exc)
            return
        if sent < len(request):
            self._unsent = request[sent:]
            self._reactor.want_write(self, True)

    def abandon(self) -> None:
        """Give up on the request in flight (its deadline passed): no callback, and the connection closes."""
        self._on_done = None
        self.close()

    def _finish(self, outcome: HttpResponse | BaseException) -> None:
        on_done, self._on_done = self._on_done, None
        if on_done is not None:
            on_done(self, outcome)

    async def exchange(self, request: bytes, *, head_request: bool, max_body: int) -> HttpResponse:
        waiter: asyncio.Future[HttpResponse] = asyncio.get_running_loop().create_future()

        def done(conn: Http1Connection, outcome: HttpResponse | BaseException) -> None:
            if waiter.done():
                return
            if isinstance(outcome, BaseException):
                waiter.set_exception(outcome)
            else:
                waiter.set_result(outcome)

        self.begin(request, head_request=head_request, max_body=max_body, on_done=done)
        try:
            return await waiter
        finally:
            self._on_done = None


class NothingReceived(ConnectionResetError):
    """The connection closed before a byte of the response: safe to retry on a fresh one."""

    def __init__(self, cause: Exception | None) -> None:
        super().__init__("server disconnected")
        self.__cause__ = cause


class Http1Pool:
    """Idle keep-alive connections, one per (address, port), and the requests that use them.

    `max_idle` bounds the idle connections kept (each holds a file descriptor). When the pool is
    full, a connection that comes back is closed rather than kept: the endpoints already pooled
    keep their connections and the others connect for each check. Evicting the least recently
    used one instead would close exactly the connection whose endpoint is due next, when checks
    go round at one interval, and no check would reuse a connection at all.
    """

    def __init__(
        self,
        *,
        keepalive_timeout: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        max_idle: int | None = None,
    ) -> None:
        if max_idle is not None and max_idle < 0:
            raise ValueError(f"max_idle must be >= 0, got {max_idle}")
        self._idle: dict[tuple[str, int], Http1Connection] = {}
        self._keepalive_timeout = keepalive_timeout
        self._clock = clock
        self.max_idle = max_idle
        self.refused = 0  # connections closed because the pool was full
        self._reactor: _Reactor | None = None  # made on the first connection, on the running loop

    async def request(
        self,
        address: str,
        port: int,
        request: bytes,
        *,
        head_request: bool = False,
        keepalive: bool = True,
        keepalive_requests: int = 0,
        max_body: int = 64 * 1024,
    ) -> HttpResponse:
        """Send `request` and read the response. OSError for the connection, HttpProtocolError for the answer.

        A pooled connection that the server closed while idle fails before any byte comes back;
        the request is then sent once more on a fresh connection, as browsers and aiohttp do.
        """
        key = (address, port)
        conn = self.take_idle(key)
        if conn is not None:
            try:
                return self.settle(
                    key,
                    conn,
                    await self._exchange(conn, request, head_request, max_body),
                    keepalive,
                    keepalive_requests,
                )
            except NothingReceived:
                pass
        conn = await self._connect(key)
        return self.settle(
            key, conn, await self._exchange(conn, request, head_request, max_body), keepalive, keepalive_requests
        )

    def release(self, address: str, port: int) -> None:
        conn = self._idle.pop((address, port), None)
        if conn is not None:
            conn.close()

    def close(self) -> None:
        idle, self._idle = list(self._idle.values()), {}
        for conn in idle:
            conn.close()
        if self._reactor is not None:
            self._reactor.close()

    def __len__(self) -> int:
        return len(self._idle)

    def idle_open(self) -> int:
        """Idle connections not closed by either side (each holds a file descriptor)."""
        return sum(1 for conn in self._idle.values() if not conn.closed)

    def take_idle(self, key: tuple[str, int]) -> Http1Connection | None:
        """The idle connection to `key` if there is a usable one; it leaves the pool."""
        conn = self._idle.pop(key, None)
        if conn is None:
            return None
        if conn.closed or self._clock() - conn.idle_since > self._keepalive_timeout:
            conn.close()
            return None
        return conn

    async def _connect(self, key: tuple[str, int]) -> Http1Connection:
        address, port = key
        sock = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            # As asyncio's create_connection does: a request must not wait for an ACK (Nagle).
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await asyncio.get_running_loop().sock_connect(sock, (address, port))
        except BaseException:
            sock.close()
            raise
        reactor = self._reactor
        if reactor is None or reactor.closed:
            reactor = self._reactor = _Reactor()
        return Http1Connection(sock, reactor)

    async def _exchange(self, conn: Http1Connection, request: bytes, head_request: bool, max_body: int) -> HttpResponse:
        try:
            return await conn.exchange(request, head_request=head_request, max_body=max_body)
        except BaseException:
            conn.close()  # an error or our own timeout: the connection is in an unknown state
            raise

    def settle(
        self, key: tuple[str, int], conn: Http1Connection, response: HttpResponse, keepalive: bool, limit: int
    ) -> HttpResponse:
        """Pool `conn` again after `response`, or close it (no keep-alive, limit reached, pool full)."""
        reuse = keepalive and response.keep_alive and response.complete and not conn.closed
        if reuse and limit and conn.uses >= limit:
            reuse = False
        if reuse:
            previous = self._idle.pop(key, None)
            if previous is not None:
                previous.close()
            if self.max_idle is not None and len(self._idle) >= self.max_idle:
                self.refused += 1
                reuse = False
        if reuse:
            conn.idle_since = self._clock()
            self._idle[key] = conn
        else:
            conn.close()
        return response

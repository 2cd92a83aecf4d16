"""The checks over real sockets: HTTP(S), TCP and gRPC health, each bounded by the policy timeout.

`NetworkChecker.check(target)` never raises for anything the endpoint does. Every outcome
becomes a `CheckResult` with a kind (which counter it feeds), a reason an operator can read
(`http 506`, `connect refused`, `timeout after 500ms`, `grpc NOT_SERVING`) and the latency.

Shared resources:
- HTTP: `prober.http1.Http1Pool`, one idle keep-alive connection per endpoint and the request
  bytes built once per endpoint and policy (aiohttp cost half the prober's CPU; see http1.py).
  Requests are counted per connection so that `keepalive_requests` can close a connection after
  N requests, as nginx's `check_keepalive_requests` does.
- HTTPS: one aiohttp `ClientSession` and connector, keyed by address, port and TLS settings.
- gRPC: one channel per target, reused between checks. It is dropped after a transport failure
  so that the next check dials again at once, without waiting out gRPC's reconnect backoff.

grpc.health.v1 messages are encoded by hand (`encode_health_request`, `decode_health_response`).
Each is a single field, so this keeps grpcio-health-checking and its untyped generated modules
out of the runtime dependencies. The tests check the codec against the real `health_pb2`.
"""

from __future__ import annotations

import _socket
import asyncio
import contextlib
import contextvars
import ctypes
import errno
import logging
import math
import os
import select
import socket
import ssl
import struct
import sys
import time
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import grpc
from aiohttp.client_reqrep import ClientRequest
from aiohttp.connector import Connection
from aiohttp.tracing import Trace
from multidict import CIMultiDict
from yarl import URL

from controlplane.topology.model import GrpcCheck, HealthCheck, HttpCheck, TcpCheck
from prober.http1 import Http1Connection, Http1Pool, HttpProtocolError, HttpResponse, NothingReceived, build_request
from prober.state import CheckResult, ResultKind, Target

__all__ = [
    "GRPC_SERVING_STATUS",
    "Checker",
    "NetworkChecker",
    "StartingChecker",
    "decode_health_response",
    "encode_health_request",
    "timeout_reason",
]

log = logging.getLogger("healthplane.prober")

USER_AGENT = "healthplane-prober"
# A timeout whose timer ran later than this (the larger of the two) is INCONCLUSIVE, not a failure.
# An idle loop runs timers within a millisecond or two; the benchmark's false timeouts came with
# a loop hundreds of ms late.
OVERLOAD_MIN_LATENESS = 0.025
OVERLOAD_LATENESS_SHARE = 0.1
# The prober itself is out of file descriptors: not the endpoint's fault, so the check counts
# neither way (prober/limits.py sizes the keep-alive pool so that this does not happen).
OUT_OF_DESCRIPTORS = frozenset({errno.EMFILE, errno.ENFILE})
GRPC_HEALTH_CHECK = "/grpc.health.v1.Health/Check"
# grpc.health.v1.HealthCheckResponse.ServingStatus
GRPC_SERVING_STATUS = {0: "UNKNOWN", 1: "SERVING", 2: "NOT_SERVING", 3: "SERVICE_UNKNOWN"}


DoneCallback = Callable[[Any, CheckResult], None]

# How late the shared deadline sweep may run (see NetworkChecker.start_check): a timeout fires
# between `timeout` and `timeout + SWEEP_SLACK` after the request went out, and one timer serves
# every check whose deadline falls in that span instead of one timer per check.
SWEEP_SLACK = 0.005


class Checker(Protocol):
    """What the prober needs from a checker; tests substitute a scripted one."""

    async def check(self, target: Target) -> CheckResult:
        """Check `target` once; never raises for the endpoint's behaviour."""
        ...

    async def release(self, target: Target) -> None:
        """Drop resources held for `target` (it left the topology or changed policy)."""
        ...

    async def aclose(self) -> None:
        """Release everything; safe to call twice."""
        ...


class StartingChecker(Checker, Protocol):
    """A checker that can also start some checks from a plain callback (no task per check)."""

    def start_check(self, target: Target, token: Any, done: DoneCallback) -> bool:
        """Start checking `target` and return True, then call `done(token, result)` once; False: use `check`."""
        ...


def timeout_reason(seconds: float) -> str:
    """`timeout after 500ms`: the reason of a check that ran out of time."""
    return f"timeout after {round(seconds * 1000, 3):g}ms"


def _os_reason(exc: OSError | None, fallback: str) -> str:
    if exc is None:
        return fallback
    if isinstance(exc, ConnectionRefusedError) or exc.errno == errno.ECONNREFUSED:
        return "connect refused"
    if isinstance(exc, ConnectionResetError) or exc.errno == errno.ECONNRESET:
        return "connection reset"
    if exc.errno == errno.EHOSTUNREACH:
        return "host unreachable"
    if exc.errno == errno.ENETUNREACH:
        return "network unreachable"
    return f"{fallback}: {exc.strerror or exc}"


def _host_literal(address: str) -> str:
    return f"[{address}]" if ":" in address else address


def _snippet(data: bytes, limit: int = 64) -> str:
    return repr(data[:limit]) + ("..." if len(data) > limit else "")


# --------------------------------------------------------------------------- grpc.health.v1 codec


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("truncated or oversized varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def encode_health_request(service: str) -> bytes:
    """A serialized `grpc.health.v1.HealthCheckRequest{service}`."""
    raw = service.encode()
    return b"\x0a" + _varint(len(raw)) + raw if raw else b""


def decode_health_response(data: bytes) -> int:
    """The `status` of a serialized `grpc.health.v1.HealthCheckResponse` (unknown fields skipped)."""
    status, pos = 0, 0
    while pos < len(data):
        tag, pos = _read_varint(data, pos)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            value, pos = _read_varint(data, pos)
            if number == 1:
                status = value
        elif wire == 1:
            pos += 8
        elif wire == 2:
            length, pos = _read_varint(data, pos)
            pos += length
        elif wire == 5:
            pos += 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        if pos > len(data):
            raise ValueError("truncated message")
    return status


# --------------------------------------------------------------------------- the checker


@dataclass(slots=True)
class _Progress:
    """What a check got before it ran out of time, to tell "no answer" from "wrong answer"."""

    received: bytearray = field(default_factory=bytearray)


@dataclass(slots=True)
class _Acquired:
    """The pooled HTTP connection (aiohttp protocol object) that a check's request went out on."""

    protocol: object | None = None


_ACQUIRED: contextvars.ContextVar[_Acquired | None] = contextvars.ContextVar("prober_acquired", default=None)


class _TrackingConnector(aiohttp.TCPConnector):
    """Tells the check in progress which connection its request got.

    aiohttp returns a connection to the pool as soon as a short body has arrived, so the
    response alone cannot say which connection it used.
    """

    async def connect(
        self,
        req: ClientRequest,
        traces: list[Trace],
        timeout: aiohttp.ClientTimeout,  # noqa: ASYNC109 (aiohttp's signature)
    ) -> Connection:
        connection = await super().connect(req, traces, timeout)
        acquired = _ACQUIRED.get()
        if acquired is not None:
            acquired.protocol = connection.protocol
        return connection


_STREAM_NONBLOCK = socket.SOCK_STREAM | getattr(socket, "SOCK_NONBLOCK", 0)
# Module constants read as globals in the connect-only check (one dict lookup, not two).
_EINPROGRESS, _EALREADY, _EISCONN = errno.EINPROGRESS, errno.EALREADY, errno.EISCONN
_SUCCESS = ResultKind.SUCCESS
# Connect-only checks close with a reset (SO_LINGER 0), as HAProxy's checks do: a FIN close
# leaves the socket in TIME_WAIT for 60 s, and at 10,000 checks a second that is 600,000 of
# them, far past Linux's tcp_max_tw_buckets (131,072 here: the table overflowed in
# bench/checkers.py runs). The reset also spares both ends the FIN exchange.
_LINGER_RESET = struct.pack("ii", 1, 0)
_EPOLL_TROUBLE = getattr(select, "EPOLLERR", 0) | getattr(select, "EPOLLHUP", 0)
_CONNECT_EVENTS = getattr(select, "EPOLLOUT", 0) | getattr(select, "EPOLLONESHOT", 0)
# Disconnected sockets kept for the next connect-only checks. A check takes a spare before it
# makes a socket, so spares and sockets in flight together never outnumber the most checks that
# were ever in flight at once (the prober's max_concurrency, which the descriptor budget keeps
# room for: prober/limits.py). Under load hundreds are in flight; a lower cap made most checks
# close their socket and make a new one again (bench/prober_load.py --modes tcp).
MAX_SPARE_SOCKETS = 512


def _find_disconnect() -> Callable[[int, Any, int], int] | None:
    """libc's `connect`, to call as `f(fd, UNSPEC, len(UNSPEC))`; None where there is no such call to make.

    On Linux `connect(fd, {AF_UNSPEC})` dissolves a TCP socket's association (tcp_disconnect: a
    reset when it was connected, as SO_LINGER 0 and close do) and leaves the socket ready for
    another connect. Python's `socket.connect` cannot pass AF_UNSPEC, hence libc through ctypes,
    called directly from the check (a Python wrapper around it was a frame more per check).
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc_connect: Callable[[int, Any, int], int] = ctypes.CDLL(None, use_errno=True).connect
    except (OSError, AttributeError):
        return None
    libc_connect.restype = ctypes.c_int  # type: ignore[attr-defined]
    return libc_connect


_DISCONNECT = _find_disconnect()
UNSPEC = ctypes.create_string_buffer(16)  # a sockaddr whose sa_family is AF_UNSPEC (0)
UNSPEC_LEN = len(UNSPEC)


class _Connects:
    """Sockets connecting for connect-only TCP checks, in an epoll of the checker's own.

    The event loop watches that one epoll descriptor; when it is readable, one `poll` returns
    every socket whose connect finished. Registering a socket is one C call, where
    `loop.add_writer` and `remove_writer` go through the selectors module and cost about as
    much as the connect itself (bench/checkers.py). EPOLLONESHOT: each socket reports once per
    connect.

    After a successful check the socket is not closed but disconnected (`_find_disconnect`:
    the same reset the peer would get from a close with SO_LINGER 0) and kept for the next
    check, to any endpoint: per check that saves the socket(), setsockopt() and close() system
    calls and the kernel's work of making and freeing a socket (bench/checkers.py). A socket
    that failed or timed out is closed.
    """

    def __init__(self, ready: Callable[[tuple[Any, ...], int], None]) -> None:
        self._epoll = select.epoll()
        self._ready = ready
        self._pending: dict[int, tuple[Any, ...]] = {}
        self._registered: set[int] = set()  # descriptors in the epoll (a reused socket is re-armed)
        self.opened = 0  # sockets made (the rest of the checks reused one)
        self.spare4: list[_socket.socket] = []  # read by NetworkChecker._start_connect directly
        self.spare6: list[_socket.socket] = []
        self._spare: dict[int, list[_socket.socket]] = {socket.AF_INET: self.spare4, socket.AF_INET6: self.spare6}
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._epoll.fileno(), self._events)

    def socket(self, family: int) -> _socket.socket:
        """A spare disconnected socket of `family`, or a new one; OSError when none can be made."""
        spare = self._spare[family]
        if spare:
            return spare.pop()
        # SOCK_NONBLOCK (Linux, as epoll is): one system call fewer than setblocking(False).
        # _socket.socket: the C type under socket.socket, without its Python-level __init__.
        sock = _socket.socket(family, _STREAM_NONBLOCK)
        self.opened += 1
        return sock

    def add(self, sock: _socket.socket, context: tuple[Any, ...]) -> None:
        fd = sock.fileno()
        if fd in self._registered:
            self._epoll.modify(fd, _CONNECT_EVENTS)
        else:
            self._epoll.register(fd, _CONNECT_EVENTS)
            self._registered.add(fd)
        self._pending[fd] = context

    def pending(self, fd: int, context: tuple[Any, ...]) -> bool:
        return self._pending.get(fd) is context

    def recycle(self, sock: _socket.socket) -> None:
        """Done with a connected socket: reset the connection and keep the socket for another check."""
        spare = self._spare[sock.family]
        if (
            _DISCONNECT is not None
            and len(spare) < MAX_SPARE_SOCKETS
            and _DISCONNECT(sock.fileno(), UNSPEC, UNSPEC_LEN) == 0
        ):
            spare.append(sock)
            return
        self.close_socket(sock, connected=True)

    def close_socket(self, sock: _socket.socket, *, connected: bool) -> None:
        """Close a socket (with a reset if it was connected); closing also leaves the epoll."""
        fd = sock.fileno()
        self._pending.pop(fd, None)
        self._registered.discard(fd)
        if connected:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        sock.close()

    def _events(self) -> None:
        for fd, events in self._epoll.poll(0):
            context = self._pending.pop(fd, None)
            if context is not None:
                self._ready(context, events)

    def close(self) -> None:
        self._loop.remove_reader(self._epoll.fileno())
        for spare in self._spare.values():
            for sock in spare:
                sock.close()
            spare.clear()
        self._epoll.close()
        self._pending.clear()
        self._registered.clear()


class _Outcome(Exception):
    """Raised inside a check to end it with a result; keeps the happy path flat."""

    def __init__(self, kind: ResultKind, reason: str, http_status: int | None = None) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason
        self.http_status = http_status


class NetworkChecker:
    """Runs HTTP, TCP and gRPC health checks over real sockets, sharing connections per endpoint."""

    def __init__(
        self,
        *,
        max_body: int = 64 * 1024,
        keepalive_timeout: float = 60.0,
        max_idle_connections: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._max_body = max_body
        self._keepalive_timeout = keepalive_timeout
        self._clock = clock
        self._wall = wall
        self._session: aiohttp.ClientSession | None = None
        self._pool = Http1Pool(keepalive_timeout=keepalive_timeout, clock=clock, max_idle=max_idle_connections)
        # The request bytes per (address, check port), with the policy they were built for.
        self._requests: dict[tuple[str, int], tuple[HttpCheck, bytes]] = {}
        self._verify_context: ssl.SSLContext | None = None
        # Requests served per pooled connection, keyed by aiohttp's protocol object.
        self._uses: weakref.WeakKeyDictionary[object, int] = weakref.WeakKeyDictionary()
        self._channels: dict[Target, Any] = {}
        # gRPC channel credentials per (ca_file, cert_file, key_file): the files are read once.
        self._grpc_credentials: dict[tuple[str | None, str | None, str | None], grpc.ChannelCredentials] = {}
        self._closed = False
        # Checks started by start_check, per timeout value, in deadline order (see _sweep).
        self._deadlines: dict[float, deque[tuple[float, Http1Connection | None, tuple[Any, ...]]]] = {}
        self._connects: _Connects | None = None
        self._sweep_handle: asyncio.TimerHandle | None = None
        self._sweep_at = math.inf
        self._retries: set[asyncio.Task[None]] = set()
        self._reasons: dict[int, str] = {}
        self.started_without_task = 0  # checks that went through start_check (observability, tests)

    @property
    def tcp_sockets_opened(self) -> int:
        """Sockets made for connect-only TCP checks so far (each is reused by later checks)."""
        return 0 if self._connects is None else self._connects.opened

    @property
    def pool(self) -> Http1Pool:
        """The plain-HTTP keep-alive pool (its `max_idle` bounds the descriptors it keeps)."""
        return self._pool

    # ------------------------------------------------------------------ lifecycle

    async def release(self, target: Target) -> None:
        self._pool.release(target.address, target.check_port)
        self._requests.pop((target.address, target.check_port), None)
        channel = self._channels.pop(target, None)
        if channel is not None:
            await channel.close(None)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._sweep_handle is not None:
            self._sweep_handle.cancel()
            self._sweep_handle = None
        for queue in self._deadlines.values():
            for _, conn, context in queue:
                if conn is None:
                    context[1].close()
                elif conn.context is context:
                    conn.context = None
                    conn.abandon()
        self._deadlines.clear()
        if self._connects is not None:
            self._connects.close()
            self._connects = None
        retries, self._retries = list(self._retries), set()
        for task in retries:
            task.cancel()
        await asyncio.gather(*retries, return_exceptions=True)
        self._pool.close()
        channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            await channel.close(None)
        if self._session is not None:
            await self._session.close()
            self._session = None

    # ------------------------------------------------------------------ dispatch

    async def check(self, target: Target) -> CheckResult:
        if self._closed:
            raise RuntimeError("checker is closed")
        hc = target.health_check
        started = self._clock()
        progress = _Progress()
        try:
            async with asyncio.timeout(hc.timeout):
                if hc.kind == "http":
                    outcome = await self._http(target, hc.http or HttpCheck())
                elif hc.kind == "tcp":
                    outcome = await self._tcp(target, hc.tcp or TcpCheck(), progress)
                else:
                    outcome = await self._grpc(target, hc, hc.grpc or GrpcCheck())
        except _Outcome as exc:
            outcome = exc
        except TimeoutError:
            late = self._clock() - started - hc.timeout
            if late > max(OVERLOAD_MIN_LATENESS, hc.timeout * OVERLOAD_LATENESS_SHARE):
                # The deadline itself ran late, so the loop was busy elsewhere: the answer may be
                # sitting unread in the socket. Not the endpoint's fault; count nothing.
                outcome = _Outcome(
                    ResultKind.INCONCLUSIVE, f"prober overloaded: timeout ran {round(late * 1000)}ms late"
                )
            else:
                outcome = self._timed_out(hc, progress)
        except Exception as exc:
            # Something we do not map yet, most likely an endpoint misbehaving in a new way. It is
            # still no success; the traceback tells us which mapping to add.
            log.exception("check of %s/%s failed unexpectedly", target.cluster, target.endpoint)
            outcome = _Outcome(ResultKind.TCP_FAILURE, f"check error: {type(exc).__name__}: {exc}")
        return CheckResult(
            kind=outcome.kind,
            reason=outcome.reason,
            time=self._wall(),
            latency=self._clock() - started,
            http_status=outcome.http_status,
        )

    def _timed_out(self, hc: HealthCheck, progress: _Progress) -> _Outcome:
        tcp = hc.tcp
        if hc.kind == "tcp" and tcp is not None and tcp.receive is not None and progress.received:
            # The endpoint answered, just not with the expected bytes: a wrong answer, not silence.
            return _Outcome(
                ResultKind.TCP_FAILURE,
                f"payload mismatch: expected {_snippet(tcp.receive)}, got {_snippet(bytes(progress.received))}",
            )
        return _Outcome(ResultKind.TIMEOUT, timeout_reason(hc.timeout))

    # ------------------------------------------------------------------ HTTP

    def _http_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = _TrackingConnector(
                limit=0,  # the prober's semaphore bounds concurrency; a pool limit would only queue
                limit_per_host=0,
                keepalive_timeout=self._keepalive_timeout,
                use_dns_cache=False,
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=None),  # the check's own deadline applies
                cookie_jar=aiohttp.DummyCookieJar(),  # no state shared between endpoints
                trust_env=False,
            )
        return self._session

    def _ssl(self, http: HttpCheck) -> ssl.SSLContext | bool:
        if not http.https:
            return True  # aiohttp's default; ignored for plain http
        if not http.verify_tls:
            return False
        if self._verify_context is None:
            self._verify_context = ssl.create_default_context()
        return self._verify_context

    def _request(self, target: Target, http: HttpCheck, key: tuple[str, int]) -> bytes:
        cached = self._requests.get(key)
        if cached is not None and cached[0] is http:  # identity: hashing the policy costs more than building
            return cached[1]
        host = http.host or f"{_host_literal(target.address)}:{target.check_port}"
        body = http.body.encode() if http.body is not None else None
        request = build_request(http.method, http.path, host, http.headers, body, close=not http.keepalive)
        self._requests[key] = (http, request)
        return request

    def _judge(self, http: HttpCheck, response: HttpResponse) -> tuple[ResultKind, str, int]:
        status = response.status
        reason = self._reasons.get(status)
        if reason is None:
            reason = self._reasons[status] = f"http {status}"
        for lo, hi in http.expected_statuses:
            if lo <= status <= hi:
                break
        else:
            return ResultKind.HTTP_FAILURE, reason, status
        if http.expected_body is not None and http.expected_body.encode() not in response.body:
            return ResultKind.HTTP_FAILURE, f"http {status} body mismatch", status
        return ResultKind.SUCCESS, reason, status

    # ------------------------------------------------------------------ HTTP without a task

    def start_check(self, target: Target, token: Any, done: DoneCallback) -> bool:
        """Start a plain-HTTP keep-alive check on a pooled connection from callbacks alone.

        Measured in bench/checkers.py: the task, coroutine chain, future and timer of each
        `check()` cost more CPU than the check's system calls. Here the request goes out at
        once, the response completes it in `data_received`, and one shared sweep (`_sweep`)
        times out the checks whose deadline passed. False (nothing started) when the check
        needs `check()`: another kind, HTTPS, no keep-alive, or no idle connection yet.
        """
        hc = target.health_check
        if self._closed:
            return False
        if hc.kind == "tcp":
            tcp = hc.tcp
            if tcp is not None and (tcp.send or tcp.receive):
                return False
            return self._start_connect(target, token, done)
        if hc.kind != "http":
            return False
        http = hc.http
        if http is None or http.https or not http.keepalive:
            return False
        key = (target.address, target.check_port)
        conn = self._pool.take_idle(key)
        if conn is None:
            return False
        request = self._request(target, http, key)
        started = self._clock()
        deadline = started + hc.timeout
        context = (target, http, key, token, done, started)
        conn.context = context
        conn.begin(request, head_request=http.method == "HEAD", max_body=self._max_body, on_done=self._answered)
        queue = self._deadlines.get(hc.timeout)
        if queue is None:
            queue = self._deadlines[hc.timeout] = deque()
        queue.append((deadline, conn, context))
        if deadline + SWEEP_SLACK < self._sweep_at:
            self._schedule_sweep(deadline + SWEEP_SLACK)
        self.started_without_task += 1
        return True

    def _start_connect(self, target: Target, token: Any, done: DoneCallback) -> bool:
        """A connect-only TCP check: a bare socket, watched by the checker's own epoll (_Connects).

        The success that completes within the call (loopback, and wherever the answer comes back
        at once) runs straight through, with no method call per step: at 10,000 checks a second
        each Python call is a visible share of what is left of a check besides the kernel's work
        (bench/checkers.py).
        """
        connects = self._connects
        if connects is None:
            if not hasattr(select, "epoll") or not hasattr(socket, "SOCK_NONBLOCK"):
                return False
            connects = self._connects = _Connects(self._connect_ready)
        started = self._clock()
        host = target.address
        spare = connects.spare6 if ":" in host else connects.spare4
        if spare:
            sock = spare.pop()
        else:
            try:
                sock = connects.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
            except OSError as exc:
                done(token, self._connect_result(exc.errno or errno.EMFILE, started))
                return True
        address = (host, target.health_check.port or target.port)  # Target.check_port, without the call
        err = sock.connect_ex(address)
        if err == _EINPROGRESS:
            # Ask once more before watching the socket: on loopback (and wherever the answer
            # comes back within the call) the kernel has finished the handshake by the time
            # connect returns EINPROGRESS (it handles the SYN-ACK as the call releases the
            # socket), and the second connect reports the outcome: 0 once connected, the error
            # of a refusal, EALREADY while still connecting. That saves the epoll round of most
            # local checks (bench/checkers.py); a remote one pays one system call more.
            err = sock.connect_ex(address)
            if err == _EISCONN:
                err = 0
        self.started_without_task += 1
        if err == 0:
            # Connected: reset the connection and keep the socket for the next check (_Connects.recycle).
            if (
                _DISCONNECT is None
                or len(spare) >= MAX_SPARE_SOCKETS
                or _DISCONNECT(sock.fileno(), UNSPEC, UNSPEC_LEN) != 0
            ):
                connects.close_socket(sock, connected=True)
            else:
                spare.append(sock)
            done(token, CheckResult(_SUCCESS, "connected", self._wall(), self._clock() - started))
        elif err == _EALREADY:
            hc = target.health_check
            deadline = started + hc.timeout
            context = (target, sock, token, done, started)
            connects.add(sock, context)
            queue = self._deadlines.get(hc.timeout)
            if queue is None:
                queue = self._deadlines[hc.timeout] = deque()
            queue.append((deadline, None, context))
            if deadline + SWEEP_SLACK < self._sweep_at:
                self._schedule_sweep(deadline + SWEEP_SLACK)
        else:  # refused (failed) before the second ask
            connects.close_socket(sock, connected=False)
            done(token, self._connect_result(err, started))
        return True

    def _connect_result(self, err: int, started: float) -> CheckResult:
        if err == 0:
            return CheckResult(ResultKind.SUCCESS, "connected", self._wall(), self._clock() - started)
        reason = _os_reason(OSError(err, os.strerror(err)), "connect failed")
        kind = ResultKind.INCONCLUSIVE if err in OUT_OF_DESCRIPTORS else ResultKind.TCP_FAILURE
        return CheckResult(kind, reason, self._wall(), self._clock() - started)

    def _connect_ready(self, context: tuple[Any, ...], events: int) -> None:
        _, sock, token, done, started = context
        # Writable without an error or a hang-up is a finished connect: no SO_ERROR to ask for.
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) if events & _EPOLL_TROUBLE else 0
        connects = self._connects
        if connects is None:  # closed meanwhile
            sock.close()
        elif err == 0:
            connects.recycle(sock)
        else:
            connects.close_socket(sock, connected=False)
        done(token, self._connect_result(err, started))

    def _schedule_sweep(self, when: float) -> None:
        if self._sweep_handle is not None:
            self._sweep_handle.cancel()
        loop = asyncio.get_running_loop()
        # call_at takes the loop's clock; ours may be another (tests inject one), so go by delay.
        self._sweep_handle = loop.call_at(loop.time() + max(0.0, when - self._clock()), self._sweep)
        self._sweep_at = when

    def _answered(self, conn: Http1Connection, outcome: HttpResponse | BaseException) -> None:
        context = conn.context
        conn.context = None
        if not isinstance(context, tuple):
            return
        target, http, key, token, done, started = context
        if isinstance(outcome, BaseException):
            if isinstance(outcome, NothingReceived):
                # The server closed the pooled connection while it was idle: send the request
                # again on a fresh connection, as check() does (with a full timeout of its own).
                task = asyncio.get_running_loop().create_task(self._check_again(target, token, done))
                self._retries.add(task)
                task.add_done_callback(self._retries.discard)
                return
            kind, reason, status = self._http_error(outcome)
        else:
            self._pool.settle(key, conn, outcome, True, http.keepalive_requests)
            kind, reason, status = self._judge(http, outcome)
        done(token, CheckResult(kind, reason, self._wall(), self._clock() - started, status))

    async def _check_again(self, target: Target, token: Any, done: DoneCallback) -> None:
        done(token, await self.check(target))

    def _sweep(self) -> None:
        """Time out the checks started by start_check whose deadline passed; one timer for all."""
        self._sweep_handle = None
        self._sweep_at = math.inf
        now = self._clock()
        next_deadline = math.inf
        for timeout, queue in self._deadlines.items():
            while queue:
                deadline, conn, context = queue[0]
                if conn is None:  # a connect-only TCP check
                    sock = context[1]
                    if self._connects is None or not self._connects.pending(sock.fileno(), context):
                        queue.popleft()  # connected or failed already
                        continue
                elif conn.context is not context:  # answered already
                    queue.popleft()
                    continue
                if deadline > now:
                    next_deadline = min(next_deadline, deadline)
                    break
                queue.popleft()
                if conn is None:
                    assert self._connects is not None
                    self._connects.close_socket(sock, connected=False)
                else:
                    conn.context = None
                    conn.abandon()
                token, done, started = context[-3:]
                late = now - deadline - SWEEP_SLACK
                if late > max(OVERLOAD_MIN_LATENESS, timeout * OVERLOAD_LATENESS_SHARE):
                    result = CheckResult(
                        ResultKind.INCONCLUSIVE,
                        f"prober overloaded: timeout ran {round(late * 1000)}ms late",
                        self._wall(),
                        now - started,
                    )
                else:
                    result = CheckResult(ResultKind.TIMEOUT, timeout_reason(timeout), self._wall(), now - started)
                done(token, result)
        if next_deadline < math.inf and not self._closed:
            self._schedule_sweep(next_deadline + SWEEP_SLACK)

    @staticmethod
    def _http_error(exc: BaseException) -> tuple[ResultKind, str, int | None]:
        if isinstance(exc, OSError) and exc.errno in OUT_OF_DESCRIPTORS:
            return ResultKind.INCONCLUSIVE, _os_reason(exc, "prober"), None
        if isinstance(exc, HttpProtocolError):
            return ResultKind.HTTP_FAILURE, f"http protocol error: {exc}", None
        if isinstance(exc, ConnectionResetError):
            return ResultKind.TCP_FAILURE, _os_reason(exc, "") if exc.errno else "server disconnected", None
        if isinstance(exc, OSError):
            return ResultKind.TCP_FAILURE, _os_reason(exc, "connect failed"), None
        return ResultKind.TCP_FAILURE, f"check error: {type(exc).__name__}: {exc}", None

    # ------------------------------------------------------------------ HTTP as a coroutine

    async def _http(self, target: Target, http: HttpCheck) -> _Outcome:
        if http.https:
            return await self._https(target, http)
        key = (target.address, target.check_port)
        request = self._request(target, http, key)
        try:
            response = await self._pool.request(
                target.address,
                target.check_port,
                request,
                head_request=http.method == "HEAD",
                keepalive=http.keepalive,
                keepalive_requests=http.keepalive_requests,
                max_body=self._max_body,
            )
        except OSError as exc:  # ConnectionResetError: closed without an answer
            kind, reason, _ = self._http_error(exc)
            raise _Outcome(kind, reason) from None
        except HttpProtocolError as exc:
            raise _Outcome(ResultKind.HTTP_FAILURE, f"http protocol error: {exc}") from None
        kind, reason, status = self._judge(http, response)
        if kind is not ResultKind.SUCCESS:
            raise _Outcome(kind, reason, status)
        return _Outcome(kind, reason, status)

    async def _https(self, target: Target, http: HttpCheck) -> _Outcome:
        path, _, query = http.path.partition("?")
        url = URL.build(
            scheme="https" if http.https else "http",
            host=target.address,
            port=target.check_port,
            path=path,
            query_string=query,
            encoded=True,
        )
        headers: CIMultiDict[str] = CIMultiDict(http.headers)
        headers.setdefault("User-Agent", USER_AGENT)
        if http.host:
            headers["Host"] = http.host
        if not http.keepalive:
            headers["Connection"] = "close"
        server_hostname = None
        if http.https:
            server_hostname = http.sni or (http.host.rsplit(":", 1)[0] if http.host else None)
        acquired = _Acquired()
        token = _ACQUIRED.set(acquired)
        try:
            response = await self._http_session().request(
                http.method,
                url,
                headers=headers,
                data=http.body,
                ssl=self._ssl(http),
                server_hostname=server_hostname,
                allow_redirects=False,
            )
        except aiohttp.ClientConnectorCertificateError as exc:
            raise _Outcome(ResultKind.TCP_FAILURE, f"tls certificate: {exc.certificate_error}") from None
        except aiohttp.ClientSSLError as exc:
            raise _Outcome(ResultKind.TCP_FAILURE, f"tls: {exc.os_error}") from None
        except aiohttp.ClientConnectorError as exc:
            raise _Outcome(ResultKind.TCP_FAILURE, _os_reason(exc.os_error, "connect failed")) from None
        except aiohttp.ServerDisconnectedError:
            raise _Outcome(ResultKind.TCP_FAILURE, "server disconnected") from None
        except aiohttp.ClientOSError as exc:
            raise _Outcome(ResultKind.TCP_FAILURE, _os_reason(exc, "connection error")) from None
        except aiohttp.ClientResponseError as exc:
            raise _Outcome(ResultKind.HTTP_FAILURE, f"http protocol error: {exc.message}") from None
        except aiohttp.ClientError as exc:
            raise _Outcome(ResultKind.TCP_FAILURE, f"http error: {exc}") from None
        finally:
            _ACQUIRED.reset(token)

        protocol = acquired.protocol
        complete = False
        try:
            body, complete = await self._read_body(response)
        except (aiohttp.ClientError, OSError) as exc:
            raise _Outcome(ResultKind.TCP_FAILURE, f"http body: {exc or type(exc).__name__}") from None
        finally:
            self._settle_connection(response, protocol, http, reusable=complete)

        status = response.status
        if not any(lo <= status <= hi for lo, hi in http.expected_statuses):
            raise _Outcome(ResultKind.HTTP_FAILURE, f"http {status}", status)
        if http.expected_body is not None and http.expected_body.encode() not in body:
            raise _Outcome(ResultKind.HTTP_FAILURE, f"http {status} body mismatch", status)
        return _Outcome(ResultKind.SUCCESS, f"http {status}", status)

    def _settle_connection(
        self, response: aiohttp.ClientResponse, protocol: Any, http: HttpCheck, *, reusable: bool
    ) -> None:
        """Return the connection to the pool, or close it: no keep-alive, limit reached, body unread."""
        reuse = http.keepalive and reusable and protocol is not None
        if reuse:
            uses = self._uses.get(protocol, 0) + 1
            if http.keepalive_requests and uses >= http.keepalive_requests:
                reuse = False
            else:
                self._uses[protocol] = uses
        if reuse:
            response.release()
            return
        response.close()
        if protocol is not None:
            self._uses.pop(protocol, None)
            # The body may have ended already and put the connection back in the pool; closing
            # the transport makes the pool discard it instead of handing it out again.
            protocol.close()

    async def _read_body(self, response: aiohttp.ClientResponse) -> tuple[bytes, bool]:
        """Up to `max_body` bytes of the body, and whether that was all of it."""
        data = bytearray()
        while len(data) <= self._max_body:
            chunk = await response.content.read(self._max_body + 1 - len(data))
            if not chunk:
                return bytes(data), True
            data += chunk
        return bytes(data[: self._max_body]), False

    # ------------------------------------------------------------------ TCP

    async def _tcp(self, target: Target, tcp: TcpCheck, progress: _Progress) -> _Outcome:
        if not tcp.send and not tcp.receive:
            return await self._connect_only(target)
        try:
            reader, writer = await asyncio.open_connection(target.address, target.check_port)
        except OSError as exc:
            raise _Outcome(ResultKind.TCP_FAILURE, _os_reason(exc, "connect failed")) from None
        try:
            if tcp.send:
                writer.write(tcp.send)
                await writer.drain()
            if tcp.receive:
                buffer = progress.received
                # Envoy's rule: the expected bytes must appear somewhere in what the endpoint sends.
                while tcp.receive not in buffer:
                    chunk = await reader.read(4096)
                    if not chunk:
                        raise _Outcome(
                            ResultKind.TCP_FAILURE,
                            f"payload mismatch: expected {_snippet(tcp.receive)}, "
                            f"got {_snippet(bytes(buffer))} before close",
                        )
                    buffer += chunk
                    if len(buffer) > self._max_body:
                        raise _Outcome(
                            ResultKind.TCP_FAILURE,
                            f"payload mismatch: expected {_snippet(tcp.receive)} "
                            f"not in the first {self._max_body} bytes",
                        )
                return _Outcome(ResultKind.SUCCESS, "payload matched")
            return _Outcome(ResultKind.SUCCESS, "connected")
        except OSError as exc:
            raise _Outcome(ResultKind.TCP_FAILURE, _os_reason(exc, "connection error")) from None
        finally:
            # No wait_closed(): the verdict is in, and a slow close must not eat the timeout.
            writer.close()

    async def _connect_only(self, target: Target) -> _Outcome:
        # A bare non-blocking socket: no transport, protocol, reader and writer per check as with
        # asyncio.open_connection: half the CPU per check with the GC tuning (docs/benchmarks.md).
        # Endpoint addresses are IP literals (the topology refuses hostnames), so no resolver runs.
        family = socket.AF_INET6 if ":" in target.address else socket.AF_INET
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError as exc:
            raise _Outcome(ResultKind.INCONCLUSIVE, _os_reason(exc, "prober")) from None
        try:
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, (target.address, target.check_port))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        except OSError as exc:
            kind = ResultKind.INCONCLUSIVE if exc.errno in OUT_OF_DESCRIPTORS else ResultKind.TCP_FAILURE
            raise _Outcome(kind, _os_reason(exc, "connect failed")) from None
        finally:
            sock.close()
        return _Outcome(ResultKind.SUCCESS, "connected")

    # ------------------------------------------------------------------ gRPC

    def _grpc_channel(self, target: Target, hc: HealthCheck, check: GrpcCheck) -> Any:
        channel = self._channels.get(target)
        if channel is None:
            interval_ms = max(int(hc.interval * 1000), 100)
            options: list[tuple[str, Any]] = [
                # Our own connection per endpoint, not one shared through the global subchannel pool.
                ("grpc.use_local_subchannel_pool", 1),
                ("grpc.enable_retries", 0),
                ("grpc.initial_reconnect_backoff_ms", min(interval_ms, 1000)),
                ("grpc.min_reconnect_backoff_ms", min(interval_ms, 1000)),
                ("grpc.max_reconnect_backoff_ms", interval_ms),
            ]
            if check.authority:
                options.append(("grpc.default_authority", check.authority))
            address = f"{_host_literal(target.address)}:{target.check_port}"
            if check.tls:
                if check.sni:
                    options.append(("grpc.ssl_target_name_override", check.sni))
                channel = grpc.aio.secure_channel(address, self._credentials(check), options=options)
            else:
                channel = grpc.aio.insecure_channel(address, options=options)
            self._channels[target] = channel
        return channel

    def _credentials(self, check: GrpcCheck) -> grpc.ChannelCredentials:
        key = (check.ca_file, check.cert_file, check.key_file)
        credentials = self._grpc_credentials.get(key)
        if credentials is None:
            contents: dict[str, bytes | None] = {}
            for name, path in zip(("ca_file", "cert_file", "key_file"), key, strict=True):
                try:
                    contents[name] = None if path is None else Path(path).read_bytes()
                except OSError as exc:
                    # The prober's own files are missing: not the endpoint's fault, so count nothing.
                    reason = f"grpc tls: cannot read {name} {path}: {exc.strerror or exc}"
                    raise _Outcome(ResultKind.INCONCLUSIVE, reason) from None
            credentials = grpc.ssl_channel_credentials(
                root_certificates=contents["ca_file"],
                private_key=contents["key_file"],
                certificate_chain=contents["cert_file"],
            )
            self._grpc_credentials[key] = credentials
        return credentials

    async def _grpc(self, target: Target, hc: HealthCheck, check: GrpcCheck) -> _Outcome:
        channel = self._grpc_channel(target, hc, check)
        call = channel.unary_unary(
            GRPC_HEALTH_CHECK,
            request_serializer=encode_health_request,
            response_deserializer=decode_health_response,
        )
        try:
            status: int = await call(check.service, timeout=hc.timeout)
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            name = getattr(code, "name", str(code))
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                await self.release(target)
                raise _Outcome(ResultKind.TIMEOUT, timeout_reason(hc.timeout)) from None
            if code == grpc.StatusCode.UNAVAILABLE:
                await self.release(target)
                raise _Outcome(ResultKind.TCP_FAILURE, f"grpc {name}") from None
            raise _Outcome(ResultKind.HTTP_FAILURE, f"grpc {name}") from None
        except asyncio.CancelledError:
            # Cancelled by our own deadline (or shutdown): the channel may be mid-dial; start afresh.
            with contextlib.suppress(Exception):
                await asyncio.shield(self.release(target))
            raise
        name = GRPC_SERVING_STATUS.get(status, str(status))
        if status == 1:
            return _Outcome(ResultKind.SUCCESS, f"grpc {name}")
        return _Outcome(ResultKind.HTTP_FAILURE, f"grpc {name}")

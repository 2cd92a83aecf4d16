"""Checks started from callbacks (NetworkChecker.start_check): real sockets, the shared deadline sweep.

Keep-alive HTTP on pooled connections, and connect-only TCP through the checker's own epoll.
"""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from controlplane.topology.model import Cluster, Endpoint, HealthCheck, HttpCheck, Topology
from prober.checks import SWEEP_SLACK, NetworkChecker
from prober.events import NullSink
from prober.scheduler import Prober
from prober.state import CheckResult, ResultKind
from tests.prober.backends import LOCALHOST, HttpBackend, TcpBackend, closed_port, eventually
from tests.prober.test_checks import http_target, tcp_target


def start(checker: NetworkChecker, target: object) -> tuple[bool, asyncio.Future[CheckResult]]:
    future: asyncio.Future[CheckResult] = asyncio.get_running_loop().create_future()

    def done(token: asyncio.Future[CheckResult], result: CheckResult) -> None:
        assert not token.done(), "done called twice"
        token.set_result(result)

    return checker.start_check(target, future, done), future  # type: ignore[arg-type]


async def test_first_check_needs_a_connection_then_reuses_it(
    checker: NetworkChecker, http_backend: HttpBackend
) -> None:
    target = http_target(http_backend.port)
    started, _ = start(checker, target)
    assert not started  # no pooled connection yet: check() connects
    assert (await checker.check(target)).ok
    for _ in range(3):
        started, future = start(checker, target)
        assert started
        result = await asyncio.wait_for(future, 5)
        assert (result.kind, result.reason, result.http_status) == (ResultKind.SUCCESS, "http 200", 200)
        assert result.latency > 0
    assert http_backend.connections == 1 and len(http_backend.requests) == 4
    assert checker.started_without_task == 3


async def test_unexpected_status_is_an_http_failure(checker: NetworkChecker, http_backend: HttpBackend) -> None:
    target = http_target(http_backend.port)
    assert (await checker.check(target)).ok
    http_backend.status = 506
    started, future = start(checker, target)
    assert started
    result = await asyncio.wait_for(future, 5)
    assert (result.kind, result.reason, result.http_status) == (ResultKind.HTTP_FAILURE, "http 506", 506)


async def test_other_kinds_and_policies_take_the_coroutine_path(
    checker: NetworkChecker, http_backend: HttpBackend
) -> None:
    for target in (http_target(http_backend.port, keepalive=False), http_target(http_backend.port, https=True)):
        assert not start(checker, target)[0]


async def test_the_sweep_times_out_a_hanging_check(checker: NetworkChecker, http_backend: HttpBackend) -> None:
    assert (await checker.check(http_target(http_backend.port))).ok
    started, future = start(checker, http_target(http_backend.port, path="/hang", timeout=0.2))
    assert started
    result = await asyncio.wait_for(future, 5)
    assert (result.kind, result.reason) == (ResultKind.TIMEOUT, "timeout after 200ms")
    assert 0.2 <= result.latency < 0.2 + SWEEP_SLACK + 0.1
    # The connection with the unanswered request was closed, not pooled again.
    assert not start(checker, http_target(http_backend.port))[0]


async def test_a_sweep_run_late_by_a_busy_loop_is_inconclusive(
    checker: NetworkChecker, http_backend: HttpBackend
) -> None:
    assert (await checker.check(http_target(http_backend.port))).ok
    started, future = start(checker, http_target(http_backend.port, path="/hang", timeout=0.1))
    assert started
    time.sleep(0.4)  # the whole loop stalls, as under overload  # noqa: ASYNC251
    result = await asyncio.wait_for(future, 5)
    assert result.kind is ResultKind.INCONCLUSIVE and result.reason.startswith("prober overloaded")


async def test_a_stopped_server_is_seen_through_the_coroutine_path(
    checker: NetworkChecker, http_backend: HttpBackend
) -> None:
    target = http_target(http_backend.port)
    assert (await checker.check(target)).ok
    await http_backend.stop()
    # The pooled connection sees the server's close: it is not handed out again.
    await eventually(lambda: checker.pool.idle_open() == 0)
    assert not start(checker, target)[0]
    assert (await checker.check(target)).reason == "connect refused"


async def test_closing_with_a_check_in_flight_calls_nothing_back(http_backend: HttpBackend) -> None:
    checker = NetworkChecker()
    assert (await checker.check(http_target(http_backend.port))).ok
    started, future = start(checker, http_target(http_backend.port, path="/hang", timeout=5))
    assert started
    await checker.aclose()
    await asyncio.sleep(0.05)
    assert not future.done()


async def test_a_running_prober_checks_without_a_task_per_check(http_backend: HttpBackend) -> None:
    hc = HealthCheck(kind="http", http=HttpCheck(path="/livez"), interval=0.02, timeout=0.5)
    topology = Topology(clusters=(Cluster("web", (Endpoint(LOCALHOST, http_backend.port, health_check=hc),)),))
    checker = NetworkChecker()
    async with Prober(topology, sink=NullSink(), checker=checker):
        await eventually(lambda: checker.started_without_task >= 10)
    assert http_backend.connections == 1


# --------------------------------------------------------------------------- connect-only TCP


async def test_tcp_connect_only(checker: NetworkChecker) -> None:
    backend = await TcpBackend().start()
    try:
        for _ in range(3):
            started, future = start(checker, tcp_target(backend.port))
            assert started
            result = await asyncio.wait_for(future, 5)
            assert (result.kind, result.reason) == (ResultKind.SUCCESS, "connected")
        await eventually(lambda: backend.connections == 3)
    finally:
        await backend.stop()


async def test_tcp_connect_only_resets_the_connection_and_reuses_the_socket(checker: NetworkChecker) -> None:
    listener = socket.socket()
    listener.bind((LOCALHOST, 0))
    listener.listen(8)
    listener.settimeout(5)
    port = listener.getsockname()[1]
    try:
        for _ in range(3):
            started, future = start(checker, tcp_target(port))
            assert started
            result = await asyncio.wait_for(future, 5)
            assert (result.kind, result.reason) == (ResultKind.SUCCESS, "connected")
            accepted, _ = listener.accept()  # queued by the kernel: the handshake is complete
            with accepted, pytest.raises(ConnectionResetError):
                accepted.recv(1)  # a reset, not a FIN: no TIME_WAIT left behind on the prober
        assert checker.tcp_sockets_opened == 1  # one socket, disconnected and reconnected
        # A refused connect closes its socket; the next check makes a new one.
        started, future = start(checker, tcp_target(closed_port()))
        assert (await asyncio.wait_for(future, 5)).reason == "connect refused"
        started, future = start(checker, tcp_target(port))
        assert (await asyncio.wait_for(future, 5)).ok
        listener.accept()[0].close()
        assert checker.tcp_sockets_opened == 2
    finally:
        listener.close()


async def test_tcp_refused(checker: NetworkChecker) -> None:
    started, future = start(checker, tcp_target(closed_port()))
    assert started
    result = await asyncio.wait_for(future, 5)
    assert (result.kind, result.reason) == (ResultKind.TCP_FAILURE, "connect refused")


async def test_tcp_payload_checks_take_the_coroutine_path(checker: NetworkChecker) -> None:
    assert not start(checker, tcp_target(closed_port(), send=b"PING"))[0]


async def test_tcp_connect_that_hangs_times_out() -> None:
    # A listener that never accepts, with its backlog full: the next SYN is dropped and the
    # connect hangs, on 127.0.0.1 only.
    listener = socket.socket()
    listener.bind((LOCALHOST, 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    checker = NetworkChecker()
    try:
        for _ in range(4):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex((LOCALHOST, port))
            fillers.append(s)
        started, future = start(checker, tcp_target(port, timeout=0.2))
        assert started
        result = await asyncio.wait_for(future, 5)
        assert (result.kind, result.reason) == (ResultKind.TIMEOUT, "timeout after 200ms")
        assert 0.2 <= result.latency < 0.2 + SWEEP_SLACK + 0.1
    finally:
        await checker.aclose()
        for s in fillers:
            s.close()
        listener.close()

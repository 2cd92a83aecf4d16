"""The checks over real sockets: HTTP(S), TCP and gRPC health, timeouts, keep-alive reuse."""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest
from grpc_health.v1 import health_pb2

from controlplane.topology.model import GrpcCheck, HealthCheck, HttpCheck, TcpCheck
from prober.checks import NetworkChecker, decode_health_response, encode_health_request, timeout_reason
from prober.state import ResultKind, Target
from tests.prober.backends import (
    LOCALHOST,
    GrpcHealthBackend,
    HttpBackend,
    TcpBackend,
    closed_port,
    self_signed_cert,
)


def http_target(port: int, *, timeout: float = 1.0, hc_port: int | None = None, **http: object) -> Target:
    check = HttpCheck(**{"path": "/livez", **http})  # type: ignore[arg-type]
    return Target("web", LOCALHOST, port, HealthCheck(kind="http", http=check, timeout=timeout, port=hc_port))


def tcp_target(port: int, *, timeout: float = 1.0, send: bytes | None = None, receive: bytes | None = None) -> Target:
    return Target("db", LOCALHOST, port, HealthCheck(kind="tcp", tcp=TcpCheck(send, receive), timeout=timeout))


def grpc_target(
    port: int, *, service: str = "", authority: str | None = None, timeout: float = 1.0, interval: float = 0.1
) -> Target:
    hc = HealthCheck(kind="grpc", grpc=GrpcCheck(service, authority), timeout=timeout, interval=interval)
    return Target("api", LOCALHOST, port, hc)


# --------------------------------------------------------------------------- HTTP


async def test_http_success_carries_status_and_latency(checker: NetworkChecker, http_backend: HttpBackend) -> None:
    result = await checker.check(http_target(http_backend.port))
    assert result.kind is ResultKind.SUCCESS
    assert result.reason == "http 200"
    assert result.http_status == 200
    assert 0 < result.latency < 1
    assert result.time > 0


async def test_http_unexpected_status_is_an_http_failure(checker: NetworkChecker, http_backend: HttpBackend) -> None:
    http_backend.status = 506
    result = await checker.check(http_target(http_backend.port))
    assert (result.kind, result.reason, result.http_status) == (ResultKind.HTTP_FAILURE, "http 506", 506)


async def test_http_expected_status_ranges(checker: NetworkChecker, http_backend: HttpBackend) -> None:
    http_backend.status = 204
    only_200 = http_target(http_backend.port, expected_statuses=((200, 200),))
    assert (await checker.check(only_200)).reason == "http 204"
    assert not (await checker.check(only_200)).ok
    http_backend.status = 418
    teapot_ok = http_target(http_backend.port, expected_statuses=((200, 299), (418, 418)))
    assert (await checker.check(teapot_ok)).ok


async def test_http_expected_body_substring(checker: NetworkChecker, http_backend: HttpBackend) -> None:
    http_backend.body = "status: all good"
    assert (await checker.check(http_target(http_backend.port, expected_body="all good"))).ok
    result = await checker.check(http_target(http_backend.port, expected_body="ready"))
    assert (result.kind, result.reason) == (ResultKind.HTTP_FAILURE, "http 200 body mismatch")


async def test_http_sends_method_host_headers_and_body(checker: NetworkChecker, http_backend: HttpBackend) -> None:
    target = http_target(
        http_backend.port,
        path="/livez?probe=1",
        method="POST",
        host="web.internal",
        headers=(("X-Probe", "healthplane"),),
        body="ping",
    )
    assert (await checker.check(target)).ok
    seen = http_backend.requests[-1]
    assert (seen.method, seen.path, seen.body) == ("POST", "/livez?probe=1", b"ping")
    assert seen.headers["Host"] == "web.internal"
    assert seen.headers["X-Probe"] == "healthplane"
    assert seen.headers["User-Agent"] == "healthplane-prober"


async def test_http_check_port_overrides_the_serving_port(checker: NetworkChecker, http_backend: HttpBackend) -> None:
    target = http_target(closed_port(), hc_port=http_backend.port)
    assert target.check_port == http_backend.port
    assert (await checker.check(target)).ok


async def test_http_connect_refused_is_a_tcp_failure(checker: NetworkChecker) -> None:
    result = await checker.check(http_target(closed_port()))
    assert (result.kind, result.reason) == (ResultKind.TCP_FAILURE, "connect refused")


async def test_http_hang_past_timeout(checker: NetworkChecker, http_backend: HttpBackend) -> None:
    result = await checker.check(http_target(http_backend.port, path="/hang", timeout=0.2))
    assert (result.kind, result.reason) == (ResultKind.TIMEOUT, "timeout after 200ms")
    assert 0.2 <= result.latency < 1.0


async def test_http_large_body_is_bounded_and_not_reused(http_backend: HttpBackend) -> None:
    checker = NetworkChecker(max_body=1024)
    try:
        for _ in range(2):
            assert (await checker.check(http_target(http_backend.port, path="/big"))).ok
    finally:
        await checker.aclose()
    assert http_backend.connections == 2  # an unread body cannot share the connection


async def test_http_keepalive_reuses_one_connection(checker: NetworkChecker, http_backend: HttpBackend) -> None:
    target = http_target(http_backend.port)
    for _ in range(5):
        assert (await checker.check(target)).ok
    assert len(http_backend.requests) == 5
    assert http_backend.connections == 1


async def test_http_keepalive_requests_limit_per_connection(checker: NetworkChecker, http_backend: HttpBackend) -> None:
    target = http_target(http_backend.port, keepalive_requests=3)
    for _ in range(7):
        assert (await checker.check(target)).ok
    assert http_backend.connections == 3
    assert http_backend.requests_per_connection() == {1: 3, 2: 3, 3: 1}


async def test_http_keepalive_requests_one_is_a_connection_per_check(
    checker: NetworkChecker, http_backend: HttpBackend
) -> None:
    target = http_target(http_backend.port, keepalive_requests=1)
    for _ in range(3):
        assert (await checker.check(target)).ok
    assert http_backend.connections == 3


async def test_http_without_keepalive(checker: NetworkChecker, http_backend: HttpBackend) -> None:
    target = http_target(http_backend.port, keepalive=False)
    for _ in range(3):
        assert (await checker.check(target)).ok
    assert http_backend.connections == 3
    assert all(r.headers.get("Connection") == "close" for r in http_backend.requests)


async def test_http_keepalive_survives_a_server_restart(checker: NetworkChecker, http_backend: HttpBackend) -> None:
    target = http_target(http_backend.port)
    assert (await checker.check(target)).ok
    port = http_backend.port
    await http_backend.stop()
    assert (await checker.check(target)).reason == "connect refused"
    restarted = await HttpBackend().start(port)
    try:
        assert (await checker.check(target)).ok
    finally:
        await restarted.stop()


@pytest.fixture
def tls_files(tmp_path: Path) -> tuple[Path, Path]:
    files = self_signed_cert(tmp_path)
    if files is None:
        pytest.skip("needs the openssl CLI")
    return files


@pytest.fixture
async def https_backend(tls_files: tuple[Path, Path]) -> AsyncIterator[tuple[HttpBackend, list[str | None]]]:
    server_names: list[str | None] = []

    def remember(sslobj: ssl.SSLObject, name: str | None, ctx: ssl.SSLContext) -> None:
        server_names.append(name)

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*tls_files)
    context.sni_callback = remember
    backend = await HttpBackend(ssl_context=context).start()
    try:
        yield backend, server_names
    finally:
        await backend.stop()


async def test_https_with_sni_and_verification_off(
    checker: NetworkChecker, https_backend: tuple[HttpBackend, list[str | None]]
) -> None:
    backend, server_names = https_backend
    target = http_target(backend.port, https=True, sni="backend.test", verify_tls=False)
    result = await checker.check(target)
    assert result.ok, result.reason
    assert server_names == ["backend.test"]


async def test_https_sni_defaults_to_the_host_header(
    checker: NetworkChecker, https_backend: tuple[HttpBackend, list[str | None]]
) -> None:
    backend, server_names = https_backend
    target = http_target(backend.port, https=True, host="backend.test:8443", verify_tls=False)
    assert (await checker.check(target)).ok
    assert server_names == ["backend.test"]
    assert backend.requests[-1].headers["Host"] == "backend.test:8443"


async def test_https_untrusted_certificate_fails_when_verifying(
    checker: NetworkChecker, https_backend: tuple[HttpBackend, list[str | None]]
) -> None:
    backend, _ = https_backend
    result = await checker.check(http_target(backend.port, https=True, sni="backend.test"))
    assert result.kind is ResultKind.TCP_FAILURE
    assert result.reason.startswith("tls")


# --------------------------------------------------------------------------- TCP


async def test_tcp_connect_only(checker: NetworkChecker) -> None:
    backend = await TcpBackend().start()
    try:
        result = await checker.check(tcp_target(backend.port))
        assert (result.kind, result.reason) == (ResultKind.SUCCESS, "connected")
    finally:
        await backend.stop()


async def test_tcp_stopped_listener_is_connect_refused(checker: NetworkChecker) -> None:
    backend = await TcpBackend().start()
    assert (await checker.check(tcp_target(backend.port))).ok
    await backend.stop()
    result = await checker.check(tcp_target(backend.port))
    assert (result.kind, result.reason) == (ResultKind.TCP_FAILURE, "connect refused")


async def test_tcp_send_and_expect_payload(checker: NetworkChecker) -> None:
    backend = await TcpBackend(reply=lambda data: b"+PONG\r\n" if data == b"PING\r\n" else b"-ERR\r\n").start()
    try:
        ok = await checker.check(tcp_target(backend.port, send=b"PING\r\n", receive=b"PONG"))
        assert (ok.kind, ok.reason) == (ResultKind.SUCCESS, "payload matched")
        bad = await checker.check(tcp_target(backend.port, send=b"HELLO\r\n", receive=b"PONG"))
        assert bad.kind is ResultKind.TCP_FAILURE
        assert bad.reason == "payload mismatch: expected b'PONG', got b'-ERR\\r\\n' before close"
    finally:
        await backend.stop()


async def test_tcp_wrong_payload_on_an_open_connection_is_a_mismatch_not_a_timeout(
    checker: NetworkChecker,
) -> None:
    backend = await TcpBackend(reply=lambda data: b"NOPE", close_after_reply=False).start()
    try:
        result = await checker.check(tcp_target(backend.port, send=b"PING", receive=b"PONG", timeout=0.2))
        assert result.kind is ResultKind.TCP_FAILURE
        assert result.reason == "payload mismatch: expected b'PONG', got b'NOPE'"
    finally:
        await backend.stop()


async def test_tcp_silent_backend_times_out(checker: NetworkChecker) -> None:
    backend = await TcpBackend(reply=lambda data: None).start()
    try:
        target = tcp_target(backend.port, send=b"PING", receive=b"PONG", timeout=0.15)
        # On a loaded machine the 150 ms timer itself may fire late, which is INCONCLUSIVE by design
        # (tested below); try again then, so that what is checked here is the plain TIMEOUT.
        for _ in range(5):
            result = await checker.check(target)
            if result.kind is not ResultKind.INCONCLUSIVE:
                break
        assert (result.kind, result.reason) == (ResultKind.TIMEOUT, "timeout after 150ms")
    finally:
        await backend.stop()


# --------------------------------------------------------------------------- gRPC


async def test_grpc_serving(checker: NetworkChecker, grpc_backend: GrpcHealthBackend) -> None:
    result = await checker.check(grpc_target(grpc_backend.port))
    assert (result.kind, result.reason) == (ResultKind.SUCCESS, "grpc SERVING")


async def test_grpc_not_serving_and_back(checker: NetworkChecker, grpc_backend: GrpcHealthBackend) -> None:
    await grpc_backend.set("orders", serving=False)
    target = grpc_target(grpc_backend.port, service="orders")
    result = await checker.check(target)
    assert (result.kind, result.reason) == (ResultKind.HTTP_FAILURE, "grpc NOT_SERVING")
    await grpc_backend.set("orders", serving=True)
    assert (await checker.check(target)).reason == "grpc SERVING"


async def test_grpc_unknown_service_is_not_found(checker: NetworkChecker, grpc_backend: GrpcHealthBackend) -> None:
    result = await checker.check(grpc_target(grpc_backend.port, service="nope"))
    assert (result.kind, result.reason) == (ResultKind.HTTP_FAILURE, "grpc NOT_FOUND")


async def test_grpc_with_authority(checker: NetworkChecker, grpc_backend: GrpcHealthBackend) -> None:
    assert (await checker.check(grpc_target(grpc_backend.port, authority="api.internal"))).ok


async def test_grpc_unreachable_then_back_without_backoff(checker: NetworkChecker) -> None:
    backend = await GrpcHealthBackend().start()
    port = backend.port
    target = grpc_target(port, interval=30.0)  # allows gRPC reconnect backoff of 1 s and more
    assert (await checker.check(target)).ok
    await backend.stop()
    result = await checker.check(target)
    assert (result.kind, result.reason) == (ResultKind.TCP_FAILURE, "grpc UNAVAILABLE")
    # A reconnect backoff would keep failing for a second or more; the check must dial again now.
    backend = await GrpcHealthBackend().start(port)
    try:
        loop = asyncio.get_running_loop()
        started = loop.time()
        assert (await checker.check(target)).ok
        assert loop.time() - started < 0.5
    finally:
        await backend.stop()


def tls_grpc_target(port: int, **tls: object) -> Target:
    hc = HealthCheck(kind="grpc", grpc=GrpcCheck(tls=True, **tls), timeout=2.0, interval=0.1)  # type: ignore[arg-type]
    return Target("api", LOCALHOST, port, hc)


async def test_grpc_over_tls_verified_by_ca_file_and_sni(checker: NetworkChecker, tls_files: tuple[Path, Path]) -> None:
    cert, _ = tls_files
    backend = await GrpcHealthBackend(tls=tls_files).start()
    try:
        ok = await checker.check(tls_grpc_target(backend.port, ca_file=str(cert), sni="backend.test"))
        assert (ok.kind, ok.reason) == (ResultKind.SUCCESS, "grpc SERVING")
        # The same server checked in plain text, or without its CA, is down: no silent fallback.
        plain = await checker.check(grpc_target(backend.port, timeout=2.0))
        assert plain.kind is ResultKind.TCP_FAILURE
        unverified = await checker.check(tls_grpc_target(backend.port, sni="backend.test"))
        assert (unverified.kind, unverified.reason) == (ResultKind.TCP_FAILURE, "grpc UNAVAILABLE")
    finally:
        await backend.stop()


async def test_grpc_mutual_tls_presents_the_client_certificate(
    checker: NetworkChecker, tls_files: tuple[Path, Path], tmp_path: Path
) -> None:
    server_cert, _ = tls_files
    (tmp_path / "client").mkdir()
    client = self_signed_cert(tmp_path / "client", name="prober.test")
    assert client is not None  # tls_files already skipped the test without openssl
    client_cert, client_key = client
    backend = await GrpcHealthBackend(tls=tls_files, client_ca=client_cert).start()
    try:
        target = tls_grpc_target(
            backend.port,
            ca_file=str(server_cert),
            sni="backend.test",
            cert_file=str(client_cert),
            key_file=str(client_key),
        )
        assert (await checker.check(target)).ok
        anonymous = await checker.check(tls_grpc_target(backend.port, ca_file=str(server_cert), sni="backend.test"))
        assert anonymous.kind is ResultKind.TCP_FAILURE
    finally:
        await backend.stop()


async def test_grpc_tls_files_missing_is_inconclusive(checker: NetworkChecker, tmp_path: Path) -> None:
    # The prober's own configuration is broken, not the endpoint: the check counts neither way.
    missing = tmp_path / "nope.pem"
    result = await checker.check(tls_grpc_target(closed_port(), ca_file=str(missing)))
    assert result.kind is ResultKind.INCONCLUSIVE
    assert result.reason == f"grpc tls: cannot read ca_file {missing}: No such file or directory"


async def test_grpc_slow_server_times_out(checker: NetworkChecker) -> None:
    backend = await GrpcHealthBackend(slow=5.0).start()
    try:
        result = await checker.check(grpc_target(backend.port, timeout=0.3))
        assert (result.kind, result.reason) == (ResultKind.TIMEOUT, "timeout after 300ms")
    finally:
        await backend.stop()


async def test_grpc_reuses_one_channel_per_target(checker: NetworkChecker, grpc_backend: GrpcHealthBackend) -> None:
    target = grpc_target(grpc_backend.port)
    await checker.check(target)
    channel = checker._channels[target]
    await checker.check(target)
    assert checker._channels[target] is channel
    await checker.release(target)
    assert target not in checker._channels


def test_health_codec_matches_the_real_protos() -> None:
    for service in ("", "orders", "ünïcode/" + "x" * 300):
        ours = encode_health_request(service)
        assert health_pb2.HealthCheckRequest.FromString(ours).service == service
        assert ours == health_pb2.HealthCheckRequest(service=service).SerializeToString()
    for status in (0, 1, 2, 3):
        data = health_pb2.HealthCheckResponse(status=status).SerializeToString()
        assert decode_health_response(data) == status
    # Unknown fields of every wire type are skipped.
    extra = b"\x10\x05" + b"\x19" + b"\x00" * 8 + b"\x22\x02ab" + b"\x2d" + b"\x00" * 4 + b"\x08\x02"
    assert decode_health_response(extra) == 2
    with pytest.raises(ValueError):
        decode_health_response(b"\x08")


def test_timeout_reason() -> None:
    assert timeout_reason(0.5) == "timeout after 500ms"
    assert timeout_reason(1.0) == "timeout after 1000ms"
    assert timeout_reason(0.05) == "timeout after 50ms"


async def test_closed_checker_refuses_checks(http_backend: HttpBackend) -> None:
    checker = NetworkChecker()
    await checker.aclose()
    await checker.aclose()
    with pytest.raises(RuntimeError):
        await checker.check(http_target(http_backend.port))


async def test_policy_change_is_a_new_target() -> None:
    a = http_target(80)
    b = Target(a.cluster, a.address, a.port, replace(a.health_check, interval=1.0))
    assert a != b and a.id == b.id


async def test_timeout_run_late_by_a_busy_loop_is_inconclusive(
    checker: NetworkChecker, http_backend: HttpBackend
) -> None:
    # A loop too busy to run the deadline on time may also have left the answer unread: the
    # prober cannot tell, so the result counts neither way (not a false "timeout").
    check = asyncio.create_task(checker.check(http_target(http_backend.port, path="/hang", timeout=0.1)))
    await asyncio.sleep(0.01)  # the request is out
    time.sleep(0.4)  # the whole loop stalls, as under overload  # noqa: ASYNC251
    result = await check
    assert result.kind is ResultKind.INCONCLUSIVE
    assert result.reason.startswith("prober overloaded: timeout ran ") and result.reason.endswith("ms late")
    # The same hang with an idle loop is a plain timeout.
    result = await checker.check(http_target(http_backend.port, path="/hang", timeout=0.1))
    assert (result.kind, result.reason) == (ResultKind.TIMEOUT, "timeout after 100ms")

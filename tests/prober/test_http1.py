"""The lean HTTP/1.1 check client: framing rules as pure parser tests, pooling over real sockets."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from prober.http1 import Http1Pool, HttpProtocolError, ResponseParser, build_request


def parse(data: bytes, *, head_request: bool = False, max_body: int = 1024, eof: bool = False) -> ResponseParser:
    parser = ResponseParser(head_request=head_request, max_body=max_body)
    done = parser.feed(data)
    if eof and not done:
        assert parser.eof()
    return parser


def test_content_length_body() -> None:
    p = parse(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nOK")
    assert p.done and p.response().status == 200 and p.response().body == b"OK"
    assert p.response().keep_alive and p.response().complete


def test_chunked_body_with_extensions_and_trailers() -> None:
    raw = b"HTTP/1.1 503 Busy\r\nTransfer-Encoding: chunked\r\n\r\n4;ext=1\r\nWiki\r\n5\r\npedia\r\n0\r\nX-T: 1\r\n\r\n"
    r = parse(raw).response()
    assert (r.status, r.body, r.keep_alive) == (503, b"Wikipedia", True)


@given(st.lists(st.integers(min_value=1, max_value=7), min_size=1, max_size=60))
def test_any_split_of_the_bytes_gives_the_same_response(cuts: list[int]) -> None:
    raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX: y\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    parser = ResponseParser()
    pos, done = 0, False
    for cut in cuts * 20:
        if pos >= len(raw):
            break
        done = parser.feed(raw[pos : pos + cut])
        pos += cut
    done = done or parser.feed(raw[pos:])
    assert done and parser.response().body == b"abcde"


def test_body_delimited_by_close() -> None:
    p = parse(b"HTTP/1.1 200 OK\r\n\r\nsome body", eof=True)
    assert p.response().body == b"some body" and not p.response().keep_alive


def test_head_and_no_body_statuses() -> None:
    assert parse(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n", head_request=True).done
    assert parse(b"HTTP/1.1 204 No Content\r\n\r\n").done
    assert parse(b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n").done


def test_interim_responses_are_skipped() -> None:
    r = parse(
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early\r\nLink: x\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
    )
    assert r.response().status == 200


def test_keep_alive_defaults_per_version() -> None:
    assert not parse(b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n").response().keep_alive
    assert parse(b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n").response().keep_alive
    assert not parse(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n").response().keep_alive


def test_body_longer_than_max_body_is_bounded_and_incomplete() -> None:
    r = parse(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n0123456789", max_body=4).response()
    assert r.body == b"01234" and not r.complete


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"SSH-2.0-OpenSSH\r\n\r\n", "bad status line"),
        (b"HTTP/1.1 2x0 OK\r\n\r\n", "bad status line"),
        (b"HTTP/1.1 2\xb90 OK\r\n\r\n", "bad status line"),  # latin-1 superscript one: isdigit(), not int()
        (b"HTTP/1.1 200 OK\r\nContent-Length: \xb9\r\n\r\n", "bad Content-Length"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "bad Content-Length"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", "bad Content-Length"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", "unsupported Transfer-Encoding"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "bad chunk size"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nabc", "chunk not followed by CRLF"),
        (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", "bad header line"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nab", "data after the end"),
        (b"HTTP/1.1 101 Switching\r\n\r\n", "101"),
    ],
)
def test_malformed_responses_are_protocol_errors(raw: bytes, message: str) -> None:
    with pytest.raises(HttpProtocolError, match=message):
        parse(raw)


def test_endless_head_is_refused() -> None:
    with pytest.raises(HttpProtocolError, match="longer than"):
        parse(b"HTTP/1.1 200 OK\r\n" + b"X: " + b"a" * 70_000)


def test_build_request() -> None:
    assert build_request("GET", "/livez", "h:1", (), None, close=False) == (
        b"GET /livez HTTP/1.1\r\nHost: h:1\r\nUser-Agent: healthplane-prober\r\n\r\n"
    )
    raw = build_request("POST", "/c?x=1", "h", (("Host", "vh"), ("X-A", "b")), b"hi", close=True)
    assert raw == b"POST /c?x=1 HTTP/1.1\r\nUser-Agent: healthplane-prober\r\nHost: vh\r\nX-A: b\r\n" + (
        b"Content-Length: 2\r\nConnection: close\r\n\r\nhi"
    )


# --------------------------------------------------------------------------- over real sockets

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Handler], Awaitable[int]]]:
    servers: list[asyncio.Server] = []

    async def start(handler: Handler) -> int:
        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        servers.append(server)
        return int(server.sockets[0].getsockname()[1])

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


async def read_request(reader: asyncio.StreamReader) -> bytes:
    return await reader.readuntil(b"\r\n\r\n")


async def test_idle_connection_closed_by_the_server_is_retried_on_a_fresh_one(
    serve: Callable[[Handler], Awaitable[int]],
) -> None:
    connections = 0

    async def one_request_per_connection_without_saying_so(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await read_request(r)
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nOK")
        await w.drain()
        w.close()  # closes after answering, as an idle timeout would, without Connection: close

    port = await serve(one_request_per_connection_without_saying_so)
    pool = Http1Pool()
    request = build_request("GET", "/", "h", (), None, close=False)
    for _ in range(3):
        await asyncio.sleep(0.01)  # let the close arrive, or not: both paths must succeed
        assert (await pool.request("127.0.0.1", port, request)).status == 200
    assert connections == 3
    pool.close()


async def test_fresh_connection_closed_without_an_answer_is_an_error(
    serve: Callable[[Handler], Awaitable[int]],
) -> None:
    async def hang_up(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)
        w.close()

    port = await serve(hang_up)
    with pytest.raises(ConnectionResetError, match="server disconnected"):
        await Http1Pool().request("127.0.0.1", port, build_request("GET", "/", "h", (), None, close=False))


async def test_response_cut_short_is_a_protocol_error(serve: Callable[[Handler], Awaitable[int]]) -> None:
    async def cut(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        await w.drain()
        w.close()

    port = await serve(cut)
    with pytest.raises(HttpProtocolError, match="closed in the middle"):
        await Http1Pool().request("127.0.0.1", port, build_request("GET", "/", "h", (), None, close=False))


async def test_keepalive_requests_limit_and_idle_timeout(serve: Callable[[Handler], Awaitable[int]]) -> None:
    connections = 0
    now = [0.0]

    async def keep_alive(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        while True:
            try:
                await read_request(r)
            except asyncio.IncompleteReadError:
                return
            w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nOK\r\n0\r\n\r\n")
            await w.drain()

    port = await serve(keep_alive)
    pool = Http1Pool(keepalive_timeout=10, clock=lambda: now[0])
    request = build_request("GET", "/", "h", (), None, close=False)
    for _ in range(4):
        await pool.request("127.0.0.1", port, request, keepalive_requests=2)
    assert connections == 2
    now[0] = 11.0  # idle longer than keepalive_timeout: not reused
    await pool.request("127.0.0.1", port, request)
    assert connections == 3 and len(pool) == 1
    pool.release("127.0.0.1", port)
    assert len(pool) == 0

"""The demo app over real sockets: pages, health endpoints, counters and the CLI."""

from __future__ import annotations

import asyncio
import socket
import sys
from collections.abc import AsyncIterator

import aiohttp
import pytest

from lab.demoapp import DemoApp, create_app


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        yield session


async def get(http: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    async with http.get(url) as resp:
        return resp.status, await resp.text()


async def post(http: aiohttp.ClientSession, url: str, data: dict[str, str]) -> tuple[int, str]:
    async with http.post(url, data=data) as resp:
        return resp.status, await resp.text()


async def test_root_reports_peer_name_and_local_ip(demo: DemoApp, http: aiohttp.ClientSession) -> None:
    async with http.get(f"{demo.url}/", headers={"X-Forwarded-For": "10.9.8.7"}) as resp:
        assert resp.status == 200
        assert resp.content_type == "text/plain"
        body = await resp.text()
    # The socket peer, not the forwarded header.
    assert body == "demoapp !! ClientIP: 127.0.0.1, ServerName: demo-1, ServerIP: 127.0.0.1\n"
    assert await get(http, f"{demo.url}/hostname") == (200, "ServerName: demo-1\n")
    assert demo.served == 1


async def test_start_returns_the_bound_port(http: aiohttp.ClientSession) -> None:
    app = DemoApp("p")
    port = await app.start("127.0.0.1", 0)
    try:
        assert port == app.port != 0
        assert (await get(http, f"http://127.0.0.1:{port}/hostname"))[0] == 200
    finally:
        await app.stop()
        await app.stop()  # twice is fine
    with pytest.raises(aiohttp.ClientConnectionError):
        await get(http, f"http://127.0.0.1:{port}/hostname")


async def test_restart_on_the_same_port_keeps_state(http: aiohttp.ClientSession) -> None:
    app = DemoApp("r")
    port = await app.start()
    try:
        await get(http, f"{app.url}/")
        app.state.readyz = "FAIL"
        await app.stop()
        with pytest.raises(aiohttp.ClientConnectionError):
            await get(http, f"http://127.0.0.1:{port}/")
        assert await app.start(port=port) == port
        assert await get(http, f"{app.url}/readyz") == (507, "FAIL")
        await get(http, f"{app.url}/")
        assert app.served == 2
    finally:
        await app.stop()


async def test_livez_fails_with_506_until_set_back(demo: DemoApp, http: aiohttp.ClientSession) -> None:
    url = f"{demo.url}/livez"
    assert await get(http, url) == (200, "OK")
    assert await post(http, url, {"livez": "FAIL"}) == (200, "FAIL")
    assert await get(http, url) == (506, "FAIL")
    # readyz is independent
    assert await get(http, f"{demo.url}/readyz") == (200, "OK")
    assert await post(http, url, {"livez": "OK"}) == (200, "OK")
    assert await get(http, url) == (200, "OK")


async def test_readyz_fails_with_507(demo: DemoApp, http: aiohttp.ClientSession) -> None:
    url = f"{demo.url}/readyz"
    assert await post(http, url, {"readyz": "warming up"}) == (200, "warming up")
    assert await get(http, url) == (507, "warming up")
    assert await get(http, f"{demo.url}/livez") == (200, "OK")


@pytest.mark.parametrize("path", ["livez", "readyz"])
async def test_post_without_field_is_400(demo: DemoApp, http: aiohttp.ClientSession, path: str) -> None:
    status, body = await post(http, f"{demo.url}/{path}", {"other": "x"})
    assert status == 400
    assert f"missing form field '{path}'" in body
    status, _ = await post(http, f"{demo.url}/{path}", {path: ""})
    assert status == 400
    assert await get(http, f"{demo.url}/{path}") == (200, "OK")


async def test_counters_and_configs(demo: DemoApp, http: aiohttp.ClientSession) -> None:
    for _ in range(3):
        await get(http, f"{demo.url}/livez")
    await get(http, f"{demo.url}/readyz")
    await get(http, f"{demo.url}/")
    await get(http, f"{demo.url}/")
    await post(http, f"{demo.url}/readyz", {"readyz": "DOWN"})  # a POST is not a probe
    assert demo.health_checks == {"/livez": 3, "/readyz": 1}
    assert demo.served == 2
    async with http.get(f"{demo.url}/configs") as resp:
        assert resp.status == 200
        configs = await resp.json()
    assert configs == {
        "name": "demo-1",
        "host": "127.0.0.1",
        "port": demo.port,
        "livez": "OK",
        "readyz": "DOWN",
        "served": 2,
        "health_checks": {"/livez": 3, "/readyz": 1},
    }


async def test_name_defaults_to_hostname() -> None:
    async with DemoApp() as app:
        assert app.name == socket.gethostname()
    assert create_app("n").router is not None


async def test_cli_serves_until_terminated(http: aiohttp.ClientSession) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "lab.demoapp", "--port", "0", "--name", "cli-1",
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 10)).decode()
        assert line.startswith("demoapp cli-1 listening on http://127.0.0.1:")
        url = line.split()[-1]
        assert await get(http, f"{url}/hostname") == (200, "ServerName: cli-1\n")
        proc.terminate()
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()

"""Passive health from real traffic (issue 15): real Envoys log their requests to healthplane.

Backends answer their health path (/livez) while `/` fails (500s, hangs, refused connections);
what one Envoy sees takes the endpoint out of every Envoy, through EDS.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from lab.envoyproc import EnvoyProcess, free_port, poll_until
from tests.conftest import Lab
from tests.integration.test_central_prober import wait_envoy_flag

pytestmark = pytest.mark.envoy


class Backend:
    """An HTTP backend whose `/` answers as told ("ok", "500", "alternate", "hang"); /livez always 200."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.mode = "ok"
        self.port = 0
        self.served: collections.Counter[int] = collections.Counter()
        self._n = 0
        self._runner: web.AppRunner | None = None

    async def _root(self, _request: web.Request) -> web.Response:
        self._n += 1
        if self.mode == "hang":
            await asyncio.sleep(5)
        status = 500 if self.mode == "500" or (self.mode == "alternate" and self._n % 2 == 0) else 200
        self.served[status] += 1
        return web.Response(text=f"ServerName: {self.name}\n", status=status)

    async def _livez(self, _request: web.Request) -> web.Response:
        return web.Response(text="OK")

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/", self._root)
        app.router.add_get("/livez", self._livez)
        self._runner = web.AppRunner(app, shutdown_timeout=0.1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True)
        await site.start()
        if not self.port:
            self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


@pytest.fixture
async def flaky() -> AsyncIterator[list[Backend]]:
    apps = [Backend(f"b{i}") for i in (1, 2, 3)]
    for app in apps:
        await app.start()
    try:
        yield apps
    finally:
        for app in apps:
            await app.stop()


ACTIVE = {
    "http": {"path": "/livez"},
    "interval": "100ms",
    "timeout": "80ms",
    "healthy_threshold": 2,
    "unhealthy_threshold": 2,
}


def topology(
    backends: list[Backend], ports: list[int], passive: dict[str, Any], *, active: bool = True, timeout: str = "2s"
) -> dict[str, Any]:
    """Cluster `web` with passive checks behind one listener per front Envoy (node clusters front-N)."""
    cluster: dict[str, Any] = {
        "name": "web",
        "endpoints": [{"address": "127.0.0.1", "port": b.port} for b in backends],
        "passive": passive,
    }
    if active:
        cluster["health_check"] = ACTIVE
    return {
        "controlplane": {"xds": {"port": 0}, "admin": {"port": 0}, "watch_interval": "100ms"},
        "clusters": [cluster],
        "listeners": [
            {
                "name": f"ingress-{i}",
                "address": "127.0.0.1",
                "port": port,
                "nodes": [f"front-{i}"],
                "routes": [{"prefix": "/", "cluster": "web", "timeout": timeout}],
            }
            for i, port in enumerate(ports, 1)
        ],
    }


async def endpoint(lab: Lab, port: int) -> dict[str, Any]:
    _, rows = await lab.admin("GET", "/endpoints")
    items = rows["endpoints"] if isinstance(rows, dict) else rows
    return next(dict(r) for r in items if r["port"] == port)


async def wait_endpoint(lab: Lab, port: int, status: str, source: str | None = None) -> Any:
    async def probe() -> dict[str, Any] | None:
        row = await endpoint(lab, port)
        ok = row["status"] == status and (source is None or row["source"] == source)
        return row if ok else None

    return await poll_until(probe, timeout=10, what=f"port {port} {status} ({source or 'any source'})")


async def start(lab: Lab, document: dict[str, Any], n_envoys: int) -> list[EnvoyProcess]:
    lab.embedded_prober = any("health_check" in c for c in document["clusters"])
    await lab.start_control_plane(document)
    return [await lab.start_envoy(f"front-{i}", f"front-{i}") for i in range(1, n_envoys + 1)]


async def get(session: aiohttp.ClientSession, port: int) -> tuple[int, str]:
    async with session.get(f"http://127.0.0.1:{port}/") as response:
        return response.status, await response.text()


async def send_until(lab: Lab, port: int, done: Any, limit: int = 400) -> int:
    """Requests one at a time through `port` until `done()` is true; how many were sent."""
    for n in range(1, limit + 1):
        await get(lab.session, port)
        if await done():
            return n
    raise AssertionError(f"not done after {limit} requests")


async def test_errors_seen_by_one_envoy_take_the_endpoint_out_of_both(lab: Lab, flaky: list[Backend]) -> None:
    ports = [free_port(), free_port()]
    passive = {"unhealthy": {"http_statuses": [500, 502, 503], "http_failures": 3}, "eject_for": "3s"}
    e1, e2 = await start(lab, topology(flaky, ports, passive), 2)
    assert lab.cp is not None
    for b in flaky:
        await wait_endpoint(lab, b.port, "HEALTHY")
    bad = flaky[0]
    bad.mode = "500"  # /livez stays 200: the active check alone never sees it

    async def ejected() -> bool:
        return (await endpoint(lab, bad.port))["source"] == "passive"

    await send_until(lab, ports[0], ejected)  # traffic through front-1 only
    row = await wait_endpoint(lab, bad.port, "UNHEALTHY", "passive")
    assert "3 consecutive HTTP failures (500 x3) seen by front-1 (3)" in row["reason"], row
    assert bad.served[500] >= 3  # and the few sent before the verdict reached front-1
    for envoy in (e1, e2):
        await wait_envoy_flag(envoy, bad.port, present=True)
    served = sum(bad.served.values())
    for port in ports:
        seen = collections.Counter([(await get(lab.session, port))[0] for _ in range(20)])
        assert seen == {200: 20}, seen
    assert sum(bad.served.values()) == served  # requests after both ACKed avoid it

    _, events = await lab.admin("GET", "/events?kind=health")
    down = [e for e in events["events"] if e["endpoint"] == f"127.0.0.1:{bad.port}" and e["new"] == "UNHEALTHY"]
    assert down and down[-1]["source"] == "passive", down
    metrics = await (await lab.session.get(f"http://127.0.0.1:{lab.cp.admin_port}/metrics")).text()
    assert "healthplane_passive_ejections_total 1.0" in metrics
    assert 'healthplane_passive_ejected{cluster="web"} 1.0' in metrics
    _, status = await lab.admin("GET", "/status?format=json")
    [server] = [s for s in status["servers"]["server"] if s["name"] == f"127.0.0.1:{bad.port}"]
    assert server["reason"] == row["reason"] and server["up"] == "down"

    bad.mode = "ok"  # the hold ends after 3 s; the prober's passes bring it back
    row = await wait_endpoint(lab, bad.port, "HEALTHY")
    assert "passive ejection over after 3s" in row["reason"], row
    for envoy in (e1, e2):
        await wait_envoy_flag(envoy, bad.port, present=False)


async def test_timeouts_and_connection_failures(lab: Lab, flaky: list[Backend]) -> None:
    port = free_port()
    passive = {"unhealthy": {"http_failures": 0, "tcp_failures": 2, "timeouts": 2}, "eject_for": "30s"}
    [envoy] = await start(lab, topology(flaky, [port], passive, active=False, timeout="300ms"), 1)
    hangs, refuses = flaky[0], flaky[1]
    hangs.mode = "hang"
    await refuses.stop()  # connection refused from now on

    async def both() -> bool:
        rows = [await endpoint(lab, b.port) for b in (hangs, refuses)]
        return all(r["source"] == "passive" for r in rows)

    await send_until(lab, port, both, limit=100)
    hung = await endpoint(lab, hangs.port)
    refused = await endpoint(lab, refuses.port)
    assert hung["status"] == "UNHEALTHY" and "2 consecutive timeouts seen by front-1 (2)" in hung["reason"], hung
    assert refused["status"] == "UNHEALTHY" and "2 consecutive TCP failures" in refused["reason"], refused
    await wait_envoy_flag(envoy, hangs.port, present=True)
    await wait_envoy_flag(envoy, refuses.port, present=True)
    assert (await endpoint(lab, flaky[2].port))["status"] == "UNKNOWN"  # never judged: no active checks


async def test_successes_reset_the_failure_counts(lab: Lab, flaky: list[Backend]) -> None:
    port = free_port()
    passive = {"unhealthy": {"http_statuses": [500], "http_failures": 2}, "eject_for": "30s"}
    await start(lab, topology(flaky, [port], passive, active=False), 1)
    assert lab.cp is not None
    flaky[0].mode = "alternate"  # 200, 500, 200, 500: never two failures in a row
    for _ in range(60):
        await get(lab.session, port)
    key = ("web", f"127.0.0.1:{flaky[0].port}")

    async def counted() -> bool:
        assert lab.cp is not None
        return lab.cp.access_log.entries["counted"] >= 60

    await poll_until(counted, timeout=5, what="60 entries counted")
    assert flaky[0].served[500] >= 9
    assert (await endpoint(lab, flaky[0].port))["status"] == "UNKNOWN"
    assert lab.cp.access_log.passive.ejected_total == 0
    assert lab.cp.access_log.passive.counts[key].http_failures <= 1

    flaky[0].mode = "500"  # the same counters eject it once the failures are consecutive

    async def ejected() -> bool:
        return (await endpoint(lab, flaky[0].port))["source"] == "passive"

    await send_until(lab, port, ejected, limit=60)


async def test_mass_failure_guard_holds_a_passive_ejection_of_most_of_the_cluster(
    lab: Lab, flaky: list[Backend]
) -> None:
    port = free_port()
    passive = {"unhealthy": {"http_statuses": [500], "http_failures": 2}, "eject_for": "30s"}
    [envoy] = await start(lab, topology(flaky, [port], passive), 1)
    assert lab.cp is not None
    for b in flaky:
        await wait_endpoint(lab, b.port, "HEALTHY")
    for b in flaky:
        b.mode = "500"  # a bad deploy: every backend fails real requests, every /livez passes

    async def alarm() -> list[dict[str, Any]] | None:
        _, body = await lab.admin("GET", "/alarms")
        active: list[dict[str, Any]] = body["active"]
        return active or None

    for _ in range(60):
        await get(lab.session, port)
    [raised] = await poll_until(alarm, timeout=5, what="a mass_failure alarm")
    assert (raised["kind"], raised["subject"]) == ("mass_failure", "web")
    assert len(lab.cp.admission.guard.held.get("web", {})) == 3
    assert {e.status.name for e in lab.cp.snapshot.endpoints} == {"HEALTHY"}
    for b in flaky:
        await wait_envoy_flag(envoy, b.port, present=False)

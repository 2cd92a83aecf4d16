"""Replicas sharing operator state in a real etcd (issue 17), with real Envoys and real backends.

Three control planes in this process, each with its own local file (ports, data) and the same
`controlplane.store`; an Envoy on B and one on C. What an operator sends to one replica reaches
the Envoys of every other.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from controlplane.app import ControlPlane
from controlplane.topology.parse import load_topology
from controlplane.xds.bootstrap import make_bootstrap
from lab.demoapp import DemoApp
from lab.envoyproc import EnvoyProcess, poll_until
from lab.etcd import EtcdServer
from prober.embedded import attach_embedded_prober
from tests.conftest import web_topology
from tests.integration.test_envoy_integration import host_flags

pytestmark = pytest.mark.envoy

HEALTHPLANE = str(Path(sys.executable).with_name("healthplane"))


class Fleet:
    """Control planes sharing one etcd prefix, each from its own local file, and their Envoys."""

    def __init__(self, tmp_path: Path, etcd: EtcdServer) -> None:
        self.tmp_path = tmp_path
        self.etcd = etcd
        self.replicas: dict[str, ControlPlane] = {}
        self.envoys: list[EnvoyProcess] = []
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15))

    def store(self) -> dict[str, Any]:
        return {"etcd": {"endpoints": [self.etcd.endpoint], "prefix": "/hp-test", "timeout": "2s"}}

    def local_file(self, name: str, document: dict[str, Any]) -> Path:
        path = self.tmp_path / f"{name}.yaml"
        doc = dict(document)
        doc["controlplane"] = {**doc["controlplane"], "store": {**self.store(), "replica_id": name}}
        path.write_text(yaml.safe_dump(doc))
        return path

    async def start(self, name: str, document: dict[str, Any], *, prober: bool = False) -> ControlPlane:
        path = self.local_file(name, document)
        cp = ControlPlane(load_topology(path), config_path=path)
        if prober:
            attach_embedded_prober(cp)
        await cp.start()
        self.replicas[name] = cp
        return cp

    async def envoy(self, name: str, replica: str) -> EnvoyProcess:
        cp = self.replicas[replica]
        envoy = EnvoyProcess(
            make_bootstrap(
                node_id=name, service="front-proxy", xds_host="127.0.0.1", xds_port=cp.xds_port, admin_port=0
            ),
            name=name,
        )
        self.envoys.append(envoy)
        await envoy.start()
        await envoy.wait_live()
        return envoy

    async def admin(self, replica: str, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
        url = f"http://127.0.0.1:{self.replicas[replica].admin_port}{path}"
        async with self.session.request(method, url, **kwargs) as response:
            return response.status, await response.json(content_type=None)

    async def aclose(self) -> None:
        for envoy in self.envoys:
            await envoy.stop()
        for cp in self.replicas.values():
            await cp.aclose()
        await self.session.close()


@pytest.fixture
async def fleet(tmp_path: Path, etcd: EtcdServer) -> AsyncIterator[Fleet]:
    f = Fleet(tmp_path, etcd)
    try:
        yield f
    finally:
        await f.aclose()


async def wait_flag(envoy: EnvoyProcess, port: int, flag: str, *, present: bool = True) -> None:
    async def probe() -> bool:
        return (flag in (await host_flags(envoy)).get(port, frozenset())) == present

    await poll_until(probe, timeout=15, what=f"{envoy.name}: {flag} {'on' if present else 'off'} port {port}")


async def wait_endpoints(envoy: EnvoyProcess, ports: set[int]) -> None:
    async def probe() -> bool:
        return set((await host_flags(envoy)).keys()) == ports

    await poll_until(probe, timeout=15, what=f"{envoy.name}: endpoints {sorted(ports)}")


async def eventually(condition: Callable[[], bool], what: str) -> None:
    async def probe() -> bool:
        return condition()

    await poll_until(probe, timeout=10, what=what)


async def test_three_replicas_share_overrides_and_topology(
    fleet: Fleet, backends: list[DemoApp], listener_port: int, tmp_path: Path
) -> None:
    first = web_topology(backends[:2], listener_port)
    a = await fleet.start("a", first)
    # B and C start from files that say otherwise: etcd (seeded by A) wins for the fleet's part.
    b = await fleet.start("b", web_topology(backends[:1], listener_port))
    c = await fleet.start("c", web_topology(backends, listener_port))
    for cp in (a, b, c):
        assert {e.port for e in cp.topology.clusters[0].endpoints} == {backends[0].port, backends[1].port}
    on_b = await fleet.envoy("envoy-b", "b")
    on_c = await fleet.envoy("envoy-c", "c")
    two = {backends[0].port, backends[1].port}
    await wait_endpoints(on_b, two)
    await wait_endpoints(on_c, two)

    # An override sent to A reaches the Envoys of B and C.
    b1 = f"127.0.0.1:{backends[0].port}"
    code, body = await fleet.admin("a", "POST", f"/endpoints/web/{b1}/override", json={"status": "UNHEALTHY"})
    assert code == 200, body
    assert body["status"] == "UNHEALTHY" and body["changed"] is True
    for envoy in (on_b, on_c):
        await wait_flag(envoy, backends[0].port, "failed_eds_health")
    for cp in (b, c):
        assert cp.health.effective("web", b1).override is not None
        assert "override:" in cp.health.effective("web", b1).source

    # A topology PUT to B reaches everyone; B's own ports stay its own.
    document = web_topology(backends, listener_port)
    code, body = await fleet.admin("b", "PUT", "/topology", json=document)
    assert code == 200, body
    assert body["endpoints"] == 3 and "controlplane.xds" in body["local_settings_not_shared"]
    three = {x.port for x in backends}
    for envoy in (on_b, on_c):
        await wait_endpoints(envoy, three)
    await eventually(lambda: all(len(cp.topology.clusters[0].endpoints) == 3 for cp in (a, b, c)), "3 endpoints")
    assert b.topology.controlplane.xds == load_topology(tmp_path / "b.yaml").controlplane.xds
    # The pin survived the topology (its endpoint is still there) on every replica.
    for envoy in (on_b, on_c):
        assert "failed_eds_health" in (await host_flags(envoy))[backends[0].port]

    # A bad topology is refused with the usual error and reaches no replica.
    bad = web_topology(backends, listener_port)
    bad["clusters"][0]["endpoints"][0]["port"] = 0
    code, body = await fleet.admin("b", "PUT", "/topology", json=bad)
    assert code == 400 and body["field"] == "clusters[0].endpoints[0].port", body

    # `healthplane topology push FILE` (straight to etcd) reaches everyone too.
    pushed = tmp_path / "pushed.yaml"
    pushed.write_text(yaml.safe_dump(web_topology(backends[1:], listener_port)))
    proc = await asyncio.create_subprocess_exec(
        HEALTHPLANE, "topology", "push", str(pushed), "--config", str(tmp_path / "c.yaml"),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    assert "revision" in out.decode()
    rest = {backends[1].port, backends[2].port}
    for envoy in (on_b, on_c):
        await wait_endpoints(envoy, rest)
    await eventually(lambda: all(len(cp.topology.clusters[0].endpoints) == 2 for cp in (a, b, c)), "2 endpoints")
    # The pin of the endpoint that left is gone from etcd too: no replica holds it.
    for cp in (a, b, c):
        assert cp.overrides() == {}

    # GET /replicas on any replica lists the three, agreeing on the EDS they serve.
    await wait_agree(fleet, "a", 3)
    code, body = await fleet.admin("c", "GET", "/replicas")
    assert code == 200 and body["agree"] is True and body["store"] == "etcd"
    rows = {r["id"]: r for r in body["replicas"]}
    assert set(rows) == {"a", "b", "c"} and rows["c"]["self"] is True
    assert rows["b"]["admin_url"] == f"http://127.0.0.1:{b.admin_port}"
    assert rows["b"]["xds_address"] == f"127.0.0.1:{b.xds_port}"
    assert len({r["eds_digest"] for r in rows.values()}) == 1
    assert len({r["version"] for r in rows.values()}) == 3  # each replica numbers its own versions


async def wait_agree(fleet: Fleet, replica: str, count: int) -> dict[str, Any]:
    """GET /replicas on `replica` until it lists `count` replicas that agree."""

    async def probe() -> dict[str, Any] | None:
        code, body = await fleet.admin(replica, "GET", "/replicas")
        return body if code == 200 and body["agree"] and len(body["replicas"]) == count else None

    return await poll_until(probe, timeout=15, what=f"{count} replicas agreeing")


HEALTH_CHECK = {"http": {"path": "/livez"}, "interval": "100ms", "timeout": "80ms", "healthy_threshold": 1}


async def test_etcd_down_the_fleet_serves_verdicts_flow_writes_wait(
    fleet: Fleet, etcd: EtcdServer, backends: list[DemoApp], listener_port: int
) -> None:
    document = web_topology(backends, listener_port, health_check=HEALTH_CHECK)
    for name in ("a", "b", "c"):
        await fleet.start(name, document, prober=True)
    on_b = await fleet.envoy("envoy-b", "b")
    on_c = await fleet.envoy("envoy-c", "c")
    ports = {x.port for x in backends}
    for envoy in (on_b, on_c):
        await wait_endpoints(envoy, ports)
    await wait_agree(fleet, "a", 3)

    await etcd.kill()

    async def degraded(name: str) -> dict[str, Any] | None:
        code, body = await fleet.admin(name, "GET", "/readyz")
        return body if code == 200 and body["status"] == "degraded" else None

    for name in ("a", "b", "c"):
        body = await poll_until(lambda n=name: degraded(n), timeout=10, what=f"{name} degraded")
        assert any("etcd 127.0.0.1:" in reason and "unavailable" in reason for reason in body["degraded"]), body
        assert "healthplane_store_up 0.0" in fleet.replicas[name].metrics.exposition().decode()

    # Verdicts do not need etcd: a failing backend leaves every Envoy, whichever replica it is on.
    backends[0].state.livez = "FAIL"
    for envoy in (on_b, on_c):
        await wait_flag(envoy, backends[0].port, "failed_eds_health")
    served = backends[0].served
    for _ in range(20):  # the fleet keeps serving, around the failed endpoint (both Envoys share the port)
        async with fleet.session.get(f"http://127.0.0.1:{listener_port}/") as response:
            assert response.status == 200
    assert backends[0].served == served

    # Operator writes are refused, naming etcd; nothing changes anywhere.
    b2 = f"127.0.0.1:{backends[1].port}"
    code, body = await fleet.admin("a", "POST", f"/endpoints/web/{b2}/override", json={"status": "DRAINING"})
    assert code == 503 and body["field"] == "store" and "etcd 127.0.0.1:" in body["error"], body
    code, body = await fleet.admin("b", "PUT", "/topology", json=document)
    assert code == 503 and "etcd" in body["error"], body
    assert all(cp.overrides() == {} for cp in fleet.replicas.values())

    # etcd back: writes are accepted again and every replica converges.
    await etcd.start()

    async def accepted() -> dict[str, Any] | None:
        code, body = await fleet.admin("a", "POST", f"/endpoints/web/{b2}/override", json={"status": "DRAINING"})
        return body if code == 200 else None

    await poll_until(accepted, timeout=15, what="the override accepted once etcd is back")
    for envoy in (on_b, on_c):
        await wait_flag(envoy, backends[1].port, "eds_status_draining")
    await eventually(lambda: all(len(cp.overrides()) == 1 for cp in fleet.replicas.values()), "every replica pins b2")
    for name in ("a", "b", "c"):
        code, body = await fleet.admin(name, "GET", "/readyz")
        assert code == 200 and body["status"] == "ready", body
    await wait_agree(fleet, "b", 3)

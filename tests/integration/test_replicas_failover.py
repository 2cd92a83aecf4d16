"""Issue 17, test 2: an Envoy over three `healthplane serve` replicas; the one it is on is killed under traffic.

Each replica serves the same topology file with its own embedded prober. The Envoy's bootstrap
lists all three (`healthplane bootstrap --xds A --xds B --xds C`). The replica holding its ADS
stream is SIGKILLed while requests flow: no request fails, the Envoy is on another replica's
current version within seconds, and its /clusters never shows an endpoint UNKNOWN (nor a flip of
the dead backend) before, during or after the move. Then proxyless gRPC clients over the same
kind of replicas: with the bootstrap's address list, and with gRPC's own fallback list (gRFC A71).
"""

from __future__ import annotations

import asyncio
import collections
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from controlplane.xds.bootstrap import make_bootstrap, make_grpc_bootstrap
from lab.demoapp import DemoApp
from lab.envoyproc import EnvoyProcess, free_port, poll_until
from lab.grpcclient import ClientProcess
from lab.grpcdemo import GrpcDemoServer
from lab.replicas import Replicas, ServeProcess
from tests.conftest import Lab, Traffic, web_topology
from tests.integration.test_central_prober import HEALTH_CHECK

pytestmark = pytest.mark.envoy


async def served(replica: ServeProcess) -> list[str]:
    _, snapshot = await replica.get("/snapshot")
    return sorted(e["status"] for e in snapshot["clusters"][0]["endpoints"])


async def up_to_date_on(replicas: Replicas, node_id: str) -> int | None:
    """Index of a live replica where `node_id` has ACKed the current version of all four types."""
    for i, replica in enumerate(replicas):
        if replica.running:
            row = await replica.node(node_id)
            if row is not None and row["up_to_date"] and len(row["types"]) == 4:
                return i
    return None


async def test_envoy_moves_to_a_live_replica_under_traffic(backends: list[DemoApp], tmp_path: Path) -> None:
    listener_port = free_port()
    document = web_topology(backends, listener_port, health_check=HEALTH_CHECK)
    dead = backends[0]
    await dead.stop()  # one endpoint UNHEALTHY throughout: it must not flip on the move either
    lab = Lab(tmp_path)  # only for its session and the Traffic helper
    replicas = Replicas(document, tmp_path / "replicas", count=3)
    envoy: EnvoyProcess | None = None
    seen: collections.Counter[tuple[int, str | None]] = collections.Counter()
    watching = asyncio.Event()
    watcher: asyncio.Task[None] | None = None
    traffic: Traffic | None = None
    try:
        await replicas.start()

        async def all_decided() -> bool:
            return all([await served(r) == ["HEALTHY", "HEALTHY", "UNHEALTHY"] for r in replicas])

        await poll_until(all_decided, timeout=20, what="every replica's prober decided every endpoint")
        envoy = EnvoyProcess(
            make_bootstrap(
                node_id="front-1",
                service="front-proxy",
                xds=[("127.0.0.1", r.xds_port) for r in replicas],
                admin_port=0,
            ),
            name="front-1",
        )
        await envoy.start()
        await envoy.wait_live()

        async def watch() -> None:
            # Envoy's own view, as fast as its admin answers, for the whole move.
            assert envoy is not None
            while not watching.is_set():
                for host in (await envoy.clusters()).get("web", []):
                    seen[(host.port, host.eds_health_status)] += 1
                await asyncio.sleep(0.01)

        async def dead_out() -> bool:
            assert envoy is not None
            hosts = (await envoy.clusters()).get("web", [])
            return len(hosts) == 3 and any(h.port == dead.port and "failed_eds_health" in h.health_flags for h in hosts)

        await poll_until(dead_out, timeout=20, what="Envoy has the three endpoints, the dead one out")
        watcher = asyncio.create_task(watch())
        traffic = Traffic(lab, listener_port)
        await poll_until(lambda: _ok_at_least(traffic, 50), timeout=10, what="traffic flowing")

        first = await poll_until(lambda: _plus_one(up_to_date_on(replicas, "front-1")), timeout=10) - 1
        killed_at = time.monotonic()
        await replicas[first].kill()
        back = lambda: _plus_one(up_to_date_on(replicas, "front-1"))  # noqa: E731
        second = await poll_until(back, timeout=15, interval=0.02, what="Envoy on a live replica") - 1
        moved_in = time.monotonic() - killed_at
        assert second != first
        # It is on the new replica's current version: what that replica serves now, ACKed.
        row = await replicas[second].node("front-1")
        assert row is not None and row["up_to_date"], row
        _, snapshot = await replicas[second].get("/snapshot")
        for short in ("cds", "lds"):  # state-of-the-world types: one version for every node
            assert row["types"][short]["version_acked"] == snapshot["type_versions"][short], (short, row, snapshot)
        moved_at = traffic.results["ok"]
        await poll_until(lambda: _ok_at_least(traffic, moved_at + 50), timeout=10, what="traffic after the move")
    finally:
        results = await traffic.stop() if traffic is not None else collections.Counter()
        watching.set()
        if watcher is not None:
            await watcher
        if envoy is not None:
            await envoy.stop()
        await replicas.aclose()
        await lab.session.close()

    assert set(results) == {"ok"}, f"failed requests around the kill: {results}"
    assert moved_in < 10, moved_in
    statuses = {port: {status for (p, status), _ in seen.items() if p == port} for port, _ in seen}
    assert statuses == {
        backends[0].port: {"UNHEALTHY"},
        backends[1].port: {"HEALTHY"},
        backends[2].port: {"HEALTHY"},
    }, seen


async def _ok_at_least(traffic: Traffic, n: int) -> bool:
    return traffic.results["ok"] >= n


async def _plus_one(index: Any) -> int | None:
    found = await index
    return None if found is None else found + 1


@pytest.fixture
async def grpc_servers() -> AsyncIterator[list[GrpcDemoServer]]:
    servers = [GrpcDemoServer(f"g{i}") for i in (1, 2, 3)]
    for server in servers:
        await server.start()
    try:
        yield servers
    finally:
        for server in servers:
            await server.stop(0)


class GrpcOverReplicas:
    """Three replicas serving service `greeter`, and proxyless client processes bootstrapped with all of them."""

    def __init__(self, servers: list[GrpcDemoServer], tmp_path: Path) -> None:
        document = {
            "controlplane": {"xds": {"port": 0}, "admin": {"port": 0}},
            "clusters": [{"name": "greeter", "endpoints": [{"address": "127.0.0.1", "port": s.port} for s in servers]}],
            "grpc_services": [{"name": "greeter", "cluster": "greeter"}],
        }
        self.tmp_path = tmp_path
        self.replicas = Replicas(document, tmp_path / "replicas", count=3, no_prober=True)
        self.clients: list[ClientProcess] = []

    async def client(self, node_id: str, *, fallback: bool = False) -> ClientProcess:
        xds = [("127.0.0.1", r.xds_port) for r in self.replicas]
        path = self.tmp_path / f"{node_id}.json"
        path.write_text(json.dumps(make_grpc_bootstrap(node_id=node_id, xds=xds, fallback=fallback)))
        self.clients.append(ClientProcess(path, ["greeter"], rate=40))
        await self.clients[-1].start()
        return self.clients[-1]

    async def on(self, node_key: str) -> int:
        """The replica where the client's stream has ACKed what it serves (waits for one)."""
        found = lambda: _plus_one(_acked_on(self.replicas, node_key))  # noqa: E731
        index: int = await poll_until(found, timeout=15, what=f"{node_key} up to date on a replica")
        return index - 1

    async def aclose(self) -> None:
        for c in self.clients:
            await c.stop()
        await self.replicas.aclose()


async def test_grpc_client_over_replicas_moves_and_gets_health_changes(
    grpc_servers: list[GrpcDemoServer], tmp_path: Path
) -> None:
    """`bootstrap --grpc --xds A --xds B --xds C` (IPs): one xDS server listing every replica.

    When its replica dies, the client's xDS channel reconnects to a live one, and a health change
    made there reaches it.
    """
    lab = GrpcOverReplicas(grpc_servers, tmp_path)
    try:
        await lab.replicas.start()
        client = await lab.client("grpc-1")
        first = await lab.on("grpc-1@greeter")
        await lab.replicas[first].kill()
        killed_at = time.time()
        second = await lab.on("grpc-1@greeter")
        assert second != first
        out = grpc_servers[0]
        for replica in lab.replicas.alive:
            code, body = await replica.request(
                "POST", f"/endpoints/greeter/127.0.0.1:{out.port}/override", json={"status": "UNHEALTHY"}
            )
            assert code == 200, body

        async def taken_out() -> bool:
            recent = client.calls[-30:]
            return len(recent) == 30 and out.name not in {c.server for c in recent}

        await poll_until(taken_out, timeout=10, what=f"calls no longer reaching {out.name}")
    finally:
        await lab.aclose()
    after = client.since(killed_at)
    assert after and all(c.server is not None for c in after), collections.Counter(c.error for c in after)


async def test_grpc_fallback_list_follows_grpc_a71(grpc_servers: list[GrpcDemoServer], tmp_path: Path) -> None:
    """`--grpc-fallback`: one xds_servers entry per replica; grpcio 1.85 does what gRFC A71 says.

    A client holding its config stays with the first server when it dies: its calls go on from
    the cached config, and it does not move to the next server. A client that starts while the
    first server is down falls back to the next one.
    """
    lab = GrpcOverReplicas(grpc_servers, tmp_path)
    try:
        await lab.replicas.start()
        first = await lab.client("grpc-1", fallback=True)
        assert await lab.on("grpc-1@greeter") == 0
        await lab.replicas[0].kill()
        killed_at = time.time()
        await poll_until(lambda: _calls_since(first, killed_at, 40), timeout=10, what="calls after the kill")
        assert await _acked_on(lab.replicas, "grpc-1@greeter") is None  # cached config, no fallback
        second = await lab.client("grpc-2", fallback=True)
        assert await lab.on("grpc-2@greeter") == 1  # the next one in the list
        await poll_until(lambda: _calls_since(second, 0, 10), timeout=10, what="grpc-2 calls")
    finally:
        await lab.aclose()
    after = first.since(killed_at)
    assert after and all(c.server is not None for c in after), collections.Counter(c.error for c in after)


async def _acked_on(replicas: Replicas, node_key: str) -> int | None:
    for i, replica in enumerate(replicas):
        if replica.running:
            row = await replica.node(node_key)
            if row is not None and row["up_to_date"] and row["types"].get("eds", {}).get("version_acked"):
                return i
    return None


async def _calls_since(client: ClientProcess, t: float, n: int) -> bool:
    return len(client.since(t)) >= n

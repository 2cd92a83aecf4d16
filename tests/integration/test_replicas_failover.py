"""Issue 17, test 2: an Envoy over three `healthplane serve` replicas; the one it is on is killed under traffic.

Each replica serves the same topology file with its own embedded prober. The Envoy's bootstrap
lists all three (`healthplane bootstrap --xds A --xds B --xds C`). The replica holding its ADS
stream is SIGKILLed while requests flow: no request fails, the Envoy is on another replica's
current version within seconds, and its /clusters never shows an endpoint UNKNOWN (nor a flip of
the dead backend) before, during or after the move.
"""

from __future__ import annotations

import asyncio
import collections
import json
import time
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


async def test_grpc_client_over_replicas_follows_grpc_fallback(tmp_path: Path) -> None:
    """What grpcio does with several `xds_servers` (gRFC A71), as docs/scaling.md says.

    A client holding its config stays with the first server when it dies: its calls go on from
    the cached config, and it does not move to the next server. A client that starts while the
    first server is down falls back to the next one.
    """
    servers = [GrpcDemoServer(f"g{i}") for i in (1, 2, 3)]
    for server in servers:
        await server.start()
    document = {
        "controlplane": {"xds": {"port": 0}, "admin": {"port": 0}},
        "clusters": [{"name": "greeter", "endpoints": [{"address": "127.0.0.1", "port": s.port} for s in servers]}],
        "grpc_services": [{"name": "greeter", "cluster": "greeter"}],
    }
    replicas = Replicas(document, tmp_path / "replicas", count=3, no_prober=True)
    started: list[ClientProcess] = []

    async def client(node_id: str) -> ClientProcess:
        path = tmp_path / f"{node_id}.json"
        path.write_text(
            json.dumps(make_grpc_bootstrap(node_id=node_id, xds=[("127.0.0.1", r.xds_port) for r in replicas]))
        )
        started.append(ClientProcess(path, ["greeter"], rate=40))
        await started[-1].start()
        return started[-1]

    try:
        await replicas.start()
        first = await client("grpc-1")
        on_first = lambda: _plus_one(_acked_on(replicas, "grpc-1@greeter"))  # noqa: E731
        assert await poll_until(on_first, timeout=15, what="grpc-1 on a replica") - 1 == 0
        await replicas[0].kill()
        killed_at = time.time()
        await poll_until(lambda: _calls_since(first, killed_at, 40), timeout=10, what="calls after the kill")
        assert await _acked_on(replicas, "grpc-1@greeter") is None  # A71: cached config, no fallback
        second = await client("grpc-2")
        on_second = lambda: _plus_one(_acked_on(replicas, "grpc-2@greeter"))  # noqa: E731
        assert await poll_until(on_second, timeout=15, what="grpc-2 on a replica") - 1 == 1  # the next one
        await poll_until(lambda: _calls_since(second, 0, 10), timeout=10, what="grpc-2 calls")
    finally:
        for c in started:
            await c.stop()
        await replicas.aclose()
        for server in servers:
            await server.stop(0)
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

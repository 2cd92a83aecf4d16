"""The control plane against real Envoys: traffic, health, topology edits, NACKs, restarts."""

from __future__ import annotations

import asyncio
import collections
import contextlib
from typing import Any

import aiohttp
import pytest

from controlplane.snapshots.snapshot import version_key
from lab.demoapp import DemoApp
from lab.envoyproc import EnvoyProcess, HostStatus, poll_until
from tests.conftest import Lab, Traffic, web_topology

pytestmark = pytest.mark.envoy


async def host_flags(envoy: EnvoyProcess, cluster: str = "web") -> dict[int, frozenset[str]]:
    hosts: list[HostStatus] = (await envoy.clusters()).get(cluster, [])
    return {h.port: h.health_flags for h in hosts}


async def wait_flags(envoy: EnvoyProcess, port: int, flag: str, *, present: bool = True) -> None:
    async def probe() -> bool:
        flags = (await host_flags(envoy)).get(port, frozenset())
        return (flag in flags) == present

    await poll_until(probe, timeout=10, what=f"{flag} {'on' if present else 'off'} port {port}")


async def wait_traffic(lab: Lab, port: int, names: set[str]) -> collections.Counter[str]:
    """Requests through the listener until exactly `names` answer them."""

    async def probe() -> collections.Counter[str] | None:
        with contextlib.suppress(aiohttp.ClientError):
            seen = await lab.hits(port, 30)
            if set(seen) == names:
                return seen
        return None

    return await poll_until(probe, timeout=15, what=f"traffic reaching exactly {sorted(names)}")


async def no_warming(envoy: EnvoyProcess) -> bool:
    return await envoy.warming_clusters() == []


async def change_web_and_add_api(
    lab: Lab, envoy: EnvoyProcess, document: dict[str, Any], backends: list[DemoApp], listener_port: int
) -> None:
    """Edit the topology file: `web` gets a new connect_timeout, a new cluster `api` (backends[2])
    is routed under /api. Returns once /api is served, no cluster is warming, Envoy holds the new
    timeout and traffic reaches b1, b2 and b3."""
    document["clusters"][0]["connect_timeout"] = "2s"
    document["clusters"].append({"name": "api", "endpoints": [{"address": "127.0.0.1", "port": backends[2].port}]})
    document["listeners"][0]["routes"].insert(0, {"prefix": "/api", "cluster": "api", "prefix_rewrite": "/"})
    lab.write(document)

    async def api_served() -> bool:
        with contextlib.suppress(aiohttp.ClientError):
            async with lab.session.get(f"http://127.0.0.1:{listener_port}/api") as response:
                return response.status == 200 and "ServerName: b3" in await response.text()
        return False

    await poll_until(api_served, timeout=10, what="the new cluster serving /api")
    await poll_until(lambda: no_warming(envoy), timeout=10, what="no cluster left warming")
    dump = await envoy.config_dump("dynamic_active_clusters")
    assert any("2s" in str(c) for c in dump["configs"]), "Envoy did not apply the changed connect_timeout"
    await wait_traffic(lab, listener_port, {"b1", "b2", "b3"})


async def test_envoy_gets_listener_cluster_and_endpoints_over_ads(
    lab: Lab, backends: list[DemoApp], listener_port: int
) -> None:
    await lab.start_control_plane(web_topology(backends, listener_port))
    envoy = await lab.start_envoy()

    seen = await wait_traffic(lab, listener_port, {"b1", "b2", "b3"})
    assert sum(seen.values()) == 30

    assert "ingress" in await envoy.listeners()
    assert await envoy.warming_clusters() == []
    code, nodes = await lab.admin("GET", "/nodes")
    assert code == 200
    [node] = nodes["nodes"]
    assert node["id"] == "front-1" and node["cluster"] == "front-proxy"
    for short in ("cds", "eds", "lds", "rds"):
        assert node["types"][short]["version_acked"] == node["types"][short]["version_sent"], short
        assert node["types"][short]["last_nack"] is None


@pytest.mark.parametrize(("status", "flag"), [("UNHEALTHY", "failed_eds_health"), ("DRAINING", "eds_status_draining")])
async def test_override_takes_endpoint_out_and_back(
    lab: Lab, backends: list[DemoApp], listener_port: int, status: str, flag: str
) -> None:
    await lab.start_control_plane(web_topology(backends, listener_port))
    envoy = await lab.start_envoy()
    await wait_traffic(lab, listener_port, {"b1", "b2", "b3"})
    b1 = backends[0]

    body = await lab.override(f"127.0.0.1:{b1.port}", status)
    assert body["status"] == status and body["changed"] is True
    await wait_flags(envoy, b1.port, flag)
    served_before = b1.served
    seen = await lab.hits(listener_port, 60)
    assert set(seen) == {"b2", "b3"}
    assert b1.served == served_before, "a request reached the endpoint after Envoy ACKed it out"

    await lab.override(f"127.0.0.1:{b1.port}", "HEALTHY")
    await wait_flags(envoy, b1.port, flag, present=False)
    await wait_traffic(lab, listener_port, {"b1", "b2", "b3"})

    code, snapshot = await lab.admin("GET", "/snapshot")
    assert code == 200
    statuses = {e["port"]: e["status"] for e in snapshot["clusters"][0]["endpoints"]}
    assert statuses[b1.port] == "HEALTHY"


async def test_two_of_three_unhealthy_get_no_traffic(lab: Lab, backends: list[DemoApp], listener_port: int) -> None:
    """Envoy's default 50% panic threshold would spray traffic over all three; ours is 0."""
    await lab.start_control_plane(web_topology(backends, listener_port))
    envoy = await lab.start_envoy()
    await wait_traffic(lab, listener_port, {"b1", "b2", "b3"})

    for b in backends[:2]:
        await lab.override(f"127.0.0.1:{b.port}", "UNHEALTHY")
    for b in backends[:2]:
        await wait_flags(envoy, b.port, "failed_eds_health")
    served = [b.served for b in backends]
    seen = await lab.hits(listener_port, 60)
    assert seen == collections.Counter({"b3": 60})
    assert [b.served for b in backends[:2]] == served[:2]


async def test_topology_edits_reach_envoy_without_warming(
    lab: Lab, backends: list[DemoApp], listener_port: int
) -> None:
    cp = await lab.start_control_plane(web_topology(backends[:2], listener_port))
    envoy = await lab.start_envoy()
    await wait_traffic(lab, listener_port, {"b1", "b2"})
    first_version = cp.snapshot.version

    # A new endpoint in an existing cluster.
    document = web_topology(backends, listener_port)
    lab.write(document)
    await wait_traffic(lab, listener_port, {"b1", "b2", "b3"})

    # A changed cluster (Envoy re-creates it and re-requests EDS with unchanged names), and a new
    # cluster routed under /api.
    await change_web_and_add_api(lab, envoy, document, backends, listener_port)

    # A removed cluster (and its route).
    del document["clusters"][1]
    del document["listeners"][0]["routes"][0]
    lab.write(document)

    async def api_gone() -> bool:
        return "api" not in (await envoy.clusters())

    await poll_until(api_gone, timeout=10, what="cluster api removed from Envoy")
    assert await envoy.warming_clusters() == []
    assert version_key(cp.snapshot.version) > version_key(first_version)

    async def up_to_date() -> bool:
        # Envoy has dropped the cluster (CDS) before it ACKs the LDS and RDS that followed it.
        _, nodes = await lab.admin("GET", "/nodes")
        return nodes["nodes"][0]["up_to_date"] is True

    await poll_until(up_to_date, timeout=10, what="the node up to date after the removal")


async def test_rejected_resource_is_one_nack_and_envoy_keeps_last_good(
    lab: Lab, backends: list[DemoApp], listener_port: int
) -> None:
    cp = await lab.start_control_plane(web_topology(backends, listener_port))
    await lab.start_envoy()
    await wait_traffic(lab, listener_port, {"b1", "b2", "b3"})

    # Valid for the Cluster schema, rejected by Envoy's own validation (connect_timeout must be > 0).
    lab.write(web_topology(backends, listener_port, envoy={"connect_timeout": "0s"}))

    async def nacked() -> dict[str, object] | None:
        _, nodes = await lab.admin("GET", "/nodes")
        nack: dict[str, object] | None = nodes["nodes"][0]["types"]["cds"]["last_nack"]
        return nack

    nack = await poll_until(nacked, timeout=10, what="a CDS NACK in GET /nodes")
    assert "connect_timeout" in str(nack["error"]).lower() or "ConnectTimeout" in str(nack["error"])
    assert nack["version"] == cp.snapshot.type_versions["type.googleapis.com/envoy.config.cluster.v3.Cluster"]

    # No resend loop: the NACK stays the only one while the bad version is current.
    responses_after_nack = cp.nodes.responses
    await asyncio.sleep(1.0)
    assert cp.nodes.nacks == 1
    assert cp.nodes.responses == responses_after_nack
    _, events = await lab.admin("GET", "/events?kind=nack")
    assert len(events["events"]) == 1 and "front-1" in events["events"][0]["message"]
    # issue 7a: the rejected version's group names the change that made it (the file reload).
    _, nacks = await lab.admin("GET", "/nacks")
    [group] = nacks["rejected"]
    assert group["type"] == "cds" and group["nodes"] == 1 and group["change"]["kind"] == "topology"

    # Envoy keeps serving its last good config.
    seen = await lab.hits(listener_port, 30)
    assert set(seen) == {"b1", "b2", "b3"}

    # A good edit is accepted again.
    lab.write(web_topology(backends, listener_port, connect_timeout="3s"))

    async def acked_again() -> bool:
        _, nodes = await lab.admin("GET", "/nodes")
        cds = nodes["nodes"][0]["types"]["cds"]
        return bool(
            cds["version_acked"] == cp.snapshot.type_versions["type.googleapis.com/envoy.config.cluster.v3.Cluster"]
        )

    await poll_until(acked_again, timeout=10, what="the next good CDS version ACKed")


async def test_control_plane_restart_under_traffic(lab: Lab, backends: list[DemoApp], listener_port: int) -> None:
    document = web_topology(backends, listener_port)
    cp = await lab.start_control_plane(document)
    xds_port = cp.xds_port
    envoy = await lab.start_envoy()
    await wait_traffic(lab, listener_port, {"b1", "b2", "b3"})
    old_versions = dict(cp.snapshot.type_versions)

    traffic = Traffic(lab, listener_port)
    try:
        await asyncio.sleep(0.5)
        await cp.aclose()
        await asyncio.sleep(1.0)  # Envoy runs on without a control plane
        new_cp = await lab.start_control_plane(document, xds_port=xds_port)

        async def reconnected() -> bool:
            stream = new_cp.nodes.get("front-1")
            return (
                stream is not None
                and all(ts.acked_version == new_cp.snapshot.type_versions[t] for t, ts in stream.types.items())
                and len(stream.types) == 4
            )

        await poll_until(reconnected, timeout=20, what="Envoy reconnected and ACKed the new control plane")
        await asyncio.sleep(0.5)
    finally:
        results = await traffic.stop()
    assert results["ok"] > 100
    assert set(results) == {"ok"}, f"failed requests during the restart: {results}"
    for type_url, version in new_cp.snapshot.type_versions.items():
        assert version_key(version) > version_key(old_versions[type_url])
    stats = await envoy.stats("control_plane.connected_state")
    assert stats.get("control_plane.connected_state") == 1

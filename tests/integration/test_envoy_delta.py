"""Delta (incremental) xDS against real Envoys in DELTA_GRPC mode: traffic, health, topology
edits, NACKs, restarts, and a fleet that mixes both protocols."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.service.status.v3 import csds_pb2, csds_pb2_grpc

from controlplane.app import ControlPlane
from controlplane.snapshots import resources as rs
from controlplane.snapshots.snapshot import Snapshot
from controlplane.topology.parse import load_topology
from controlplane.xds.delta import DeltaResponse
from controlplane.xds.server import StreamCallbacks
from controlplane.xds.stream import PendingResponse, StreamState
from lab.demoapp import DemoApp
from lab.envoyproc import poll_until
from tests.conftest import Lab, Traffic, web_topology
from tests.controlplane.xds.test_csds import CS, RS, statuses
from tests.integration.test_central_prober import HEALTH_CHECK, fail_and_recover
from tests.integration.test_envoy_integration import (
    change_web_and_add_api,
    host_flags,
    wait_flags,
    wait_traffic,
)

pytestmark = pytest.mark.envoy


async def _node(lab: Lab, node_id: str = "front-1") -> dict[str, Any]:
    _, nodes = await lab.admin("GET", "/nodes")
    [node] = [n for n in nodes["nodes"] if n["id"] == node_id]
    return node


async def test_delta_envoy_reaches_every_backend_and_follows_health(
    lab: Lab, backends: list[DemoApp], listener_port: int
) -> None:
    await lab.start_control_plane(web_topology(backends, listener_port))
    envoy = await lab.start_envoy(delta=True)
    seen = await wait_traffic(lab, listener_port, {"b1", "b2", "b3"})
    assert sum(seen.values()) == 30
    assert await envoy.warming_clusters() == []
    node = await _node(lab)
    assert node["protocol"] == "delta"
    for short in ("cds", "eds", "lds", "rds"):
        assert node["types"][short]["version_acked"] == node["types"][short]["version_sent"], short
        assert node["types"][short]["last_nack"] is None

    b1 = backends[0]
    await lab.override(f"127.0.0.1:{b1.port}", "UNHEALTHY")
    await wait_flags(envoy, b1.port, "failed_eds_health")
    served = b1.served
    assert set(await lab.hits(listener_port, 60)) == {"b2", "b3"}
    assert b1.served == served
    await lab.override(f"127.0.0.1:{b1.port}", "HEALTHY")
    await wait_flags(envoy, b1.port, "failed_eds_health", present=False)
    await wait_traffic(lab, listener_port, {"b1", "b2", "b3"})


async def test_delta_envoy_follows_a_prober_verdict(lab: Lab, backends: list[DemoApp], listener_port: int) -> None:
    lab.embedded_prober = True
    await lab.start_control_plane(web_topology(backends, listener_port, health_check=HEALTH_CHECK))
    envoy = await lab.start_envoy(delta=True)
    assert await fail_and_recover(lab, envoy, backends, listener_port) == "prober:embedded"


class SentLog(StreamCallbacks):
    """Every delta response as it is written: (type, names sent, names removed)."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, tuple[str, ...], tuple[str, ...]]] = []

    def on_response(self, stream: StreamState, response: PendingResponse, snapshot: Snapshot) -> None:
        assert isinstance(response, DeltaResponse)
        self.sent.append((rs.SHORT_NAMES[response.type_url], response.names, response.removed))

    def of(self, short: str) -> list[tuple[tuple[str, ...], tuple[str, ...]]]:
        return [(names, removed) for t, names, removed in self.sent if t == short]


async def start_logged(lab: Lab, document: dict[str, Any], *, xds_port: int = 0) -> tuple[ControlPlane, SentLog]:
    """Lab.start_control_plane with a SentLog attached before the first stream can open."""
    document = dict(document)
    document["controlplane"] = {**document["controlplane"], "xds": {"port": xds_port}}
    lab.write(document)
    lab.cp = ControlPlane(load_topology(lab.config), config_path=lab.config)
    log = SentLog()
    lab.cp.stream_callbacks.add(log)
    await lab.cp.start()
    return lab.cp, log


async def test_delta_topology_edits_add_update_and_remove_without_warming(
    lab: Lab, backends: list[DemoApp], listener_port: int
) -> None:
    _, log = await start_logged(lab, web_topology(backends[:2], listener_port))
    envoy = await lab.start_envoy(delta=True)
    await wait_traffic(lab, listener_port, {"b1", "b2"})

    # A new endpoint in an existing cluster: one ClusterLoadAssignment, nothing else.
    log.sent.clear()
    document = web_topology(backends, listener_port)
    lab.write(document)
    await wait_traffic(lab, listener_port, {"b1", "b2", "b3"})
    assert log.sent == [("eds", ("web",), ())]

    # A changed cluster (re-created by Envoy, which then waits for its endpoints) and a new one.
    log.sent.clear()
    await change_web_and_add_api(lab, envoy, document, backends, listener_port)
    assert sorted(n for names, _ in log.of("cds") for n in names) == ["api", "web"]
    assert sorted(n for names, _ in log.of("eds") for n in names) == ["api", "web"]
    assert log.of("lds") == [] and [names for names, _ in log.of("rds")] == [("ingress",)]

    # A removed cluster (and its route): removed_resources, and Envoy drops it.
    log.sent.clear()
    del document["clusters"][1]
    del document["listeners"][0]["routes"][0]
    lab.write(document)

    async def api_gone() -> bool:
        return "api" not in (await envoy.clusters())

    await poll_until(api_gone, timeout=10, what="cluster api removed from Envoy")
    assert await envoy.warming_clusters() == []
    assert ((), ("api",)) in log.of("cds")
    assert all(names == () for names, _ in log.of("cds"))

    async def up_to_date() -> bool:
        return bool((await _node(lab))["up_to_date"])

    await poll_until(up_to_date, timeout=10, what="the delta node up to date in GET /nodes")


async def test_delta_rejected_resource_is_one_nack_not_resent(
    lab: Lab, backends: list[DemoApp], listener_port: int
) -> None:
    cp = await lab.start_control_plane(web_topology(backends, listener_port))
    await lab.start_envoy(delta=True)
    await wait_traffic(lab, listener_port, {"b1", "b2", "b3"})

    lab.write(web_topology(backends, listener_port, envoy={"connect_timeout": "0s"}))

    async def nacked() -> dict[str, object] | None:
        nack: dict[str, object] | None = (await _node(lab))["types"]["cds"]["last_nack"]
        return nack

    nack = await poll_until(nacked, timeout=10, what="a CDS NACK in GET /nodes")
    assert "connect_timeout" in str(nack["error"]).lower() or "ConnectTimeout" in str(nack["error"])
    assert nack["version"] == cp.snapshot.type_versions[rs.CLUSTER]

    responses_after_nack = cp.nodes.responses
    await asyncio.sleep(1.0)
    assert cp.nodes.nacks == 1
    assert cp.nodes.responses == responses_after_nack
    _, events = await lab.admin("GET", "/events?kind=nack")
    assert len(events["events"]) == 1 and "front-1" in events["events"][0]["message"]
    _, nacks = await lab.admin("GET", "/nacks")
    [group] = nacks["rejected"]
    assert group["type"] == "cds" and group["nodes"] == 1 and group["change"]["kind"] == "topology"
    assert set(await lab.hits(listener_port, 30)) == {"b1", "b2", "b3"}
    # CSDS says the same: the Cluster NACKED with Envoy's error, the running and rejected configs.
    async with grpc.aio.insecure_channel(f"127.0.0.1:{cp.xds_port}") as channel:
        response = await csds_pb2_grpc.ClientStatusDiscoveryServiceStub(channel).FetchClientStatus(
            csds_pb2.ClientStatusRequest()
        )
    [config] = response.config
    assert statuses(config)[("Cluster", "web")] == ("NACKED", "ERROR")
    assert statuses(config)[("ClusterLoadAssignment", "web")] == ("ACKED", "SYNCED")
    web = next(c for c in config.generic_xds_configs if c.type_url == rs.CLUSTER)
    assert web.client_status == RS.NACKED and web.config_status == CS.ERROR
    running, rejected = cluster_pb2.Cluster(), cluster_pb2.Cluster()
    assert web.xds_config.Unpack(running) and web.error_state.failed_configuration.Unpack(rejected)
    assert running.connect_timeout.ToNanoseconds() > 0 and rejected.connect_timeout.ToNanoseconds() == 0

    lab.write(web_topology(backends, listener_port, connect_timeout="3s"))

    async def acked_again() -> bool:
        cds = (await _node(lab))["types"]["cds"]
        return bool(cds["version_acked"] == cp.snapshot.type_versions[rs.CLUSTER])

    await poll_until(acked_again, timeout=10, what="the next good CDS version ACKed")


async def test_delta_control_plane_restart_sends_only_what_changed(
    lab: Lab, backends: list[DemoApp], listener_port: int
) -> None:
    document = web_topology(backends, listener_port)
    cp = await lab.start_control_plane(document)
    xds_port = cp.xds_port
    envoy = await lab.start_envoy(delta=True)
    await wait_traffic(lab, listener_port, {"b1", "b2", "b3"})

    traffic = Traffic(lab, listener_port)
    try:
        await asyncio.sleep(0.5)
        await cp.aclose()
        await asyncio.sleep(1.0)  # Envoy runs on without a control plane
        # The restarted control plane serves one more cluster (not routed): only it is new.
        document["clusters"].append({"name": "api", "endpoints": [{"address": "127.0.0.1", "port": backends[2].port}]})
        new_cp, log = await start_logged(lab, document, xds_port=xds_port)

        async def reconnected() -> bool:
            stream = new_cp.nodes.get("front-1")
            return (
                stream is not None
                and len(stream.types) == 4
                and all(ts.acked_version == new_cp.snapshot.type_versions[t] for t, ts in stream.types.items())
                and stream.types[rs.ENDPOINT].names == {"web", "api"}
            )

        await poll_until(reconnected, timeout=20, what="Envoy reconnected and ACKed the new control plane")
        await asyncio.sleep(0.5)
    finally:
        results = await traffic.stop()
    assert results["ok"] > 100
    assert set(results) == {"ok"}, f"failed requests during the restart: {results}"
    stream = new_cp.nodes.get("front-1")
    assert stream is not None and stream.protocol == "delta"
    # What the node held came back as initial_resource_versions: only the new cluster and its
    # endpoints were sent; the listener, route and web's cluster and endpoints were not.
    sent = {t: sorted(n for names, _ in log.of(t) for n in names) for t in ("cds", "eds", "lds", "rds")}
    assert sent == {"cds": ["api"], "eds": ["api"], "lds": [], "rds": []}, log.sent
    assert all(removed == () for _, _, removed in log.sent)
    assert "api" in await envoy.clusters()


MIXED_LISTENERS = ("front-sotw", "front-delta")


async def test_mixed_fleet_sees_the_same_health(lab: Lab, backends: list[DemoApp]) -> None:
    from lab.envoyproc import free_port

    ports = {service: free_port() for service in MIXED_LISTENERS}
    document = web_topology(backends, 0)
    document["listeners"] = [
        {
            "name": f"ingress-{service}",
            "address": "127.0.0.1",
            "port": port,
            "nodes": [service],
            "routes": [{"prefix": "/", "cluster": "web"}],
        }
        for service, port in ports.items()
    ]
    await lab.start_control_plane(document)
    sotw = await lab.start_envoy("sotw-1", "front-sotw")
    dlt = await lab.start_envoy("delta-1", "front-delta", delta=True)
    for port in ports.values():
        await wait_traffic(lab, port, {"b1", "b2", "b3"})
    assert (await _node(lab, "sotw-1"))["protocol"] == "sotw"
    assert (await _node(lab, "delta-1"))["protocol"] == "delta"

    b1, b2 = backends[0], backends[1]
    await lab.override(f"127.0.0.1:{b1.port}", "UNHEALTHY")
    await lab.override(f"127.0.0.1:{b2.port}", "DRAINING")
    for envoy in (sotw, dlt):
        await wait_flags(envoy, b1.port, "failed_eds_health")
        await wait_flags(envoy, b2.port, "eds_status_draining")
    assert await host_flags(sotw) == await host_flags(dlt)
    for port in ports.values():
        assert set(await lab.hits(port, 30)) == {"b3"}

    await lab.override(f"127.0.0.1:{b1.port}", "HEALTHY")
    await lab.override(f"127.0.0.1:{b2.port}", "HEALTHY")
    for envoy in (sotw, dlt):
        await wait_flags(envoy, b1.port, "failed_eds_health", present=False)
        await wait_flags(envoy, b2.port, "eds_status_draining", present=False)
    assert await host_flags(sotw) == await host_flags(dlt)
    for port in ports.values():
        await wait_traffic(lab, port, {"b1", "b2", "b3"})

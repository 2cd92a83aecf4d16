"""Proxyless gRPC: grpcio's own xDS client (`xds:///greeter`) against the control plane.

Every client is a real `grpc.aio` channel to `xds:///NAME` in its own process (the bootstrap is
read once per process), calling real gRPC servers on 127.0.0.1.
"""

from __future__ import annotations

import collections
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from controlplane.app import ControlPlane
from controlplane.cli.main import main
from controlplane.snapshots.snapshot import version_key
from controlplane.topology.parse import load_topology
from controlplane.xds.bootstrap import make_grpc_bootstrap
from lab.demoapp import DemoApp
from lab.envoyproc import free_port, poll_until
from lab.grpcclient import Call, ClientProcess
from lab.grpcdemo import DEMO_SERVICE, GrpcDemoServer
from tests.conftest import Lab, web_topology
from tests.controlplane.cli.test_cli_admin import healthplane
from tests.controlplane.xds.certs import make_certs

GREETER = "grpc-1@greeter"  # how /nodes keys a gRPC client's stream: node.id@target

# Envoy-free, but each test starts gRPC client processes; they share the envoy mark's budget.
pytestmark = pytest.mark.envoy


@pytest.fixture
async def servers() -> AsyncIterator[list[GrpcDemoServer]]:
    """Three gRPC demo servers (g1, g2, g3) on ephemeral ports."""
    out = [GrpcDemoServer(f"g{i}") for i in (1, 2, 3)]
    for server in out:
        await server.start()
    try:
        yield out
    finally:
        for server in out:
            await server.stop(0)


class Clients:
    """Proxyless client processes of one test, each with its own bootstrap (node id)."""

    def __init__(self, lab: Lab, tmp_path: Path) -> None:
        self.lab = lab
        self.tmp_path = tmp_path
        self.started: list[ClientProcess] = []

    async def start(
        self,
        node_id: str = "grpc-1",
        targets: tuple[str, ...] = ("greeter",),
        rate: float = 40,
        methods: tuple[str, ...] = (),
    ) -> ClientProcess:
        assert self.lab.cp is not None
        path = self.tmp_path / f"{node_id}.json"
        bootstrap = make_grpc_bootstrap(node_id=node_id, xds_host="127.0.0.1", xds_port=self.lab.cp.xds_port)
        path.write_text(json.dumps(bootstrap))
        client = ClientProcess(path, targets, rate=rate, methods=methods)
        self.started.append(client)
        await client.start()
        return client

    async def aclose(self) -> None:
        for client in self.started:
            await client.stop()


@pytest.fixture
async def clients(lab: Lab, tmp_path: Path) -> AsyncIterator[Clients]:
    out = Clients(lab, tmp_path)
    try:
        yield out
    finally:
        await out.aclose()


def grpc_topology(servers: list[GrpcDemoServer], **cluster: Any) -> dict[str, Any]:
    """Service `greeter` (cluster `greeter` of the servers) and nothing for Envoy."""
    return {
        "controlplane": {"xds": {"port": 0}, "admin": {"port": 0}, "watch_interval": "100ms"},
        "clusters": [
            {"name": "greeter", "endpoints": [{"address": "127.0.0.1", "port": s.port} for s in servers], **cluster}
        ],
        "grpc_services": [{"name": "greeter", "cluster": "greeter"}],
    }


async def wait_reaching(
    client: ClientProcess, names: set[str], *, target: str = "greeter", window: int = 30, within: float = 15
) -> list[Call]:
    """Until the last `window` calls to `target` were all answered, by exactly `names`."""

    async def probe() -> list[Call] | None:
        recent = [c for c in client.calls if c.target == target][-window:]
        if len(recent) == window and {c.server for c in recent} == names:
            return recent
        return None

    return await poll_until(probe, timeout=within, what=f"calls to {target} reaching exactly {sorted(names)}")


async def more_calls(client: ClientProcess, n: int, target: str = "greeter") -> list[Call]:
    """The next `n` calls the client makes to `target`."""
    start = len([c for c in client.calls if c.target == target])

    async def probe() -> list[Call] | None:
        calls = [c for c in client.calls if c.target == target]
        return calls[start : start + n] if len(calls) >= start + n else None

    return await poll_until(probe, timeout=15, what=f"{n} more calls to {target}")


async def grpc_node(lab: Lab, node_id: str) -> dict[str, Any] | None:
    code, body = await lab.admin("GET", "/nodes")
    assert code == 200
    return next((n for n in body["nodes"] if n["id"] == node_id), None)


async def wait_acked(lab: Lab, node_id: str, short: str = "eds", within: float = 10) -> dict[str, Any]:
    """Until `node_id` has ACKed the current version of `short` (its types all up to date)."""
    assert lab.cp is not None

    async def probe() -> dict[str, Any] | None:
        node = await grpc_node(lab, node_id)
        if node is None or short not in node["types"]:
            return None
        t = node["types"][short]
        return node if t["version_acked"] == t["version_sent"] and not t["awaiting_ack"] else None

    return await poll_until(probe, timeout=within, what=f"{node_id} ACKing {short}")


async def assert_taken_out(lab: Lab, client: ClientProcess, servers: list[GrpcDemoServer], out: GrpcDemoServer) -> None:
    """Calls stop reaching `out`: none at all once the client ACKed the EDS that says so."""
    rest = {s.name for s in servers if s is not out}
    await wait_reaching(client, rest)
    await wait_acked(lab, GREETER)
    served = out.served
    calls = await more_calls(client, 40)
    assert {c.server for c in calls} == rest, collections.Counter(c.server for c in calls)
    assert out.served == served


# --------------------------------------------------------------------------- 1. every backend


async def test_calls_reach_every_backend_and_the_client_shows_as_a_node(
    lab: Lab, clients: Clients, servers: list[GrpcDemoServer]
) -> None:
    await lab.start_control_plane(grpc_topology(servers))
    client = await clients.start()

    calls = await wait_reaching(client, {"g1", "g2", "g3"}, window=60)
    spread = collections.Counter(c.server for c in calls)
    assert min(spread.values()) >= 10, spread  # round robin, not a lucky pick

    node = await wait_acked(lab, GREETER, "eds")
    assert node["node_id"] == "grpc-1"
    assert "gRPC" in node["user_agent"] and "Python" in node["user_agent"], node["user_agent"]
    assert set(node["types"]) == {"lds", "rds", "cds", "eds"}
    # gRPC asks for exactly the names it needs; never the wildcard.
    assert node["types"]["lds"]["subscribed"] == ["greeter"]
    assert node["types"]["rds"]["subscribed"] == ["greeter"]
    for short, t in node["types"].items():
        assert t["version_acked"] == t["version_sent"] and t["last_nack"] is None, short
    assert node["up_to_date"] is True

    assert lab.cp is not None
    code, out, err = await healthplane("nodes", "--admin", f"http://127.0.0.1:{lab.cp.admin_port}")
    assert code == 0, err
    [row] = [line for line in out.splitlines() if line.startswith(GREETER)]
    assert "gRPC C-core" in row and row.split()[-2:] == ["-", "sotw"]  # no NACK; state of the world


# --------------------------------------------------------------------------- 2. out and back


async def test_override_unhealthy_takes_a_backend_out_and_healthy_brings_it_back(
    lab: Lab, clients: Clients, servers: list[GrpcDemoServer]
) -> None:
    await lab.start_control_plane(grpc_topology(servers))
    client = await clients.start()
    await wait_reaching(client, {"g1", "g2", "g3"})
    g1 = servers[0]

    await lab.override(f"127.0.0.1:{g1.port}", "UNHEALTHY", cluster="greeter")
    assert lab.cp is not None
    version = lab.cp.snapshot.version
    await assert_taken_out(lab, client, servers, g1)
    # Propagation is tracked for the gRPC client like for any Envoy: its ACK of that version.
    code, record = await lab.admin("GET", f"/versions/{version}")
    assert code == 200, record
    [mine] = [n for n in record["per_node"] if n["node"] == GREETER]
    assert mine["status"] == "acked" and mine["ack_ms"] >= 0

    await lab.override(f"127.0.0.1:{g1.port}", "HEALTHY", cluster="greeter")
    await wait_reaching(client, {"g1", "g2", "g3"})


async def test_failing_grpc_health_check_takes_a_backend_out_and_back(
    lab: Lab, clients: Clients, servers: list[GrpcDemoServer]
) -> None:
    lab.embedded_prober = True
    check = {"grpc": {}, "interval": "200ms", "timeout": "150ms", "healthy_threshold": 1, "unhealthy_threshold": 1}
    await lab.start_control_plane(grpc_topology(servers, health_check=check))
    client = await clients.start()
    await wait_reaching(client, {"g1", "g2", "g3"})
    g2 = servers[1]

    g2.set_serving(False)  # grpc.health.v1 answers NOT_SERVING; the prober's verdict does the rest
    await assert_taken_out(lab, client, servers, g2)
    code, body = await lab.admin("GET", "/endpoints")
    assert code == 200
    [ep] = [e for e in body["endpoints"] if (e["cluster"], e["endpoint"]) == ("greeter", f"127.0.0.1:{g2.port}")]
    assert ep["status"] == "UNHEALTHY"

    g2.set_serving(True)
    await wait_reaching(client, {"g1", "g2", "g3"})


# --------------------------------------------------------------------------- 3. draining


async def test_draining_gets_no_new_calls(lab: Lab, clients: Clients, servers: list[GrpcDemoServer]) -> None:
    await lab.start_control_plane(grpc_topology(servers))
    client = await clients.start()
    await wait_reaching(client, {"g1", "g2", "g3"})
    g3 = servers[2]

    await lab.override(f"127.0.0.1:{g3.port}", "DRAINING", cluster="greeter")
    await assert_taken_out(lab, client, servers, g3)


# --------------------------------------------------------------------------- NACKs


async def test_a_cluster_grpc_rejects_shows_as_a_nack_and_the_client_keeps_its_last_good_one(
    lab: Lab, clients: Clients, servers: list[GrpcDemoServer]
) -> None:
    document = grpc_topology(servers)
    await lab.start_control_plane(document)
    client = await clients.start()
    await wait_reaching(client, {"g1", "g2", "g3"})

    # The `envoy` escape hatch is not checked against gRPC: MAGLEV is fine for Envoy, not for gRPC.
    document["clusters"][0]["envoy"] = {"lbPolicy": "MAGLEV"}
    lab.write(document)

    async def nacked() -> dict[str, Any] | None:
        node = await grpc_node(lab, GREETER)
        return node["types"]["cds"]["last_nack"] if node is not None else None

    nack = await poll_until(nacked, timeout=10, what="gRPC's NACK of the MAGLEV cluster")
    assert "LB policy is not supported" in nack["error"], nack
    calls = await more_calls(client, 30)
    assert {c.server for c in calls} == {"g1", "g2", "g3"}  # still the last good cluster

    del document["clusters"][0]["envoy"]
    lab.write(document)
    await wait_acked(lab, GREETER, "cds")


# --------------------------------------------------------------------------- 4. topology edit


async def test_topology_edit_adds_a_backend_and_a_service_without_reconnecting(
    lab: Lab, clients: Clients, servers: list[GrpcDemoServer]
) -> None:
    document = grpc_topology(servers[:2])
    await lab.start_control_plane(document)
    shop = GrpcDemoServer("shop-1")
    await shop.start()
    try:
        client = await clients.start(targets=("greeter", "shop"))
        await wait_reaching(client, {"g1", "g2"})
        # grpcio keeps one xDS client, hence one ADS stream, per channel target: two nodes here.
        before = await wait_acked(lab, GREETER, "lds")
        shop_before = await wait_acked(lab, "grpc-1@shop", "lds")
        assert before["types"]["lds"]["subscribed"] == ["greeter"]
        assert shop_before["types"]["lds"]["subscribed"] == ["shop"]
        assert all(c.server is None for c in client.calls if c.target == "shop")  # no such service yet

        document["clusters"][0]["endpoints"].append({"address": "127.0.0.1", "port": servers[2].port})
        document["clusters"].append({"name": "shop", "endpoints": [{"address": "127.0.0.1", "port": shop.port}]})
        document["grpc_services"].append({"name": "shop", "cluster": "shop"})
        lab.write(document)

        await wait_reaching(client, {"g1", "g2", "g3"})
        await wait_reaching(client, {"shop-1"}, target="shop", window=10)
        for node in (before, shop_before):
            after = await grpc_node(lab, node["id"])
            assert after is not None
            assert (after["stream_id"], after["connected_at"]) == (node["stream_id"], node["connected_at"])
    finally:
        await shop.stop(0)


# --------------------------------------------------------------------------- 5. restart


async def test_control_plane_restart_under_steady_calls_fails_none(
    lab: Lab, clients: Clients, servers: list[GrpcDemoServer]
) -> None:
    port = free_port()
    document = grpc_topology(servers)
    await lab.start_control_plane(document, xds_port=port)
    client = await clients.start(rate=50)
    await wait_reaching(client, {"g1", "g2", "g3"})
    await wait_acked(lab, GREETER)
    t0 = time.time()

    assert lab.cp is not None
    await lab.cp.aclose()
    lab.cp = None
    await more_calls(client, 50)  # calls go on with no control plane at all
    await lab.start_control_plane(document, xds_port=port)
    # gRPC reconnects with exponential backoff (1 s, x1.6, jittered): allow a few rounds.
    await wait_acked(lab, GREETER, within=30)  # the client came back to the new process
    await more_calls(client, 50)

    calls = client.since(t0)
    failed = [c for c in calls if c.error is not None]
    assert not failed, failed[:3]
    assert len(calls) >= 100 and {c.server for c in calls} == {"g1", "g2", "g3"}


# --------------------------------------------------------------------------- 6. side by side


async def test_envoys_and_proxyless_clients_agree_on_every_endpoints_health(
    lab: Lab, clients: Clients, servers: list[GrpcDemoServer], backends: list[DemoApp], listener_port: int
) -> None:
    document = web_topology(backends, listener_port)
    greeter = grpc_topology(servers)
    document["clusters"] += greeter["clusters"]
    document["grpc_services"] = greeter["grpc_services"]
    await lab.start_control_plane(document)
    envoy = await lab.start_envoy()
    client = await clients.start()
    await wait_reaching(client, {"g1", "g2", "g3"})

    g1, g2, g3 = servers
    await lab.override(f"127.0.0.1:{g1.port}", "UNHEALTHY", cluster="greeter")
    await lab.override(f"127.0.0.1:{g2.port}", "DRAINING", cluster="greeter")
    b3 = backends[2]
    await lab.override(f"127.0.0.1:{b3.port}", "UNHEALTHY")

    await wait_reaching(client, {"g3"})

    async def envoy_flags() -> dict[int, frozenset[str]] | None:
        hosts = await envoy.clusters()
        flags = {h.port: h.health_flags for c in ("greeter", "web") for h in hosts.get(c, [])}
        seen = "eds_status_draining" in flags.get(g2.port, ()) and "failed_eds_health" in flags.get(b3.port, ())
        return flags if seen else None

    flags = await poll_until(envoy_flags, timeout=10, what="Envoy seeing the overrides")
    assert "failed_eds_health" in flags[g1.port]
    assert "eds_status_draining" in flags[g2.port]
    assert flags[g3.port] == {"healthy"}
    assert "failed_eds_health" in flags[b3.port]

    # Both nodes are up to date with what they subscribe to (the gRPC client does not watch `web`,
    # so its EDS version may trail Envoy's) and the Envoy was never offered the API listener.
    async def both_current() -> tuple[dict[str, Any], dict[str, Any]] | None:
        nodes = {n["id"]: n for n in (await lab.admin("GET", "/nodes"))[1]["nodes"]}
        envoy_node, proxyless = nodes.get("front-1"), nodes.get(GREETER)
        if envoy_node is None or proxyless is None or not (envoy_node["up_to_date"] and proxyless["up_to_date"]):
            return None
        return envoy_node, proxyless

    envoy_node, proxyless = await poll_until(both_current, timeout=10, what="both nodes up to date")
    acked = [version_key(n["types"]["eds"]["version_acked"]) for n in (envoy_node, proxyless)]
    assert acked[0] >= acked[1]
    for node in (envoy_node, proxyless):
        for short, t in node["types"].items():
            assert t["last_nack"] is None, (node["id"], short)
    assert set(await envoy.listeners()) == {"ingress"}
    assert {c.server for c in await more_calls(client, 30)} == {"g3"}


# --------------------------------------------------------------------------- routes


def routed_topology(
    servers: list[GrpcDemoServer], clusters: dict[str, list[GrpcDemoServer]], routes: list[dict[str, Any]]
) -> dict[str, Any]:
    """Service `greeter` with `routes` over the named clusters of the servers."""
    document = grpc_topology(servers)
    document["clusters"] = [
        {"name": name, "endpoints": [{"address": "127.0.0.1", "port": s.port} for s in members]}
        for name, members in clusters.items()
    ]
    document["grpc_services"] = [{"name": "greeter", "routes": routes}]
    return document


def of_method(calls: list[Call], method: str) -> list[Call]:
    return [c for c in calls if c.method == method]


async def answered_calls(client: ClientProcess, n: int, method: str = "Who") -> list[Call]:
    """The next `n` calls of `method`, once the client's calls of it stopped failing (routes applied)."""

    async def settled() -> bool | None:
        recent = of_method(client.calls, method)[-10:]
        return True if len(recent) == 10 and all(c.error is None for c in recent) else None

    await poll_until(settled, timeout=15, what=f"calls of {method} answered")
    start = len(of_method(client.calls, method))

    async def probe() -> list[Call] | None:
        calls = of_method(client.calls, method)
        return calls[start : start + n] if len(calls) >= start + n else None

    return await poll_until(probe, timeout=30, what=f"{n} more calls of {method}")


async def test_a_per_method_route_sends_that_method_to_its_cluster_and_the_rest_elsewhere(
    lab: Lab, clients: Clients, servers: list[GrpcDemoServer]
) -> None:
    g1, g2, g3 = servers
    routes = [{"service": DEMO_SERVICE, "method": "Hello", "cluster": "hello"}, {"cluster": "rest"}]
    await lab.start_control_plane(routed_topology(servers, {"hello": [g1], "rest": [g2, g3]}, routes))
    client = await clients.start(methods=("Who", "Hello"))

    hello = await answered_calls(client, 40, "Hello")
    who = await answered_calls(client, 40, "Who")
    assert collections.Counter(c.server for c in hello) == {"g1": 40}
    spread = collections.Counter(c.server for c in who)
    assert set(spread) == {"g2", "g3"} and min(spread.values()) >= 10, spread  # round robin over `rest`
    node = await wait_acked(lab, GREETER, "rds")
    assert all(t["last_nack"] is None for t in node["types"].values()), node["types"]


async def test_weighted_clusters_split_calls_by_weight(
    lab: Lab, clients: Clients, servers: list[GrpcDemoServer]
) -> None:
    g1, g2, g3 = servers
    split = [{"cluster": "heavy", "weight": 3}, {"cluster": "light", "weight": 1}]
    await lab.start_control_plane(
        routed_topology(servers, {"heavy": [g1, g2], "light": [g3]}, [{"weighted_clusters": split}])
    )
    client = await clients.start(rate=100)

    calls = await answered_calls(client, 400)
    spread = collections.Counter(c.server for c in calls)
    light = spread["g3"]
    # 3:1 puts 100 of 400 on `light` (standard deviation ~9); an even split would put 200, no split 0 or 400.
    assert 60 <= light <= 140, spread
    assert min(spread["g1"], spread["g2"]) >= 100, spread  # `heavy` round robins over both of its endpoints
    node = await wait_acked(lab, GREETER, "rds")
    assert all(t["last_nack"] is None for t in node["types"].values()), node["types"]


async def test_a_weighted_cluster_with_every_endpoint_unhealthy_fails_its_share_of_calls(
    lab: Lab, clients: Clients, servers: list[GrpcDemoServer]
) -> None:
    """gRFC A28: the route picks a cluster by weight for each call, before load balancing; a cluster
    with no endpoint left fails the calls it gets (UNAVAILABLE), with no failover to the other one."""
    g1, g2, g3 = servers
    split = [{"cluster": "heavy", "weight": 3}, {"cluster": "light", "weight": 1}]
    document = routed_topology(servers, {"heavy": [g1, g2], "light": [g3]}, [{"weighted_clusters": split}])
    await lab.start_control_plane(document)
    client = await clients.start(rate=100)
    await answered_calls(client, 40)

    await lab.override(f"127.0.0.1:{g3.port}", "UNHEALTHY", cluster="light")
    await wait_acked(lab, GREETER)

    async def failing() -> bool | None:
        return True if any(c.error is not None for c in client.calls[-20:]) else None

    await poll_until(failing, timeout=10, what="calls to `light` failing")
    served = g3.served
    calls = await more_calls(client, 400)
    failed = collections.Counter(c.error for c in calls if c.error is not None)
    answered = collections.Counter(c.server for c in calls if c.error is None)
    assert set(failed) == {"UNAVAILABLE"}, failed
    assert 60 <= failed["UNAVAILABLE"] <= 140, (failed, answered)  # light's quarter, ~100
    assert set(answered) == {"g1", "g2"}, answered
    assert g3.served == served

    await lab.override(f"127.0.0.1:{g3.port}", "HEALTHY", cluster="light")
    # 60 answered calls in a row: 0.75**60 ~ 3e-8 while `light` still fails a quarter of them.
    await wait_reaching(client, {"g1", "g2", "g3"}, window=60)
    back = await more_calls(client, 100)
    assert all(c.error is None for c in back), collections.Counter(c.error for c in back)


# --------------------------------------------------------------------------- TLS


async def test_bootstrap_grpc_with_mutual_tls_reaches_a_tls_control_plane(
    lab: Lab, servers: list[GrpcDemoServer], tmp_path: Path
) -> None:
    certs = make_certs(tmp_path / "certs")
    document = grpc_topology(servers)
    tls = {"cert": str(certs.server_cert), "key": str(certs.server_key), "client_ca": str(certs.ca)}
    document["controlplane"]["xds"] = {"address": "127.0.0.1", "port": 0, "tls": tls}
    lab.write(document)
    lab.cp = ControlPlane(load_topology(lab.config), config_path=lab.config)
    await lab.cp.start()
    path = tmp_path / "tls-bootstrap.json"
    argv = ["bootstrap", "--grpc", "--node-id", "grpc-tls", "--xds", f"127.0.0.1:{lab.cp.xds_port}", "-o", str(path)]
    assert (
        main(
            [*argv, "--tls-ca", str(certs.ca), "--tls-cert", str(certs.client_cert), "--tls-key", str(certs.client_key)]
        )
        == 0
    )
    client = ClientProcess(path, ["greeter"], rate=40)
    await client.start()
    try:
        await wait_reaching(client, {"g1", "g2", "g3"})
        node = await grpc_node(lab, "grpc-tls@greeter")
        assert node is not None and node["peer"].startswith("ipv4:127.0.0.1")
    finally:
        await client.stop()

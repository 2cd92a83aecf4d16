"""lab.replicas: real `healthplane serve` processes, and simulated nodes that move between them."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from controlplane.snapshots import resources as rs
from lab.envoyproc import poll_until
from lab.fleet import Received, SimNode
from lab.replicas import FailoverFleet, FailoverNode, Replicas, ServeError, ServeProcess
from lab.replicas.serve import replica_document

DOCUMENT: dict[str, Any] = {
    "controlplane": {"xds": {"port": 0}, "admin": {"port": 0}},
    "clusters": [{"name": "web", "endpoints": [{"address": "127.0.0.1", "port": 9}]}],
    "listeners": [{"name": "ingress", "address": "127.0.0.1", "port": 10000, "routes": [{"cluster": "web"}]}],
}


def test_each_replica_gets_the_topology_with_its_own_data_dir(tmp_path: Path) -> None:
    doc = replica_document(DOCUMENT, tmp_path / "r0")
    assert doc["controlplane"]["data_dir"] == str(tmp_path / "r0" / "data")
    assert doc["controlplane"]["xds"] == {"port": 0} and doc["controlplane"]["admin"] == {"port": 0}
    assert {k: v for k, v in doc.items() if k != "controlplane"} == {
        k: v for k, v in DOCUMENT.items() if k != "controlplane"
    }
    assert "data_dir" not in DOCUMENT["controlplane"]  # the caller's document is left alone
    replicas = Replicas(DOCUMENT, tmp_path / "set", count=2, no_prober=True)
    files = [yaml.safe_load(p.config.read_text()) for p in replicas]
    assert files[0]["controlplane"]["data_dir"] != files[1]["controlplane"]["data_dir"]
    with pytest.raises(ServeError):
        Replicas(DOCUMENT, tmp_path / "none", count=0)


async def test_a_serve_process_reads_its_ports_and_comes_back_on_them(tmp_path: Path) -> None:
    config = tmp_path / "topology.yaml"
    config.write_text(yaml.safe_dump(replica_document(DOCUMENT, tmp_path)))
    serve = ServeProcess(config, no_prober=True)
    try:
        await serve.start()
        await serve.wait_ready()
        xds, admin = serve.xds_port, serve.admin_port
        assert xds > 0 and admin > 0 and xds != admin
        assert (await serve.get("/healthz"))[0] == 200
        await serve.kill()
        assert serve.returncode == -9 and not serve.running
        await serve.start()  # a restart comes back where clients point
        await serve.wait_ready()
        assert (serve.xds_port, serve.admin_port) == (xds, admin)
    finally:
        await serve.aclose()


async def test_a_bad_topology_is_a_start_error_with_the_log(tmp_path: Path) -> None:
    config = tmp_path / "topology.yaml"
    config.write_text("clusters: [{name: web, endpoints: [{address: not-an-ip, port: 1}]}]\n")
    serve = ServeProcess(config)
    try:
        with pytest.raises(ServeError, match="exited with code") as info:
            await serve.start(timeout=30)
        assert "clusters[0].endpoints[0].address" in str(info.value)  # the log tail names the field
    finally:
        await serve.aclose()


def _received(type_url: str, version: str, at: float, nacked: bool = False) -> Received:
    return Received(type_url, version, at, at, nacked)


def test_a_node_is_current_once_it_acked_every_type_at_the_versions() -> None:
    node = FailoverNode(SimNode(node_id="n"), ["a", "b"], 0)
    versions = {rs.CLUSTER: "B.1", rs.ENDPOINT: "B.2"}
    node.sim.history += [
        _received(rs.CLUSTER, "B.1", 5.0),  # before `since`: from an earlier move
        _received(rs.ENDPOINT, "B.2", 11.0, nacked=True),
    ]
    assert node.current_since(versions, 10.0) is None
    node.sim.history += [_received(rs.CLUSTER, "B.1", 12.0), _received(rs.ENDPOINT, "A.7", 12.5)]
    assert node.current_since(versions, 10.0) is None
    node.sim.history += [_received(rs.ENDPOINT, "B.2", 13.0), _received(rs.ENDPOINT, "B.2", 14.0)]
    assert node.current_since(versions, 10.0) == 13.0  # the first ACK of the last type


async def test_nodes_of_a_dead_replica_move_to_a_live_one(tmp_path: Path) -> None:
    replicas = Replicas(DOCUMENT, tmp_path, count=2, no_prober=True)
    fleet: FailoverFleet | None = None
    try:
        await replicas.start()
        fleet = FailoverFleet(replicas.xds_addresses, 4, seed=1)
        await fleet.start()
        assert [n.target for n in fleet.nodes] == [0, 1, 0, 1]
        assert await replicas.serving("sim-0") == 0 and await replicas.serving("sim-1") == 1
        killed_at = time.time()
        await replicas[0].kill()
        _, snapshot = await replicas[1].get("/snapshot")
        short = {"cds": rs.CLUSTER, "eds": rs.ENDPOINT, "lds": rs.LISTENER, "rds": rs.ROUTE}
        versions = {short[k]: v for k, v in snapshot["type_versions"].items() if k in short}

        async def moved() -> bool:
            assert fleet is not None
            return all(n.target == 1 and n.current_since(versions, killed_at) for n in fleet.nodes[::2])

        await poll_until(moved, timeout=15, what="the dead replica's nodes current on the live one")
        assert await replicas.serving("sim-0") == 1
        assert [n.ended_streams for n in fleet.nodes] == [1, 0, 1, 0]
    finally:
        if fleet is not None:
            await fleet.aclose()
        await replicas.aclose()

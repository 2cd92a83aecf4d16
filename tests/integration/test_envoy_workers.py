"""`serve --workers 2`: real Envoys spread over two xDS worker processes sharing the xDS port.

Verdicts (from a prober on the xDS port, relayed to the main process) and overrides reach every
Envoy whichever worker holds its stream; `/nodes` lists every Envoy with its ACKs; a worker killed
under traffic costs no request and is replaced; propagation and CSDS read the same with 1 and 2.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import signal
from typing import Any

import aiohttp
import grpc
import pytest
from envoy.admin.v3 import config_dump_shared_pb2 as dump
from envoy.service.status.v3 import csds_pb2, csds_pb2_grpc

from controlplane.app import ControlPlane
from lab.demoapp import DemoApp
from lab.envoyproc import EnvoyProcess, free_port, poll_until
from tests.conftest import Lab, Traffic
from tests.integration import test_passive_envoy as passive
from tests.integration.test_central_prober import HEALTH_CHECK, ExternalProber, external_prober, flip, wait_status
from tests.integration.test_envoy_integration import wait_flags
from tests.integration.test_passive_envoy import Backend, flaky
from tests.integration.test_propagation_envoy import topology

pytestmark = pytest.mark.envoy

__all__ = ["external_prober", "flaky"]  # fixtures, imported to be used here

MAX_ENVOYS = 8


def owners(cp: ControlPlane) -> dict[str, int]:
    """Node id -> the worker slot holding its stream."""
    assert cp.workers is not None
    mirror = cp.workers.mirror
    return {s.node_key: mirror.owner[s.stream_id] for s in cp.nodes.streams() if s.stream_id in mirror.owner}


async def spread_envoys(lab: Lab, cp: ControlPlane, *, at_least: int = 2) -> list[EnvoyProcess]:
    """Envoys (every other one delta) until both workers hold at least one and `at_least` run.

    The kernel picks the worker of each connection (SO_REUSEPORT hashes its addresses), so the
    number needed to land on both is not fixed: one more at a time, up to MAX_ENVOYS.
    """
    envoys: list[EnvoyProcess] = []
    for i in range(1, MAX_ENVOYS + 1):
        envoys.append(await lab.start_envoy(f"edge-{i}", f"edge-{i}", delta=i % 2 == 0))

        async def listed(node: str = f"edge-{i}") -> bool:
            return node in owners(cp)

        await poll_until(listed, timeout=10, what=f"edge-{i} in /nodes")
        if len(envoys) >= at_least and len(set(owners(cp).values())) == 2:
            return envoys
    raise AssertionError(f"{MAX_ENVOYS} Envoys all on one worker: {owners(cp)}")


async def all_acked(lab: Lab, count: int) -> list[dict[str, Any]]:
    """`/nodes` once every one of `count` Envoys is up to date with every type ACKed."""
    version = {}

    async def probe() -> list[dict[str, Any]] | None:
        _, snapshot = await lab.admin("GET", "/snapshot")
        version["v"] = snapshot["version"]
        _, body = await lab.admin("GET", "/nodes")
        nodes = body["nodes"]
        if len(nodes) != count or not all(n["up_to_date"] for n in nodes):
            return None
        for node in nodes:
            for short in ("cds", "eds", "lds", "rds"):
                t = node["types"][short]
                if t["version_acked"] != t["version_sent"] or t["awaiting_ack"] or t["last_nack"] is not None:
                    return None
        return list(nodes)

    return await poll_until(probe, timeout=15, what=f"{count} Envoys up to date in /nodes")


async def serves_all(lab: Lab, port: int, names: set[str]) -> bool:
    with contextlib.suppress(aiohttp.ClientError):
        return set(await lab.hits(port, 12)) == names
    return False


async def test_verdicts_and_overrides_reach_envoys_on_both_workers(
    lab: Lab, backends: list[DemoApp], external_prober: ExternalProber
) -> None:
    ports = [free_port() for _ in range(MAX_ENVOYS)]
    cp = await lab.start_control_plane(topology(backends, ports, health_check=HEALTH_CHECK), workers=2)
    assert cp.workers is not None and len(cp.workers.pids()) == 2
    # The prober link is served by the main process, reached through a worker's relay.
    await external_prober.connect(cp.xds_port)
    envoys = await spread_envoys(lab, cp, at_least=3)
    for b in backends:
        await wait_status(lab, b.port, "HEALTHY")
    nodes = await all_acked(lab, len(envoys))
    assert {n["id"] for n in nodes} == {f"edge-{i}" for i in range(1, len(envoys) + 1)}
    assert {n["protocol"] for n in nodes} == {"sotw", "delta"}
    for i in range(len(envoys)):
        await poll_until(lambda i=i: serves_all(lab, ports[i], {"b1", "b2", "b3"}), timeout=15, what=f"edge-{i + 1}")

    # An override, from the admin API of the main process, reaches every Envoy on either worker.
    b1 = backends[0]
    await lab.override(f"127.0.0.1:{b1.port}", "UNHEALTHY")
    for envoy in envoys:
        await wait_flags(envoy, b1.port, "failed_eds_health")
    await lab.override(f"127.0.0.1:{b1.port}", "auto")
    for envoy in envoys:
        await wait_flags(envoy, b1.port, "failed_eds_health", present=False)

    # A prober's verdict, over the relayed link, as well.
    b2 = backends[1]
    await flip(b2, "FAIL")
    await wait_status(lab, b2.port, "UNHEALTHY")
    for envoy in envoys:
        await wait_flags(envoy, b2.port, "failed_eds_health")
    assert cp.prober_link.probers["ext-1"].connected

    nodes = await all_acked(lab, len(envoys))
    _, snapshot = await lab.admin("GET", "/snapshot")
    for node in nodes:
        assert node["types"]["eds"]["version_acked"] == snapshot["type_versions"]["eds"], node
    assert len(set(owners(cp).values())) == 2

    # Propagation covers the Envoys of both workers: the override's version was ACKed by all.
    _, versions = await lab.admin("GET", "/versions")
    override = next(v for v in versions["versions"] if v["cause"]["kind"] == "override")
    assert override["acked"] == len(envoys) and override["nodes"] == len(envoys), override


async def test_a_worker_killed_under_traffic_costs_no_request(lab: Lab, backends: list[DemoApp]) -> None:
    ports = [free_port() for _ in range(MAX_ENVOYS)]
    cp = await lab.start_control_plane(topology(backends, ports), workers=2)
    assert cp.workers is not None
    envoys = await spread_envoys(lab, cp)
    await all_acked(lab, len(envoys))
    for i in range(len(envoys)):
        await poll_until(lambda i=i: serves_all(lab, ports[i], {"b1", "b2", "b3"}), timeout=15, what=f"edge-{i + 1}")

    victim_slot = owners(cp)["edge-1"]
    victims = {node for node, slot in owners(cp).items() if slot == victim_slot}
    streams_before = {s.node_key: s.stream_id for s in cp.nodes.streams()}
    pid = cp.workers.pids()[victim_slot]
    traffic = [Traffic(lab, ports[i]) for i in range(len(envoys))]
    await asyncio.sleep(0.3)
    os.kill(pid, signal.SIGKILL)

    async def replaced() -> bool:
        assert cp.workers is not None
        now = cp.workers.pids().get(victim_slot)
        return cp.workers.restarts == 1 and now is not None and now != pid

    await poll_until(replaced, timeout=15, what="the killed worker replaced")

    async def reconnected() -> bool:
        streams = {s.node_key: s.stream_id for s in cp.nodes.streams()}
        return all(node in streams and streams[node] != streams_before[node] for node in victims)

    await poll_until(reconnected, timeout=15, what=f"{sorted(victims)} reconnected")
    nodes = await all_acked(lab, len(envoys))
    await asyncio.sleep(0.3)
    results = [await t.stop() for t in traffic]
    failed = {f"edge-{i + 1}": {k: v for k, v in r.items() if k != "ok"} for i, r in enumerate(results)}
    assert all(not f for f in failed.values()), failed
    assert all(r["ok"] > 0 for r in results), results

    # Back on the current version, and the next change reaches every Envoy, on either worker.
    _, snapshot = await lab.admin("GET", "/snapshot")
    assert all(n["types"]["eds"]["version_acked"] == snapshot["type_versions"]["eds"] for n in nodes)
    await lab.override(f"127.0.0.1:{backends[0].port}", "UNHEALTHY")
    for envoy in envoys:
        await wait_flags(envoy, backends[0].port, "failed_eds_health")
    _, events = await lab.admin("GET", "/events?kind=worker")
    assert [e["slot"] for e in events["events"]] == [victim_slot], events


def csds_view(response: csds_pb2.ClientStatusResponse) -> dict[str, dict[tuple[str, str], tuple[str, str]]]:
    """Per node, per resource: (client status, config status), without versions or times."""
    rs, cs = dump.ClientResourceStatus, csds_pb2.ConfigStatus
    return {
        config.node.id: {
            (c.type_url.rsplit(".", 1)[-1], c.name): (rs.Name(c.client_status), cs.Name(c.config_status))
            for c in config.generic_xds_configs
        }
        for config in response.config
    }


async def views_after_an_override(lab: Lab, backends: list[DemoApp], workers: int) -> dict[str, Any]:
    ports = [free_port() for _ in range(MAX_ENVOYS)]
    cp = await lab.start_control_plane(topology(backends, ports), workers=workers)
    envoys = [await lab.start_envoy(f"edge-{i}", f"edge-{i}", delta=i == 2) for i in (1, 2, 3)]
    await all_acked(lab, len(envoys))
    await lab.override(f"127.0.0.1:{backends[0].port}", "DRAINING")
    version = cp.snapshot.version
    nodes = await all_acked(lab, len(envoys))
    _, record = await lab.admin("GET", f"/versions/{version}")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{cp.xds_port}") as channel:
        stub = csds_pb2_grpc.ClientStatusDiscoveryServiceStub(channel)
        csds = csds_view(await stub.FetchClientStatus(csds_pb2.ClientStatusRequest()))
    propagation = {
        "nodes": record["nodes"],
        "acked": record["acked"],
        "pending": record["pending"],
        "converged": record["converged"],
        "per_node": sorted((d["node"], d["status"], d["types"]) for d in record["per_node"]),
        "ack_after_send": all(0 <= d["sent_ms"] <= d["ack_ms"] < 10_000 for d in record["per_node"]),
    }
    shown = sorted((n["id"], n["protocol"], n["up_to_date"], sorted(n["types"])) for n in nodes)
    for envoy in envoys:
        await envoy.stop()
    lab.envoys.clear()
    await cp.aclose()
    return {"propagation": propagation, "csds": csds, "nodes": shown}


async def test_propagation_and_csds_read_the_same_with_one_and_two_workers(lab: Lab, backends: list[DemoApp]) -> None:
    one = await views_after_an_override(lab, backends, 1)
    two = await views_after_an_override(lab, backends, 2)
    assert one["propagation"]["acked"] == 3 and one["propagation"]["converged"], one
    assert one["csds"] and all(s == ("ACKED", "SYNCED") for node in one["csds"].values() for s in node.values())
    assert two == one
    assert collections.Counter(len(v) for v in two["csds"].values()) == collections.Counter(
        len(v) for v in one["csds"].values()
    )


async def test_passive_health_from_envoys_logging_through_the_workers(
    lab: Lab, flaky: list[Backend], monkeypatch: pytest.MonkeyPatch
) -> None:
    """test_passive_envoy's two-Envoy test, its assertions unchanged, with two xDS workers: each
    Envoy's access-log stream lands on a worker and is relayed to the main process's counts."""
    start = Lab.start_control_plane

    async def on_workers(self: Lab, document: dict[str, Any], *, xds_port: int = 0, workers: int = 1) -> ControlPlane:
        return await start(self, document, xds_port=xds_port, workers=2)

    monkeypatch.setattr(Lab, "start_control_plane", on_workers)
    await passive.test_errors_seen_by_one_envoy_take_the_endpoint_out_of_both(lab, flaky)
    assert lab.cp is not None and lab.cp.workers is not None
    pool = lab.cp.workers
    relayed = await poll_until(
        lambda: asyncio.sleep(0, sum(w.stats.get("relayed", 0) for w in pool.workers.values())),
        timeout=5,
        what="the workers' heartbeats counting relayed calls",
    )
    assert relayed >= 2  # each Envoy's access-log stream, at least

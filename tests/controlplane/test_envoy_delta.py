"""Delta (incremental) xDS against real Envoys in DELTA_GRPC mode: traffic, health, topology
edits, NACKs, restarts, and a fleet that mixes both protocols."""

from __future__ import annotations

import asyncio
import collections
import contextlib
from typing import Any

import aiohttp
import pytest

from controlplane.snapshots import resources as rs
from lab.demoapp import DemoApp
from lab.envoyproc import EnvoyProcess, poll_until
from tests.conftest import Lab, web_topology
from tests.controlplane.test_envoy_integration import wait_flags, wait_traffic

pytestmark = pytest.mark.envoy


async def _node(lab: Lab, node_id: str = "front-1") -> dict[str, Any]:
    _, nodes = await lab.admin("GET", "/nodes")
    [node] = [n for n in nodes["nodes"] if n["id"] == node_id]
    return node


async def _no_warming(envoy: EnvoyProcess) -> bool:
    return await envoy.warming_clusters() == []


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

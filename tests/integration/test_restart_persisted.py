"""Control plane restarts under steady traffic through a real Envoy, with verdicts persisted.

A backend is down (its port closed) and marked UNHEALTHY by a real prober over the link. The
control plane restarts on the same data directory: its first snapshot already says UNHEALTHY,
so Envoy never routes to the dead port (it would answer 503 at once if the state were reset to
UNKNOWN, which Envoy treats as healthy). Both orders: the prober stays up and reconnects, or the
prober restarts too and arrives late with no opinion yet.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from controlplane.app import ControlPlane
from controlplane.health.store import HealthStatus
from controlplane.snapshots import resources as rs
from controlplane.snapshots.snapshot import version_key
from lab.demoapp import DemoApp
from lab.envoyproc import poll_until
from tests.conftest import Lab, Traffic, web_topology
from tests.integration.test_central_prober import HEALTH_CHECK, ExternalProber, wait_envoy_flag, wait_status

pytestmark = pytest.mark.envoy


@pytest.fixture
async def external_prober() -> AsyncIterator[ExternalProber]:
    external = ExternalProber()
    try:
        yield external
    finally:
        await external.disconnect()


async def setup(lab: Lab, backends: list[DemoApp], listener_port: int, tmp_path: Path, prober: ExternalProber) -> Any:
    document = web_topology(backends, listener_port, health_check=HEALTH_CHECK)
    document["controlplane"]["data_dir"] = str(tmp_path / "data")
    cp = await lab.start_control_plane(document)
    await prober.connect(cp.xds_port)
    for b in backends:
        await wait_status(lab, b.port, "HEALTHY")
    envoy = await lab.start_envoy()
    dead = backends[0]
    await dead.stop()  # connection refused from now on
    await wait_status(lab, dead.port, "UNHEALTHY")
    await wait_envoy_flag(envoy, dead.port, present=True)
    return document, cp, envoy, dead


async def restart(lab: Lab, cp: ControlPlane, document: dict[str, Any]) -> ControlPlane:
    xds_port = cp.xds_port
    await cp.aclose()
    return await lab.start_control_plane(document, xds_port=xds_port)


async def envoy_caught_up(cp: ControlPlane) -> bool:
    stream = cp.nodes.get("front-1")
    return (
        stream is not None
        and len(stream.types) == 4
        and all(ts.acked_version == cp.snapshot.type_versions[t] for t, ts in stream.types.items())
    )


def assert_never_unknown(cp: ControlPlane, endpoint: str) -> None:
    """Every snapshot this control plane built served the endpoint UNHEALTHY: no reset, no flap."""
    for snapshot in cp.cache.history:
        status = {f"{e.address}:{e.port}": e.status for e in snapshot.endpoints}[endpoint]
        assert status is HealthStatus.UNHEALTHY, (snapshot.version, snapshot.cause, status)


async def test_restart_with_the_prober_up(
    lab: Lab, backends: list[DemoApp], listener_port: int, tmp_path: Path, external_prober: ExternalProber
) -> None:
    document, cp, envoy, dead = await setup(lab, backends, listener_port, tmp_path, external_prober)
    old_versions = dict(cp.snapshot.type_versions)
    traffic = Traffic(lab, listener_port)
    try:
        await poll_until(lambda: _ok(traffic, 50), timeout=10, what="traffic flowing")
        new_cp = await restart(lab, cp, document)
        await poll_until(lambda: envoy_caught_up(new_cp), timeout=20, what="Envoy reconnected and up to date")

        async def prober_back() -> bool:
            record = new_cp.prober_link.probers.get("ext-1")
            return record is not None and record.connected and record.full_state_at is not None

        await poll_until(prober_back, timeout=20, what="the prober reconnected with its full state")
        new_cp.flush_verdicts()
        await poll_until(lambda: envoy_caught_up(new_cp), timeout=20, what="Envoy up to date after the prober")
        before = traffic.results["ok"]
        await poll_until(lambda: _ok(traffic, before + 50), timeout=10, what="more traffic after the restart")
    finally:
        results = await traffic.stop()
    assert set(results) == {"ok"}, f"failed requests around the restart: {results}"
    endpoint = f"127.0.0.1:{dead.port}"
    assert_never_unknown(new_cp, endpoint)
    assert [e.kind for e in new_cp.events.recent(kind="restore")] == ["restore"]
    for type_url, version in new_cp.snapshot.type_versions.items():
        assert version_key(version) > version_key(old_versions[type_url]), rs.SHORT_NAMES[type_url]
    await wait_envoy_flag(envoy, dead.port, present=True)


async def test_restart_with_the_prober_restarting_late(
    lab: Lab, backends: list[DemoApp], listener_port: int, tmp_path: Path, external_prober: ExternalProber
) -> None:
    document, cp, envoy, dead = await setup(lab, backends, listener_port, tmp_path, external_prober)
    traffic = Traffic(lab, listener_port)
    late = ExternalProber()
    try:
        await poll_until(lambda: _ok(traffic, 50), timeout=10, what="traffic flowing")
        await external_prober.disconnect()  # the prober goes down with the control plane
        restarted = time.time()
        new_cp = await restart(lab, cp, document)
        await poll_until(lambda: envoy_caught_up(new_cp), timeout=20, what="Envoy reconnected and up to date")
        before = traffic.results["ok"]
        await poll_until(lambda: _ok(traffic, before + 50), timeout=10, what="traffic with no prober at all")

        # A fresh prober: it knows nothing yet (UNKNOWN), then its thresholds decide again.
        await late.connect(new_cp.xds_port)
        endpoint = f"127.0.0.1:{dead.port}"

        async def prober_decided() -> bool:
            new_cp.flush_verdicts()
            votes = new_cp.admission.quorum.votes("web", endpoint)
            return any(v.source == "prober:ext-1" and v.time > restarted for v in votes)

        await poll_until(prober_decided, timeout=20, what="the late prober's own verdict on the dead backend")
        await poll_until(lambda: envoy_caught_up(new_cp), timeout=20, what="Envoy up to date")
        before = traffic.results["ok"]
        await poll_until(lambda: _ok(traffic, before + 50), timeout=10, what="traffic after the prober")
    finally:
        results = await traffic.stop()
        await late.disconnect()
    assert set(results) == {"ok"}, f"failed requests around the restart: {results}"
    assert_never_unknown(new_cp, endpoint)
    assert new_cp.health.status("web", endpoint) is HealthStatus.UNHEALTHY
    await wait_envoy_flag(envoy, dead.port, present=True)


async def _ok(traffic: Traffic, n: int) -> bool:
    return traffic.results["ok"] >= n

"""The central prober driving a real Envoy: a backend's /livez flips, Envoy follows the verdict."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from controlplane.health.store import HealthStatus
from lab.demoapp import DemoApp
from lab.envoyproc import EnvoyProcess, poll_until
from prober.link import ControlPlaneLink
from prober.scheduler import Prober
from tests.conftest import Lab, web_topology

pytestmark = pytest.mark.envoy

HEALTH_CHECK = {
    "http": {"path": "/livez"},
    "interval": "100ms",
    "timeout": "80ms",
    "healthy_threshold": 2,
    "unhealthy_threshold": 2,
}


async def flip(app: DemoApp, value: str) -> None:
    async with aiohttp.ClientSession() as session, session.post(f"{app.url}/livez", data={"livez": value}) as r:
        assert r.status == 200


async def wait_status(lab: Lab, port: int, status: str) -> dict[str, Any]:
    async def probe() -> dict[str, Any] | None:
        _, snapshot = await lab.admin("GET", "/snapshot")
        for ep in snapshot["clusters"][0]["endpoints"]:
            if ep["port"] == port and ep["status"] == status:
                return dict(ep)
        return None

    return await poll_until(probe, timeout=10, what=f"port {port} {status} in /snapshot")


async def wait_envoy_flag(envoy: EnvoyProcess, port: int, present: bool) -> None:
    async def probe() -> bool:
        hosts = (await envoy.clusters()).get("web", [])
        flags = next((h.health_flags for h in hosts if h.port == port), frozenset())
        return ("failed_eds_health" in flags) == present

    await poll_until(probe, timeout=10, what=f"failed_eds_health {'set' if present else 'cleared'} on {port}")


async def fail_and_recover(lab: Lab, envoy: EnvoyProcess, backends: list[DemoApp], listener_port: int) -> str:
    """The seed's experiment; returns the source of the UNHEALTHY verdict."""
    for b in backends:
        await wait_status(lab, b.port, "HEALTHY")
    b1 = backends[0]

    await flip(b1, "FAIL")
    unhealthy = await wait_status(lab, b1.port, "UNHEALTHY")
    assert unhealthy["reason"] == "http 506"
    await wait_envoy_flag(envoy, b1.port, present=True)
    served = b1.served
    seen = await lab.hits(listener_port, 40)
    assert set(seen) == {"b2", "b3"}
    assert b1.served == served

    _, events = await lab.admin("GET", "/events?kind=probe")
    down = [e for e in events["events"] if e["endpoint"] == f"127.0.0.1:{b1.port}" and "-> UNHEALTHY" in e["message"]]
    assert down and down[-1]["counters"]["http_failures"] == 2, down

    await flip(b1, "OK")
    await wait_status(lab, b1.port, "HEALTHY")
    await wait_envoy_flag(envoy, b1.port, present=False)

    async def all_three() -> bool:
        return set(await lab.hits(listener_port, 30)) == {"b1", "b2", "b3"}

    await poll_until(all_three, timeout=10, what="traffic back on all three")
    return str(unhealthy["source"])


async def test_embedded_prober_takes_failed_backend_out_of_envoy(
    lab: Lab, backends: list[DemoApp], listener_port: int
) -> None:
    lab.embedded_prober = True
    await lab.start_control_plane(web_topology(backends, listener_port, health_check=HEALTH_CHECK))
    envoy = await lab.start_envoy()
    assert await fail_and_recover(lab, envoy, backends, listener_port) == "prober:embedded"


class ExternalProber:
    """A prober in this process that reports over the gRPC link, as `healthplane prober` does."""

    def __init__(self) -> None:
        self.link = ControlPlaneLink("", prober_id="ext-1", backoff_base=0.05, backoff_cap=0.5)
        self.prober = Prober(sink=self.link, source="prober:ext-1")
        self.link.prober = self.prober
        self.task: asyncio.Task[None] | None = None

    async def connect(self, xds_port: int) -> None:
        self.link.target = f"127.0.0.1:{xds_port}"
        await self.prober.start()
        self.task = asyncio.create_task(self.link.run())

    async def disconnect(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        await self.prober.aclose()


@pytest.fixture
async def external_prober() -> AsyncIterator[ExternalProber]:
    external = ExternalProber()
    try:
        yield external
    finally:
        await external.disconnect()


async def test_external_prober_over_the_link(
    lab: Lab, backends: list[DemoApp], listener_port: int, external_prober: ExternalProber
) -> None:
    cp = await lab.start_control_plane(web_topology(backends, listener_port, health_check=HEALTH_CHECK))
    await external_prober.connect(cp.xds_port)
    envoy = await lab.start_envoy()
    assert await fail_and_recover(lab, envoy, backends, listener_port) == "prober:ext-1"
    assert external_prober.link.connections == 1

    # The prober goes away: its verdicts are kept, with their age, rather than guessed.
    await flip(backends[1], "FAIL")
    await wait_status(lab, backends[1].port, "UNHEALTHY")
    await external_prober.disconnect()

    async def disconnected() -> bool:
        return not cp.prober_link.probers["ext-1"].connected

    await poll_until(disconnected, timeout=5, what="the prober's stream closed")
    _, before = await lab.admin("GET", "/snapshot")
    await asyncio.sleep(0.3)
    _, after = await lab.admin("GET", "/snapshot")
    ep_before = before["clusters"][0]["endpoints"][1]
    ep_after = after["clusters"][0]["endpoints"][1]
    assert ep_after["status"] == "UNHEALTHY" and ep_after["source"] == "prober:ext-1"
    assert ep_after["verdict_age_s"] > ep_before["verdict_age_s"]
    assert cp.health.status("web", f"127.0.0.1:{backends[0].port}") is HealthStatus.HEALTHY


async def test_restarted_control_plane_gets_the_probers_full_state(
    lab: Lab, backends: list[DemoApp], listener_port: int, external_prober: ExternalProber
) -> None:
    document = web_topology(backends, listener_port, health_check=HEALTH_CHECK)
    cp = await lab.start_control_plane(document)
    await external_prober.connect(cp.xds_port)
    await flip(backends[0], "FAIL")
    await wait_status(lab, backends[0].port, "UNHEALTHY")
    for b in backends[1:]:
        await wait_status(lab, b.port, "HEALTHY")

    xds_port = cp.xds_port
    await cp.aclose()
    new_cp = await lab.start_control_plane(document, xds_port=xds_port)

    async def reconnected() -> bool:
        record = new_cp.prober_link.probers.get("ext-1")
        return record is not None and record.full_state_at is not None

    await poll_until(reconnected, timeout=10, what="the prober reconnected with its full state")
    new_cp.flush_verdicts()
    # Straight from the full state: no threshold to wait for, no UNKNOWN interlude.
    assert new_cp.health.status("web", f"127.0.0.1:{backends[0].port}") is HealthStatus.UNHEALTHY
    for b in backends[1:]:
        assert new_cp.health.status("web", f"127.0.0.1:{b.port}") is HealthStatus.HEALTHY
    assert external_prober.link.connections == 2


async def test_prober_command_reports_to_a_control_plane(lab: Lab, backends: list[DemoApp], listener_port: int) -> None:
    cp = await lab.start_control_plane(web_topology(backends, listener_port, health_check=HEALTH_CHECK))
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "controlplane",
        "--log-level",
        "warning",
        "prober",
        "--controlplane",
        f"127.0.0.1:{cp.xds_port}",
        "--id",
        "cli-prober",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        for b in backends:
            ep = await wait_status(lab, b.port, "HEALTHY")
            assert ep["source"] == "prober:cli-prober"
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = await asyncio.wait_for(process.communicate(), 10)
    assert process.returncode == 0, output.decode()
    assert b"reporting to 127.0.0.1:" in output

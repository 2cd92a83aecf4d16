"""A prober that loses its view of the world does not take the world out of a real Envoy.

The backends serve traffic on their ports; the prober checks them through one health port (a
separate app, standing in for the prober's network path). That app goes away: every check fails
in the same round while the service is fine. The mass-failure guard holds the failures, Envoy
keeps routing to all three with no failed request, an alarm says why; when the checks pass
again the alarm clears by itself, and an operator can instead accept the failures.
"""

from __future__ import annotations

import collections
from typing import Any

import pytest

from lab.demoapp import DemoApp
from lab.envoyproc import poll_until
from tests.conftest import Lab, Traffic, web_topology
from tests.integration.test_central_prober import wait_envoy_flag, wait_status

pytestmark = pytest.mark.envoy

TOKEN = "accept-token-1"


def health_check(port: int) -> dict[str, Any]:
    return {
        "http": {"path": "/livez"},
        "port": port,
        "interval": "100ms",
        "timeout": "80ms",
        "healthy_threshold": 2,
        "unhealthy_threshold": 2,
    }


async def start(lab: Lab, backends: list[DemoApp], listener_port: int) -> DemoApp:
    probe_path = DemoApp("probe-path")
    await probe_path.start("127.0.0.1", 0)
    document = web_topology(backends, listener_port, health_check=health_check(probe_path.port))
    document["controlplane"]["admin"] = {"token": TOKEN}
    lab.embedded_prober = True
    await lab.start_control_plane(document)
    for b in backends:
        await wait_status(lab, b.port, "HEALTHY")
    await lab.start_envoy()
    return probe_path


async def active_alarms(lab: Lab) -> list[dict[str, Any]]:
    _, body = await lab.admin("GET", "/alarms")
    alarms: list[dict[str, Any]] = body["active"]
    return alarms


async def test_held_while_the_prober_is_blind_then_cleared(
    lab: Lab, backends: list[DemoApp], listener_port: int
) -> None:
    probe_path = await start(lab, backends, listener_port)
    envoy = lab.envoys[0]
    assert lab.cp is not None
    traffic = Traffic(lab, listener_port)
    try:
        await probe_path.stop()  # every check fails from now on; the service is fine
        alarms = await poll_until(lambda: raised(lab), timeout=10, what="a mass_failure alarm")
        assert [(a["kind"], a["subject"]) for a in alarms] == [("mass_failure", "web")]
        await poll_until(lambda: _held(lab, 3), timeout=10, what="all three failures held")
        # Failures applied before the share was crossed were reverted: all three served HEALTHY.
        assert {e.status.name for e in lab.cp.snapshot.endpoints} == {"HEALTHY"}
        for b in backends:
            await wait_envoy_flag(envoy, b.port, present=False)
        seen = await lab.hits(listener_port, 30)
        assert set(seen) == {"b1", "b2", "b3"}

        await probe_path.start("127.0.0.1", probe_path.port)  # the prober sees again

        async def cleared() -> bool:
            return await active_alarms(lab) == []

        await poll_until(cleared, timeout=10, what="the alarm cleared by passing checks")
    finally:
        results = await traffic.stop()
        await probe_path.stop()
    assert set(results) == {"ok"}, f"failed requests while the prober was blind: {results}"
    assert {e.status.name for e in lab.cp.snapshot.endpoints} == {"HEALTHY"}
    _, events = await lab.admin("GET", "/events?kind=alarm")
    assert [e["message"].split(":")[0] for e in events["events"]] == [
        f"alarm {alarms[0]['id']} raised",
        f"alarm {alarms[0]['id']} cleared",
    ]


async def test_an_operator_accepts_the_failures(lab: Lab, backends: list[DemoApp], listener_port: int) -> None:
    probe_path = await start(lab, backends, listener_port)
    envoy = lab.envoys[0]
    await probe_path.stop()
    [alarm] = await poll_until(lambda: raised(lab), timeout=10, what="a mass_failure alarm")
    await poll_until(lambda: _held(lab, 3), timeout=10, what="all three failures held")
    code, body = await lab.admin("POST", f"/alarms/{alarm['id']}/accept", headers={"Authorization": f"Bearer {TOKEN}"})
    assert code == 200 and body["changed"] is True
    for b in backends:
        await wait_envoy_flag(envoy, b.port, present=True)
    seen: collections.Counter[str] = await lab.hits(listener_port, 5)
    assert set(seen) == {"status 503"}  # no healthy host: what the operator accepted


async def raised(lab: Lab) -> list[dict[str, Any]] | None:
    return await active_alarms(lab) or None


async def _held(lab: Lab, n: int) -> bool:
    assert lab.cp is not None
    print(
        lab.cp.admission.guard.held,
        lab.cp.admission.guard.recent,
        [(e.kind, e.message) for e in lab.cp.events.recent(30) if e.kind != "node"],
    )
    return len(lab.cp.admission.guard.held.get("web", {})) == n

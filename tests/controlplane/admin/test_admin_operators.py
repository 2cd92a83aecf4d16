"""What operators expect of the admin API (issue 18): nginx's up/down vocabulary, readiness with
nothing to check, the build and runtime metrics, and which statuses an override may pin."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from importlib import metadata
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from controlplane.admin.views import DOWN, UP, parse_status_filter
from controlplane.app import ControlPlane
from controlplane.health.store import HealthStatus, Verdict
from controlplane.topology.parse import load_topology
from tests.controlplane.admin.test_admin import DOCUMENT, Admin


@pytest.fixture
async def admin(tmp_path: Path) -> AsyncIterator[Admin]:
    config = tmp_path / "topology.yaml"
    document = json.loads(json.dumps(DOCUMENT))
    document["controlplane"]["watch_interval"] = 0
    config.write_text(yaml.safe_dump(document))
    async with ControlPlane(load_topology(config), config_path=config) as cp, aiohttp.ClientSession() as session:
        yield Admin(cp, session, config)


def test_up_and_down_cover_every_status_once() -> None:
    assert UP | DOWN == set(HealthStatus) and not UP & DOWN


@pytest.mark.parametrize(
    ("text", "selected"),
    [
        ("up", UP),
        ("Down", DOWN),
        ("draining", {HealthStatus.DRAINING}),
        ("TIMEOUT", {HealthStatus.TIMEOUT}),
        ("", None),
        (None, None),
    ],
)
def test_status_filter_takes_both_vocabularies(text: str | None, selected: set[HealthStatus] | None) -> None:
    assert parse_status_filter(text) == selected


def test_an_unknown_status_filter_names_both_vocabularies() -> None:
    with pytest.raises(ValueError, match=r"unknown health status 'sick' \(expected one of .*\), or up or down"):
        parse_status_filter("sick")


async def _mixed(admin: Admin) -> None:
    """web: 8081 HEALTHY, 8082 UNHEALTHY; api: 10.0.0.1:80 pinned DRAINING."""
    admin.cp.submit_verdicts(
        [
            Verdict("web", "127.0.0.1:8081", HealthStatus.HEALTHY, "http 200"),
            Verdict("web", "127.0.0.1:8082", HealthStatus.UNHEALTHY, "http 506"),
        ]
    )
    code, _ = await admin.call("POST", "/endpoints/api/10.0.0.1:80/override", json={"status": "DRAINING"})
    assert code == 200


async def test_endpoints_and_status_filter_with_nginx_up_and_down(admin: Admin) -> None:
    await _mixed(admin)
    code, body = await admin.call("GET", "/endpoints?status=down")
    assert code == 200 and [e["endpoint"] for e in body["endpoints"]] == ["127.0.0.1:8082", "10.0.0.1:80"]
    code, body = await admin.call("GET", "/endpoints?status=UP")
    assert code == 200 and [e["endpoint"] for e in body["endpoints"]] == ["127.0.0.1:8081"]
    code, body = await admin.call("GET", "/status?format=json&status=down")
    servers = body["servers"]["server"]
    assert code == 200 and [(s["name"], s["status"], s["health"]) for s in servers] == [
        ("127.0.0.1:8082", "down", "UNHEALTHY"),
        ("10.0.0.1:80", "down", "DRAINING"),
    ]
    code, body = await admin.call("GET", "/status?format=json&status=up&cluster=web")
    assert [(s["name"], s["status"]) for s in body["servers"]["server"]] == [("127.0.0.1:8081", "up")]
    async with admin.session.get(f"http://127.0.0.1:{admin.cp.admin_port}/status?format=csv&status=down") as r:
        assert r.status == 200 and (await r.text()).count("\n") == 3  # the header and two rows


async def test_readyz_waits_for_no_prober_when_nothing_is_checked(admin: Admin, tmp_path: Path) -> None:
    admin.cp.expect_remote_prober = True  # as `serve --no-prober` sets it; DOCUMENT has no health check
    code, body = await admin.call("GET", "/readyz")
    assert (code, body["status"]) == (200, "ready")
    checked: dict[str, Any] = json.loads(json.dumps(DOCUMENT))
    checked["clusters"][1]["health_check"] = {"tcp": {}, "interval": "1s", "timeout": "500ms"}
    admin.config.write_text(yaml.safe_dump(checked))
    assert (await admin.call("POST", "/topology/reload"))[0] == 200
    code, body = await admin.call("GET", "/readyz")
    assert (code, body["waiting_for"]) == (503, ["no connected remote prober has sent its full state"])


async def test_metrics_carry_the_build_and_the_process_and_runtime(admin: Admin) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    async with admin.session.get(f"http://127.0.0.1:{admin.cp.admin_port}/metrics") as r:
        families = {f.name: f for f in text_string_to_metric_families(await r.text())}
    (build,) = families["healthplane_build_info"].samples
    assert build.name == "healthplane_build_info" and build.value == 1
    assert build.labels["version"] == metadata.version("healthplane") and build.labels["python"]
    for name in ("process_cpu_seconds", "process_resident_memory_bytes", "process_open_fds", "python_info"):
        assert name in families, name
    assert families["python_gc_objects_collected"].samples


@pytest.mark.parametrize("status", ["UNKNOWN", "timeout"])
async def test_an_override_pins_only_what_an_operator_decides(admin: Admin, status: str) -> None:
    before = admin.cp.snapshot
    code, body = await admin.call("POST", "/endpoints/web/127.0.0.1:8081/override", json={"status": status})
    assert (code, body) == (
        400,
        {
            "error": f"{status.upper()} is what a check reports, not a pin: "
            "an override is HEALTHY, UNHEALTHY, DRAINING or DEGRADED, or auto to clear it",
            "field": "status",
        },
    )
    assert admin.cp.snapshot is before

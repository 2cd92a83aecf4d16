"""The grown admin API over real sockets: history and diffs, /endpoints, /status, SSE, PUT /topology."""

from __future__ import annotations

import asyncio
import csv
import io
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from controlplane.app import ControlPlane
from controlplane.health.store import HealthStatus, Verdict
from controlplane.topology.parse import load_topology, parse_topology
from lab.demoapp import DemoApp
from lab.envoyproc import poll_until
from prober.embedded import attach_embedded_prober
from tests.conftest import Lab, web_topology
from tests.controlplane.admin.test_admin import DOCUMENT, Admin
from tests.controlplane.probers import test_accesslog as als


@pytest.fixture
async def admin(tmp_path: Path) -> AsyncIterator[Admin]:
    config = tmp_path / "topology.yaml"
    document = json.loads(json.dumps(DOCUMENT))
    document["controlplane"]["watch_interval"] = 0  # no watcher racing the explicit changes
    config.write_text(yaml.safe_dump(document))
    async with ControlPlane(load_topology(config), config_path=config) as cp, aiohttp.ClientSession() as session:
        yield Admin(cp, session, config)


async def text(admin: Admin, path: str) -> tuple[int, str, str]:
    async with admin.session.get(f"http://127.0.0.1:{admin.cp.admin_port}{path}") as r:
        return r.status, r.content_type, await r.text()


async def test_history_lists_versions_with_cause_and_time(admin: Admin) -> None:
    start = admin.cp.snapshot.version
    admin.cp.submit_verdicts([Verdict("web", "127.0.0.1:8082", HealthStatus.UNHEALTHY, "http 506")])
    await admin.call("POST", "/endpoints/web/127.0.0.1:8081/override", json={"status": "DRAINING"})
    code, body = await admin.call("GET", "/snapshots")
    assert code == 200 and body["current"] == admin.cp.snapshot.version
    kinds = [(s["cause"]["kind"], s["endpoints"]) for s in body["snapshots"]]
    assert kinds == [
        ("override", {"DRAINING": 1, "UNHEALTHY": 1, "UNKNOWN": 1}),
        ("verdict", {"UNHEALTHY": 1, "UNKNOWN": 2}),
        ("start", {"UNKNOWN": 3}),
    ]
    assert (
        body["snapshots"][-1]["version"] == start
        and body["snapshots"][0]["created"] >= body["snapshots"][-1]["created"]
    )
    code, one = await admin.call("GET", f"/snapshots/{start}")
    assert code == 200 and one["version"] == start
    assert [e["status"] for e in one["clusters"][0]["endpoints"]] == ["UNKNOWN", "UNKNOWN"]
    assert set(one["resources"]["cds"]) == {"web", "api"}


async def test_diff_names_status_changes_and_changed_resources(admin: Admin) -> None:
    a = admin.cp.snapshot.version
    admin.cp.submit_verdicts([Verdict("web", "127.0.0.1:8082", HealthStatus.UNHEALTHY, "http 506")])
    b = admin.cp.snapshot.version
    code, diff = await admin.call("GET", f"/snapshots/{a}/diff/{b}")
    assert code == 200
    assert diff["endpoints"]["status_changed"] == [
        {"cluster": "web", "endpoint": "127.0.0.1:8082", "from": "UNKNOWN", "to": "UNHEALTHY"}
    ]
    assert diff["endpoints"]["added"] == [] and diff["endpoints"]["removed"] == []
    assert diff["resources"] == {"eds": {"added": [], "removed": [], "changed": ["web"]}}
    code, body = await admin.call("GET", f"/snapshots/{a}/diff/9.9")
    assert code == 404 and body["field"] == "b"


async def test_put_topology_validates_like_the_file_and_records_who(admin: Admin) -> None:
    version = admin.cp.snapshot.version
    bad = dict(DOCUMENT, clusters=[{"name": "web", "endpoints": [{"address": "127.0.0.1", "port": 70000}]}])
    code, body = await admin.call("PUT", "/topology", json=bad)
    assert code == 400 and body["field"] == "clusters[0].endpoints[0].port" and "65535" in body["error"]
    code, body = await admin.call("PUT", "/topology", data=b"clusters: [", headers={"Content-Type": "text/yaml"})
    assert code == 400 and "invalid YAML" in body["error"]
    moved = dict(DOCUMENT, controlplane={"xds": {"port": 0}, "admin": {"port": 1234}})
    code, body = await admin.call("PUT", "/topology", json=moved)
    assert code == 400 and body["field"] == "controlplane.admin"
    assert admin.cp.snapshot.version == version and [c.name for c in admin.cp.topology.clusters] == ["web", "api"]

    good = dict(DOCUMENT, clusters=[*DOCUMENT["clusters"], {"name": "extra", "endpoints": []}])
    code, body = await admin.call("PUT", "/topology", json=good, headers={"X-Healthplane-Who": "alice"})
    assert code == 200 and body["clusters"] == 3 and body["version"] == admin.cp.snapshot.version != version
    _, events = await admin.call("GET", "/events?kind=topology")
    last = events["events"][-1]
    assert last["who"].startswith("alice (127.0.0.1") and last["what"].startswith("PUT /topology")
    assert last["changed"]["Cluster"] == ["extra"]
    # YAML works too, exactly as the file would.
    code, body = await admin.call(
        "PUT", "/topology", data=yaml.safe_dump(DOCUMENT).encode(), headers={"Content-Type": "application/yaml"}
    )
    assert code == 200 and body["clusters"] == 2


async def test_token_from_the_config_guards_every_change(admin: Admin, tmp_path: Path) -> None:
    document = dict(DOCUMENT, controlplane={**DOCUMENT["controlplane"], "admin": {"port": 0, "token": "config-token"}})
    code, _ = await admin.call("PUT", "/topology", json=document)
    assert code == 200  # no token yet: this change sets one
    for method, path, payload in [
        ("PUT", "/topology", document),
        ("POST", "/topology/reload", None),
        ("POST", "/endpoints/web/127.0.0.1:8081/override", {"status": "UNHEALTHY"}),
    ]:
        code, body = await admin.call(method, path, json=payload)
        assert code == 401 and "Bearer" in body["error"], path
    code, _ = await admin.call(
        "POST",
        "/endpoints/web/127.0.0.1:8081/override",
        json={"status": "UNHEALTHY"},
        headers={"Authorization": "Bearer config-token", "X-Healthplane-Who": "bob"},
    )
    assert code == 200
    _, events = await admin.call("GET", "/events?kind=override")
    assert events["events"][-1]["who"].startswith("bob (")


async def test_endpoints_filter_by_cluster_and_status(admin: Admin) -> None:
    admin.cp.submit_verdicts([Verdict("web", "127.0.0.1:8082", HealthStatus.UNHEALTHY, "http 506", source="p")])
    await admin.call("POST", "/endpoints/api/10.0.0.1:80/override", json={"status": "DRAINING", "who": "carol"})
    code, body = await admin.call("GET", "/endpoints")
    assert code == 200 and [e["endpoint"] for e in body["endpoints"]] == [
        "127.0.0.1:8081",
        "127.0.0.1:8082",
        "10.0.0.1:80",
    ]
    code, body = await admin.call("GET", "/endpoints?status=unhealthy")
    (row,) = body["endpoints"]
    assert row["endpoint"] == "127.0.0.1:8082" and row["reason"] == "http 506" and row["since"] > 0
    assert row["check"] is None  # no prober here
    code, body = await admin.call("GET", "/endpoints?cluster=api")
    (row,) = body["endpoints"]
    assert row["override"] == "DRAINING" and row["override_by"].startswith("carol")
    code, body = await admin.call("GET", "/endpoints?status=sick")
    assert code == 400 and body["field"] == "status"
    code, body = await admin.call("GET", "/endpoints?cluster=nope")
    assert code == 404 and body["field"] == "cluster"


async def test_status_page_in_three_formats(admin: Admin) -> None:
    admin.cp.submit_verdicts([Verdict("web", "127.0.0.1:8082", HealthStatus.UNHEALTHY, "http 506")])
    code, ctype, page = await text(admin, "/status?refresh=2")
    assert code == 200 and ctype == "text/html"
    assert '<meta http-equiv="refresh" content="2">' in page and page.count("<tr class=") == 3
    code, ctype, body = await text(admin, "/status?format=csv&cluster=web")
    rows = list(csv.DictReader(io.StringIO(body)))
    assert ctype == "text/csv" and [(r["endpoint"], r["status"]) for r in rows] == [
        ("127.0.0.1:8081", "UNKNOWN"),
        ("127.0.0.1:8082", "UNHEALTHY"),
    ]
    code, body = await admin.call("GET", "/status?format=json")
    servers = body["servers"]
    assert servers["total"] == 3 and servers["generation"] == admin.cp.snapshot.version
    assert servers["server"][1]["up"] == "down" and servers["server"][1]["upstream"] == "web"
    code, body = await admin.call("GET", "/status?format=xml")
    assert code == 400 and body["field"] == "format"


async def test_events_stream_sends_new_events_live_and_resumes(admin: Admin) -> None:
    url = f"http://127.0.0.1:{admin.cp.admin_port}/events/stream?kind=override"
    async with admin.session.get(url) as r:
        assert r.status == 200 and r.content_type == "text/event-stream"
        assert (await r.content.readline()).startswith(b":")
        await r.content.readline()
        code, _ = await admin.call("POST", "/endpoints/web/127.0.0.1:8081/override", json={"status": "UNHEALTHY"})
        assert code == 200
        lines = [(await asyncio.wait_for(r.content.readline(), 5)).decode().rstrip("\n") for _ in range(3)]
    assert lines[1] == "event: override"
    event = json.loads(lines[2].removeprefix("data: "))
    assert event["status"] == "UNHEALTHY" and event["endpoint"] == "127.0.0.1:8081"
    first_id = int(lines[0].removeprefix("id: "))
    await admin.call("POST", "/endpoints/web/127.0.0.1:8081/override", json={"status": "auto"})
    # Reconnecting with Last-Event-ID replays what was missed.
    async with admin.session.get(url, headers={"Last-Event-ID": str(first_id)}) as r:
        await r.content.readline()
        await r.content.readline()
        replay = [(await asyncio.wait_for(r.content.readline(), 5)).decode() for _ in range(3)]
    assert json.loads(replay[2].removeprefix("data: "))["status"] == "auto"


async def test_every_route_is_in_the_openapi_document(admin: Admin) -> None:
    code, doc = await admin.call("GET", "/openapi.json")
    assert code == 200 and doc["openapi"].startswith("3.")
    app = admin.cp._process._admin.app  # type: ignore[union-attr]
    routes = {(r.method.lower(), r.resource.canonical) for r in app.router.routes() if r.method != "HEAD"}
    documented = {(m, p) for p, ops in doc["paths"].items() for m in ops}
    assert routes <= documented, routes - documented
    assert documented <= routes, documented - routes


HEALTH_CHECK: dict[str, Any] = {
    "http": {"path": "/livez"},
    "interval": "100ms",
    "timeout": "80ms",
    "healthy_threshold": 2,
    "unhealthy_threshold": 3,
}


async def test_embedded_prober_check_details_and_readiness(
    tmp_path: Path, backends: list[DemoApp], listener_port: int
) -> None:
    lab = Lab(tmp_path)
    lab.embedded_prober = True
    try:
        await lab.start_control_plane(web_topology(backends, listener_port, health_check=HEALTH_CHECK))

        async def checked() -> dict[str, Any] | None:
            _, body = await lab.admin("GET", "/endpoints")
            done = all(e["check"]["last_check"] and e["status"] == "HEALTHY" for e in body["endpoints"])
            return body if done else None

        body = await poll_until(checked, timeout=10, what="every endpoint checked and HEALTHY")
        check = body["endpoints"][0]["check"]
        assert check["check_type"] == "http" and check["rise"] == 2 and check["fall"] == 3
        assert check["counters"]["successes"] == 2 and check["last_check"]["result"] == "success"
        assert check["last_check"]["latency_ms"] > 0 and check["prober"] == "prober:embedded"
        code, ready = await lab.admin("GET", "/readyz")
        assert code == 200 and ready["status"] == "ready"
        from prometheus_client.parser import text_string_to_metric_families

        async with lab.session.get(f"http://127.0.0.1:{lab.cp.admin_port}/metrics") as r:  # type: ignore[union-attr]
            samples = {
                (s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(await r.text())
                for s in family.samples
            }
        assert samples[("healthplane_checks_total", (("cluster", "web"), ("outcome", "success")))] >= 6
        assert samples[("healthplane_check_latency_seconds_count", (("check", "http"), ("cluster", "web")))] >= 6
        code, status = await lab.admin("GET", "/status?format=json")
        assert {s["rise"] for s in status["servers"]["server"]} == {2} and status["servers"]["server"][0][
            "type"
        ] == "http"
    finally:
        await lab.aclose()


async def test_readyz_waits_for_the_embedded_probers_first_round(tmp_path: Path, listener_port: int) -> None:
    document = web_topology([], listener_port)
    document["clusters"][0]["endpoints"] = [{"address": "127.0.0.1", "port": 9}]
    document["clusters"][0]["health_check"] = {**HEALTH_CHECK, "interval": "1h", "initial_jitter": "1h"}
    config = tmp_path / "t.yaml"
    config.write_text(yaml.safe_dump(document))
    cp = ControlPlane(load_topology(config))
    attach_embedded_prober(cp)
    async with (
        cp,
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{cp.admin_port}/readyz") as r,
    ):
        body = await r.json()
    assert r.status == 503 and body["waiting_for"] == ["embedded prober: 1 endpoints not checked yet"]


async def test_remote_prober_check_states_reach_endpoints_and_status(
    tmp_path: Path, backends: list[DemoApp], listener_port: int
) -> None:
    from tests.integration.test_central_prober import ExternalProber, flip

    lab, external = Lab(tmp_path), ExternalProber()
    external.link.check_report_interval = 0.1
    try:
        cp = await lab.start_control_plane(web_topology(backends, listener_port, health_check=HEALTH_CHECK))
        cp.expect_remote_prober = True  # as `serve --no-prober` sets it
        code, waiting = await lab.admin("GET", "/readyz")
        assert code == 503 and waiting["waiting_for"] == ["no connected remote prober has sent its full state"]
        await external.connect(cp.xds_port)
        await flip(backends[0], "FAIL")
        b1 = f"127.0.0.1:{backends[0].port}"

        async def failing() -> dict[str, Any] | None:
            _, body = await lab.admin("GET", "/endpoints?cluster=web")
            row = next(e for e in body["endpoints"] if e["endpoint"] == b1)
            check = row["check"]
            if check and check["last_check"] and check["last_check"]["result"] == "http_failure":
                return dict(check)
            return None

        check = await poll_until(failing, timeout=10, what="the remote prober's failing check in /endpoints")
        assert check["prober"] == "prober:ext-1" and check["check_type"] == "http" and check["fall"] == 3
        assert check["counters"]["http_failures"] >= 1 and check["last_check"]["reason"] == "http 506"
        code, ready = await lab.admin("GET", "/readyz")
        assert code == 200, ready
        async with lab.session.get(f"http://127.0.0.1:{cp.admin_port}/status?format=csv") as r:
            rows = {row["endpoint"]: row for row in csv.DictReader(io.StringIO(await r.text()))}
        assert rows[b1]["last_result"] == "http_failure" and int(rows[b1]["fall"]) >= 1
        assert rows[b1]["check_type"] == "http"
    finally:
        await external.disconnect()
        await lab.aclose()


async def test_endpoints_show_the_passive_counters_fed_by_access_logs() -> None:
    async with ControlPlane(parse_topology(als.DOCUMENT)) as cp, aiohttp.ClientSession() as session:
        admin = Admin(cp, session, Path())
        one, two = als.Stream(cp), als.Stream(cp)
        try:
            await one.send(als.message([als.entry(8081, 500), als.entry(8082, 500)], node="front-1"))
            await two.send(
                als.message(
                    [als.entry(8081, 500), als.entry(8082, 503, upstream_connection_failure=True)], node="front-2"
                )
            )
            await als.until(lambda: cp.access_log.entries["counted"] == 4)
            code, body = await admin.call("GET", "/endpoints")
            assert code == 200
            rows = {(r["cluster"], r["endpoint"]): r for r in body["endpoints"]}
            assert "passive" not in rows["plain", "127.0.0.1:9000"]  # a cluster without `passive`
            first = rows["web", "127.0.0.1:8081"]["passive"]
            assert (first["http_failures"], first["tcp_failures"], first["successes"]) == (2, 0, 0)
            assert first["seen_by"] == {"front-1": 1, "front-2": 1} and first["ejected"] is False
            second = rows["web", "127.0.0.1:8082"]["passive"]
            assert (second["http_failures"], second["tcp_failures"]) == (1, 1)
            assert rows["web", "127.0.0.1:8083"]["passive"]["seen_by"] == {}

            await one.send(als.message([als.entry(8081, 500)]))  # the third in a row: ejected
            await als.until(lambda: cp.health.status("web", "127.0.0.1:8081").name == "UNHEALTHY")
            code, body = await admin.call("GET", "/endpoints?cluster=web&status=unhealthy")
            (row,) = body["endpoints"]
            assert row["source"] == "passive" and row["passive"]["ejected"] is True
            assert row["passive"]["ejections_in_a_row"] == 1 and row["passive"]["http_failures"] == 0
            assert row["passive"]["ejected_until"] > row["passive"]["ejected_at"] and row["passive"]["remaining_s"] > 0
            code, body = await admin.call("GET", "/status?format=json&status=down")
            (server,) = body["servers"]["server"]
            assert server["name"] == "127.0.0.1:8081" and server["passive"]["ejected"] is True
        finally:
            await one.aclose()
            await two.aclose()

"""The admin API over a real socket: reads, overrides, reloads and their errors."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from controlplane.app import ControlPlane
from controlplane.health.store import HealthStatus, Verdict
from controlplane.topology.parse import load_topology
from lab.envoyproc import poll_until

DOCUMENT: dict[str, Any] = {
    "controlplane": {"xds": {"port": 0}, "admin": {"port": 0}, "watch_interval": "50ms"},
    "clusters": [
        {"name": "web", "endpoints": [{"address": "127.0.0.1", "port": 8081}, {"address": "127.0.0.1", "port": 8082}]},
        {"name": "api", "endpoints": [{"address": "10.0.0.1", "port": 80}]},
    ],
    "listeners": [{"name": "ingress", "port": 10000, "routes": [{"prefix": "/", "cluster": "web"}]}],
}


class Admin:
    def __init__(self, cp: ControlPlane, session: aiohttp.ClientSession, config: Path) -> None:
        self.cp, self.session, self.config = cp, session, config

    async def call(self, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
        async with self.session.request(method, f"http://127.0.0.1:{self.cp.admin_port}{path}", **kwargs) as r:
            return r.status, await r.json()


@pytest.fixture
async def admin(tmp_path: Path) -> AsyncIterator[Admin]:
    config = tmp_path / "topology.yaml"
    config.write_text(yaml.safe_dump(DOCUMENT))
    async with ControlPlane(load_topology(config), config_path=config) as cp, aiohttp.ClientSession() as session:
        yield Admin(cp, session, config)


async def test_snapshot_lists_endpoints_with_status_and_source(admin: Admin) -> None:
    admin.cp.submit_verdicts([Verdict("web", "127.0.0.1:8082", HealthStatus.UNHEALTHY, "http 506", source="prober:t")])
    code, body = await admin.call("GET", "/snapshot")
    assert code == 200
    assert body["version"] == admin.cp.snapshot.version
    web = body["clusters"][0]
    assert [(e["port"], e["status"]) for e in web["endpoints"]] == [(8081, "UNKNOWN"), (8082, "UNHEALTHY")]
    assert web["endpoints"][1]["reason"] == "http 506" and web["endpoints"][1]["source"] == "prober:t"
    assert web["endpoints"][1]["verdict_age_s"] >= 0
    assert body["cause"]["kind"] == "verdict"
    assert body["probers"]["connected"] is False
    assert "last verdicts are kept" in body["probers"]["note"]


async def test_override_changes_only_that_clusters_endpoints_version(admin: Admin) -> None:
    before = admin.cp.snapshot
    code, body = await admin.call("POST", "/endpoints/web/127.0.0.1:8081/override", json={"status": "draining"})
    assert code == 200 and body["status"] == "DRAINING" and body["changed"] is True
    after = admin.cp.snapshot
    eds = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
    assert after.resources[eds]["web"].version == after.version
    assert after.resources[eds]["api"] is before.resources[eds]["api"]
    for type_url in set(after.type_versions) - {eds}:
        assert after.type_versions[type_url] == before.type_versions[type_url]

    code, body = await admin.call("POST", "/endpoints/web/127.0.0.1:8081/override", json={"status": "DRAINING"})
    assert code == 200 and body["changed"] is False and admin.cp.snapshot is after

    code, body = await admin.call("POST", "/endpoints/web/127.0.0.1:8081/override", json={"status": "auto"})
    assert body["status"] == "UNKNOWN" and body["override"] is None


@pytest.mark.parametrize(
    ("path", "payload", "status", "field"),
    [
        ("/endpoints/web/127.0.0.1:8081/override", {"status": "SICK"}, 400, "status"),
        ("/endpoints/web/127.0.0.1:8081/override", {}, 400, "status"),
        ("/endpoints/web/127.0.0.1:8081/override", [1], 400, "status"),
        ("/endpoints/web/127.0.0.1/override", {"status": "HEALTHY"}, 400, "endpoint"),
        ("/endpoints/nope/127.0.0.1:8081/override", {"status": "HEALTHY"}, 404, "cluster"),
        ("/endpoints/web/127.0.0.1:9999/override", {"status": "HEALTHY"}, 404, "endpoint"),
    ],
)
async def test_bad_override_requests_get_json_errors(
    admin: Admin, path: str, payload: Any, status: int, field: str
) -> None:
    version = admin.cp.snapshot.version
    code, body = await admin.call("POST", path, json=payload)
    assert code == status
    assert body["field"] == field and body["error"]
    assert admin.cp.snapshot.version == version


async def test_override_body_must_be_json(admin: Admin) -> None:
    code, body = await admin.call("POST", "/endpoints/web/127.0.0.1:8081/override", data=b"{not json")
    assert code == 400 and body["field"] == "body"


async def test_unknown_path_is_a_json_404(admin: Admin) -> None:
    code, body = await admin.call("GET", "/no/such/thing")
    assert code == 404 and "error" in body


async def test_changes_need_the_token_when_one_is_set(admin: Admin, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HEALTHPLANE_ADMIN_TOKEN", "s3cret")
    path = "/endpoints/web/127.0.0.1:8081/override"
    code, _ = await admin.call("POST", path, json={"status": "UNHEALTHY"})
    assert code == 401
    code, _ = await admin.call("POST", path, json={"status": "UNHEALTHY"}, headers={"Authorization": "Bearer nope"})
    assert code == 401
    code, _ = await admin.call("POST", path, json={"status": "UNHEALTHY"}, headers={"Authorization": "Bearer s3cret"})
    assert code == 200
    code, _ = await admin.call("GET", "/snapshot")
    assert code == 200


async def test_invalid_reload_keeps_the_last_good_topology(admin: Admin) -> None:
    version = admin.cp.snapshot.version
    admin.cp.config_path = admin.config
    # Stop the watcher from racing the explicit reload: write a bad file and reload by hand.
    bad = dict(DOCUMENT, clusters=[{"name": "web", "endpoints": [{"address": "127.0.0.1", "port": 0}]}])
    admin.config.write_text(yaml.safe_dump(bad))
    code, body = await admin.call("POST", "/topology/reload")
    assert code == 400
    assert "clusters[0].endpoints[0].port: must be 1..65535" in body["error"]
    assert str(admin.config) in body["error"]
    assert admin.cp.snapshot.version == version
    assert [c.name for c in admin.cp.topology.clusters] == ["web", "api"]
    _, events = await admin.call("GET", "/events?kind=topology_rejected")
    assert events["events"] and "kept the last good topology" in events["events"][-1]["message"]


async def test_watched_file_edit_becomes_a_new_version(admin: Admin) -> None:
    version = admin.cp.snapshot.version
    edited = dict(DOCUMENT, clusters=[*DOCUMENT["clusters"], {"name": "extra", "endpoints": []}])
    admin.config.write_text(yaml.safe_dump(edited))

    async def reloaded() -> bool:
        return admin.cp.topology.cluster("extra") is not None

    await poll_until(reloaded, timeout=5, what="the watcher to load the edit")
    assert admin.cp.snapshot.version != version
    cds = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
    assert set(admin.cp.snapshot.resources[cds]) == {"web", "api", "extra"}


async def test_nodes_and_health_endpoints(admin: Admin) -> None:
    assert await admin.call("GET", "/healthz") == (200, {"status": "ok"})
    code, body = await admin.call("GET", "/readyz")
    assert code == 200 and body["version"] == admin.cp.snapshot.version
    code, body = await admin.call("GET", "/nodes")
    assert code == 200 and body["nodes"] == []
    code, body = await admin.call("GET", "/nodes/ghost")
    assert code == 404 and body["field"] == "node_id"
    code, body = await admin.call("GET", "/events?limit=x")
    assert code == 400 and body["field"] == "limit"


async def test_metrics_expose_versions_and_endpoints_by_status(admin: Admin) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    admin.cp.submit_verdicts([Verdict("web", "127.0.0.1:8082", HealthStatus.UNHEALTHY, "http 506")])
    url = f"http://127.0.0.1:{admin.cp.admin_port}/metrics"
    async with admin.session.get(url) as r:
        assert r.status == 200 and r.content_type == "text/plain"
        text = await r.text()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert samples[("healthplane_snapshot_versions_total", (("cause", "verdict"),))] == 1
    assert samples[("healthplane_snapshot_versions_total", (("cause", "start"),))] == 1
    assert samples[("healthplane_endpoints", (("cluster", "web"), ("status", "UNHEALTHY")))] == 1
    assert samples[("healthplane_endpoints", (("cluster", "web"), ("status", "UNKNOWN")))] == 1
    assert samples[("healthplane_xds_streams", ())] == 0


async def test_a_file_edit_of_start_only_settings_is_kept_for_the_restart(admin: Admin, tmp_path: Path) -> None:
    admin.cp.config_path = admin.config
    running = admin.cp.topology.controlplane
    edited = dict(DOCUMENT, clusters=[*DOCUMENT["clusters"], {"name": "extra", "endpoints": []}])
    edited["controlplane"] = dict(DOCUMENT["controlplane"], xds={"port": 18999}, data_dir=str(tmp_path / "data"))
    admin.config.write_text(yaml.safe_dump(edited))
    code, _ = await admin.call("POST", "/topology/reload")
    assert code == 200
    # The rest of the edit is served; the ports and the data directory stay as they run.
    assert admin.cp.topology.cluster("extra") is not None
    assert (admin.cp.topology.controlplane.xds, admin.cp.topology.controlplane.data_dir) == (running.xds, None)
    _, events = await admin.call("GET", "/events?kind=topology_restart_only")
    [event] = events["events"]
    assert event["fields"] == ["controlplane.xds", "controlplane.data_dir"]
    assert "kept as running until the next restart" in event["message"]


async def test_put_topology_refuses_start_only_settings(admin: Admin, tmp_path: Path) -> None:
    version = admin.cp.snapshot.version
    for controlplane, field in (
        ({"xds": {"port": 18999}}, "controlplane.xds"),
        ({"data_dir": str(tmp_path / "data")}, "controlplane.data_dir"),
    ):
        document = dict(DOCUMENT, controlplane=dict(DOCUMENT["controlplane"], **controlplane))
        code, body = await admin.call("PUT", "/topology", json=document)
        assert (code, body["field"]) == (400, field)
        assert body["error"] == f"{field} cannot change while running (restart the control plane to apply it)"
    assert admin.cp.snapshot.version == version

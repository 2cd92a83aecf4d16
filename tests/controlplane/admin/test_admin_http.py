"""The admin API's shape: the one route table against the OpenAPI document, and the one rule for
whole-number parameters (limits, refresh periods, event ids), pure and over a real socket."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import yaml
from aiohttp import web

from controlplane.admin.app import ROUTES
from controlplane.admin.http import whole_number
from controlplane.admin.openapi import document
from controlplane.app import ControlPlane
from controlplane.topology.parse import load_topology
from tests.controlplane.admin.test_admin import DOCUMENT, Admin


def test_the_route_table_and_the_openapi_document_agree() -> None:
    routes = [(method.lower(), path) for method, path, _ in ROUTES]
    assert len(routes) == len(set(routes)), "a route is listed twice"
    documented = {(m, p) for p, ops in document()["paths"].items() for m in ops}
    assert set(routes) == documented, (set(routes) - documented, documented - set(routes))
    for method, path in routes:
        declared = {p["name"] for p in document()["paths"][path][method]["parameters"] if p["in"] == "path"}
        assert declared == set(re.findall(r"{(\w+)}", path)), (method, path)


@pytest.mark.parametrize(("text", "low", "high", "value"), [("0", 0, 10, 0), ("10", 0, 10, 10), ("007", 1, None, 7)])
def test_a_whole_number_in_range_is_read(text: str, low: int, high: int | None, value: int) -> None:
    assert whole_number(text, "limit", low=low, high=high) == value


@pytest.mark.parametrize(
    ("text", "low", "high", "message"),
    [
        ("x", 1, 10, "limit must be a whole number in 1..10, not 'x'"),
        ("0", 1, 10, "limit must be a whole number in 1..10, not '0'"),
        ("11", 1, 10, "limit must be a whole number in 1..10, not '11'"),
        ("-1", 0, None, "limit must be a whole number >= 0, not '-1'"),
        ("+5", 0, None, "limit must be a whole number >= 0, not '+5'"),
        ("1_000", 0, None, "limit must be a whole number >= 0, not '1_000'"),
        (" 5", 0, None, "limit must be a whole number >= 0, not ' 5'"),
        ("\u0661", 0, None, "limit must be a whole number >= 0, not '\u0661'"),  # an Arabic-Indic digit
    ],
)
def test_anything_else_is_a_400_naming_the_parameter_and_its_range(
    text: str, low: int, high: int | None, message: str
) -> None:
    with pytest.raises(web.HTTPBadRequest) as info:
        whole_number(text, "limit", low=low, high=high)
    assert info.value.content_type == "application/json"
    assert info.value.text == f'{{"error":"{message}","field":"limit"}}'.replace("\u0661", "\\u0661")


@pytest.fixture
async def admin(tmp_path: Path) -> AsyncIterator[Admin]:
    config = tmp_path / "topology.yaml"
    config.write_text(yaml.safe_dump(DOCUMENT))
    async with ControlPlane(load_topology(config), config_path=config) as cp, aiohttp.ClientSession() as session:
        yield Admin(cp, session, config)


@pytest.mark.parametrize(
    ("path", "field", "message"),
    [
        ("/events?limit=0", "limit", "limit must be a whole number in 1..10000, not '0'"),
        ("/events?limit=20000", "limit", "limit must be a whole number in 1..10000, not '20000'"),
        ("/snapshots?limit=-1", "limit", "limit must be a whole number in 1..10000, not '-1'"),
        ("/versions?limit=0", "limit", "limit must be a whole number in 1..10000, not '0'"),
        ("/propagation?limit=x", "limit", "limit must be a whole number in 1..10000, not 'x'"),
        ("/propagation?refresh=3601", "refresh", "refresh must be a whole number in 0..3600, not '3601'"),
        ("/status?refresh=-1", "refresh", "refresh must be a whole number in 0..3600, not '-1'"),
        ("/events/stream?since=soon", "since", "since must be a whole number >= 0, not 'soon'"),
    ],
)
async def test_whole_number_parameters_share_one_rule(admin: Admin, path: str, field: str, message: str) -> None:
    assert await admin.call("GET", path) == (400, {"error": message, "field": field})


async def test_a_bad_last_event_id_is_named(admin: Admin) -> None:
    code, body = await admin.call("GET", "/events/stream", headers={"Last-Event-ID": "1.5"})
    assert (code, body) == (400, {"error": "Last-Event-ID must be a whole number >= 0, not '1.5'", "field": "since"})


async def test_a_limit_in_range_is_served(admin: Admin) -> None:
    for status in ("DRAINING", "auto"):
        await admin.call("POST", "/endpoints/web/127.0.0.1:8081/override", json={"status": status})
    code, body = await admin.call("GET", "/events?limit=1")
    assert code == 200 and [e["kind"] for e in body["events"]] == ["override"]
    code, body = await admin.call("GET", "/snapshots?limit=10000")
    assert code == 200 and len(body["snapshots"]) == 3


@pytest.mark.parametrize("endpoint", [":8081", "127.0.0.1:65536", "127.0.0.1:99999"])
async def test_an_override_of_no_host_or_no_port_is_a_400(admin: Admin, endpoint: str) -> None:
    code, body = await admin.call("POST", f"/endpoints/web/{endpoint}/override", json={"status": "DRAINING"})
    assert (code, body) == (400, {"error": "endpoint must be ADDRESS:PORT", "field": "endpoint"})

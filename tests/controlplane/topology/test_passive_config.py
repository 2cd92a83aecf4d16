"""The `passive` section of a cluster (issue 15): APISIX's names, defaults, and errors with field paths."""

from __future__ import annotations

from typing import Any

import pytest

from controlplane.errors import ConfigError
from controlplane.topology.model import PassiveCheck
from controlplane.topology.parse import parse_topology


def document(passive: Any) -> dict[str, Any]:
    return {"clusters": [{"name": "web", "endpoints": [{"address": "10.0.0.1", "port": 80}], "passive": passive}]}


def passive_of(passive: Any) -> PassiveCheck | None:
    return parse_topology(document(passive), source="t.yaml").clusters[0].passive


def error_at(passive: Any) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_topology(document(passive), source="t.yaml")
    return info.value


def test_the_issue_example() -> None:
    p = passive_of(
        {
            "unhealthy": {"http_statuses": [500, 502, 503, 504], "http_failures": 3, "tcp_failures": 2, "timeouts": 3},
            "healthy": {"http_statuses": [200, 201, 202, 203, 204, 206, 301, 302, 304], "successes": 5},
            "eject_for": "30s",
        }
    )
    assert p is not None
    assert p.unhealthy_statuses == ((500, 500), (502, 502), (503, 503), (504, 504))
    assert (p.http_failures, p.tcp_failures, p.timeouts, p.successes) == (3, 2, 3, 5)
    assert (206, 206) in p.healthy_statuses and (p.eject_for, p.max_eject_for) == (30.0, 300.0)


def test_absent_is_off_and_empty_takes_apisix_defaults() -> None:
    assert parse_topology({"clusters": [{"name": "web"}]}).clusters[0].passive is None
    assert passive_of({}) == PassiveCheck()
    assert passive_of({"eject_for": "10m"}) == PassiveCheck(eject_for=600.0, max_eject_for=600.0)
    assert passive_of({"unhealthy": {"http_statuses": [[500, 599]]}}).unhealthy_statuses == ((500, 599),)  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("passive", "path", "message"),
    [
        ({"unhealty": {}}, "clusters[0].passive.unhealty", "unknown field"),
        ({"unhealthy": {"http_failure": 3}}, "clusters[0].passive.unhealthy.http_failure", "unknown field"),
        ({"unhealthy": {"http_failures": -1}}, "clusters[0].passive.unhealthy.http_failures", "must be 0..1000"),
        ({"unhealthy": {"timeouts": "3"}}, "clusters[0].passive.unhealthy.timeouts", "must be an integer"),
        ({"unhealthy": {"http_statuses": [700]}}, "clusters[0].passive.unhealthy.http_statuses[0]", "must be 100..599"),
        ({"unhealthy": {"http_statuses": []}}, "clusters[0].passive.unhealthy.http_statuses", "must list at least one"),
        ({"healthy": {"successes": 0}}, "clusters[0].passive.healthy.successes", "must be 1..1000"),
        (
            {"unhealthy": {"http_failures": 0, "tcp_failures": 0, "timeouts": 0}},
            "clusters[0].passive.unhealthy",
            "turns every failure kind off",
        ),
        (
            {"unhealthy": {"http_statuses": [500, 404]}, "healthy": {"http_statuses": [[200, 499]]}},
            "clusters[0].passive.unhealthy.http_statuses",
            "status 404 is both healthy and unhealthy",
        ),
        ({"healthy": {"http_statuses": [503]}}, "clusters[0].passive.healthy.http_statuses", "status 503 is both"),
        ({"eject_for": "0s"}, "clusters[0].passive.eject_for", "must be greater than 0"),
        ({"eject_for": "1m", "max_eject_for": "30s"}, "clusters[0].passive.max_eject_for", "must not be shorter"),
        ("yes", "clusters[0].passive", "must be a mapping"),
    ],
)
def test_errors_name_the_field(passive: Any, path: str, message: str) -> None:
    error = error_at(passive)
    assert (error.source, error.path) == ("t.yaml", path), str(error)
    assert error.message.startswith(message), str(error)

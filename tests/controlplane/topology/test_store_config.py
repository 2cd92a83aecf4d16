"""`controlplane.store`: what parses, and that every error names the field path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from controlplane.errors import ConfigError
from controlplane.topology.model import ControlPlaneConfig, keep_running_settings, restart_only_changes
from controlplane.topology.parse import parse_topology
from controlplane.topology.store import EtcdTls


def parse(store: Any, source: str = "topology.yaml") -> ControlPlaneConfig:
    return parse_topology({"controlplane": {"store": store}}, source=source).controlplane


def error(store: Any, source: str = "topology.yaml") -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse(store, source)
    return info.value


def test_no_store_is_the_default() -> None:
    assert parse_topology({}).controlplane.store is None


def test_a_full_etcd_section(tmp_path: Path) -> None:
    for name in ("ca.pem", "cert.pem", "key.pem", "secret"):
        (tmp_path / name).write_text("x\n")
    source = str(tmp_path / "topology.yaml")
    (tmp_path / "topology.yaml").write_text("")
    cfg = parse(
        {
            "replica_id": "cp-1",
            "etcd": {
                "endpoints": ["http://10.0.0.1:2379", "[::1]:2379", "etcd.internal:2379"],
                "prefix": "/fleet/a/",
                "timeout": "3s",
                "tls": {"ca": "ca.pem", "cert": "cert.pem", "key": "key.pem"},
                "username": "healthplane",
                "password_file": "secret",
            },
        },
        source,
    )
    assert cfg.store is not None
    etcd = cfg.store.etcd
    assert cfg.store.replica_id == "cp-1"
    assert etcd.endpoints == (("10.0.0.1", 2379), ("::1", 2379), ("etcd.internal", 2379))
    assert etcd.prefix == "/fleet/a" and etcd.timeout == 3.0
    assert etcd.tls == EtcdTls(tmp_path / "ca.pem", tmp_path / "cert.pem", tmp_path / "key.pem")
    assert etcd.username == "healthplane" and etcd.read_password() == "x"


def test_defaults() -> None:
    cfg = parse({"etcd": {"endpoints": ["127.0.0.1:2379"]}})
    assert cfg.store is not None
    assert cfg.store.etcd.prefix == "/healthplane" and cfg.store.etcd.timeout == 5.0 and cfg.store.etcd.tls is None
    secret = parse({"etcd": {"endpoints": ["a:1"], "username": "u", "password": "hunter22"}}).store
    assert secret is not None and secret.etcd.read_password() == "hunter22"
    assert "hunter22" not in repr(secret)


@pytest.mark.parametrize(
    ("store", "path", "words"),
    [
        ({}, "controlplane.store.etcd", "is required"),
        ({"etcd": {}}, "controlplane.store.etcd.endpoints", "must be a list"),
        ({"etcd": {"endpoints": []}}, "controlplane.store.etcd.endpoints", "at least one"),
        ({"etcd": {"endpoints": ["localhost"]}}, "controlplane.store.etcd.endpoints[0]", "HOST:PORT"),
        ({"etcd": {"endpoints": ["a:1"], "prefix": "no-slash"}}, "controlplane.store.etcd.prefix", "does not match"),
        ({"etcd": {"endpoints": ["a:1"], "prefix": "/"}}, "controlplane.store.etcd.prefix", "prefix of its own"),
        ({"etcd": {"endpoints": ["a:1"], "username": "u"}}, "controlplane.store.etcd.username", "password"),
        ({"etcd": {"endpoints": ["a:1"], "password": "p"}}, "controlplane.store.etcd.password", "needs username"),
        ({"etcd": {"endpoints": ["a:1"], "password_file": "nope"}}, "controlplane.store.etcd.password_file", "no such"),
        ({"etcd": {"endpoints": ["a:1"], "tls": {"cert": "nope"}}}, "controlplane.store.etcd.tls.cert", "no such"),
        ({"etcd": {"endpoints": ["a:1"], "timeout": 0}}, "controlplane.store.etcd.timeout", "greater than 0"),
        ({"etcd": {"endpoints": ["a:1"], "endpoint": "x"}}, "controlplane.store.etcd.endpoint", "unknown field"),
        ({"etcd": {"endpoints": ["a:1"]}, "replica_id": "a b"}, "controlplane.store.replica_id", "does not match"),
        ({"consul": {}}, "controlplane.store.consul", "unknown field"),
    ],
)
def test_errors_name_the_field(store: Any, path: str, words: str) -> None:
    exc = error(store)
    assert exc.path == path, exc
    assert words in exc.message and exc.source == "topology.yaml"


def test_both_password_and_file(tmp_path: Path) -> None:
    (tmp_path / "secret").write_text("s")
    (tmp_path / "t.yaml").write_text("")
    store = {"etcd": {"endpoints": ["a:1"], "username": "u", "password": "p", "password_file": "secret"}}
    exc = error(store, str(tmp_path / "t.yaml"))
    assert exc.path == "controlplane.store.etcd.password" and "not both" in exc.message


def test_the_store_is_read_at_start_only() -> None:
    running = parse({"etcd": {"endpoints": ["a:1"]}})
    edited = parse({"etcd": {"endpoints": ["b:1"]}})
    assert restart_only_changes(running, edited) == ["controlplane.store"]
    assert keep_running_settings(running, edited).store == running.store

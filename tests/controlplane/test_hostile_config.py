"""Hostile or careless topology files (issue 19): huge integers, deep nesting, aliases, duplicate
keys, big documents. Each is a ConfigError naming the field; the file watcher outlives all of it;
`healthplane validate` prints the error, never a traceback."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import yaml

from controlplane.app import ControlPlane
from controlplane.errors import ConfigError, ConfigErrors
from controlplane.topology import yamldoc
from controlplane.topology.parse import load_topology, parse_topology, parse_topology_text
from controlplane.topology.watch import watch_file
from lab.envoyproc import poll_until

GOOD = """\
controlplane: {xds: {port: 0}, admin: {port: 0}, watch_interval: 0.05}
clusters:
  - name: web
    endpoints:
      - {address: 127.0.0.1, port: 8081}
"""

BIG_INT = GOOD.replace("port: 8081", "port: " + "1" * 5000)
DEEP = GOOD.replace("port: 8081", "port: 8081, extra: " + "[" * 5000 + "]" * 5000)
DEEP_BLOCK = GOOD + "listeners:\n" + "".join("  " * i + "- \n" for i in range(1, 200))
ALIAS_BOMB = (
    "a: &a [x, x, x, x, x, x, x, x, x, x]\n"
    + "".join(f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 10)}]\n" for i in range(8))
    + "clusters: *i\n"
)


def test_an_integer_beyond_pythons_digit_limit_names_the_field() -> None:
    with pytest.raises(ConfigError) as info:
        parse_topology_text(BIG_INT, source="t.yaml")
    assert info.value.path == "clusters[0].endpoints[0].port"
    assert "5000 digits" in info.value.message


@pytest.mark.parametrize("text", [DEEP, DEEP_BLOCK])
def test_deep_nesting_is_a_config_error_not_a_recursion_error(text: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_topology_text(text, source="t.yaml")
    assert "nest" in info.value.message


def test_deep_or_huge_values_from_json_name_the_field() -> None:
    doc: dict[str, Any] = yaml.safe_load(GOOD)
    doc["clusters"][0]["endpoints"][0]["port"] = int("9" * 4000)
    with pytest.raises(ConfigError) as info:
        parse_topology(doc, source="api")
    assert info.value.path == "clusters[0].endpoints[0].port"
    nested: Any = []
    for _ in range(5000):
        nested = [nested]
    doc = yaml.safe_load(GOOD)
    doc["clusters"][0]["extra"] = nested
    with pytest.raises(ConfigError, match="nested deeper") as info:
        parse_topology(doc, source="api")
    assert info.value.path.startswith("clusters[0].extra[0]")


@pytest.mark.parametrize("text", [BIG_INT, DEEP])
def test_validate_prints_the_error_without_a_traceback(tmp_path: Path, text: str) -> None:
    path = tmp_path / "t.yaml"
    path.write_text(text)
    result = subprocess.run(
        [sys.executable, "-m", "controlplane", "validate", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and f"healthplane: error: {path}" in result.stderr


async def test_watch_survives_a_callback_that_raises(tmp_path: Path) -> None:
    path = tmp_path / "t.yaml"
    path.write_text("a: 1\n")
    calls: list[str] = []

    def on_change() -> None:
        calls.append(path.read_text())
        raise RuntimeError("boom")

    task = asyncio.create_task(watch_file(path, 0.02, on_change))
    try:
        await asyncio.sleep(0.1)
        path.write_text("a: 2\n")

        async def seen(n: int) -> bool | None:
            return True if len(calls) >= n else None

        await poll_until(lambda: seen(1), timeout=10, what="first change")
        path.write_text("a: 3\n")
        await poll_until(lambda: seen(2), timeout=10, what="second change after the callback raised")
        assert not task.done()
    finally:
        task.cancel()


@pytest.mark.parametrize("bad", [BIG_INT, DEEP, ALIAS_BOMB])
async def test_the_file_watcher_rejects_hostile_edits_and_applies_the_next_good_one(tmp_path: Path, bad: str) -> None:
    path = tmp_path / "topology.yaml"
    path.write_text(GOOD)
    cp = ControlPlane(load_topology(path), config_path=path)
    await cp.start()
    try:
        await asyncio.sleep(0.2)  # the watcher has taken its first look
        path.write_text(bad)

        async def rejected() -> bool | None:
            return True if cp.events.recent(kind="topology_rejected") else None

        await poll_until(rejected, timeout=15, what="the hostile edit rejected")
        assert cp.topology.cluster("web") is not None
        path.write_text(GOOD.replace("port: 8081", "port: 8089"))

        async def applied() -> bool | None:
            web = cp.topology.cluster("web")
            return True if web is not None and web.endpoint("127.0.0.1:8089") is not None else None

        await poll_until(applied, timeout=15, what="the next good edit applied")
    finally:
        await cp.aclose(grace=0)


def test_an_alias_bomb_and_merge_keys_are_refused_naming_where() -> None:
    with pytest.raises(ConfigError, match="YAML nodes with its aliases written out"):
        parse_topology_text(ALIAS_BOMB, source="t.yaml")
    # Sized once per distinct node, never expanded: the billion-node size comes from a few dozen nodes.
    shape = yamldoc.expanded_shape(yaml.compose(ALIAS_BOMB, Loader=yamldoc.Loader))
    assert shape is not None and shape[0] > 10**9 and shape[2]
    with pytest.raises(ConfigError, match="refers to a node that contains it"):
        parse_topology_text("a: &a [*a]\nclusters: []\n", source="t.yaml")
    merge = "base: &b {port: 1}\nclusters: [{name: w, endpoints: [{<<: *b, address: 127.0.0.1}]}]\n"
    with pytest.raises(ConfigError, match="merge keys") as info:
        parse_topology_text(merge, source="t.yaml")
    assert info.value.path == "clusters[0].endpoints[0].<<"


def test_aliases_that_yaml_safe_dump_writes_for_shared_values_load() -> None:
    check = {"interval": "1s", "timeout": "500ms", "http": {"path": "/livez"}}
    endpoints = [{"address": "127.0.0.1", "port": 8080}]
    document = {"clusters": [{"name": f"c{i}", "health_check": check, "endpoints": endpoints} for i in range(3)]}
    text = yaml.safe_dump(document)
    assert "&id001" in text and "*id001" in text
    topology = parse_topology_text(text, source="t.yaml")
    assert [c.name for c in topology.clusters] == ["c0", "c1", "c2"]


def test_a_document_over_the_size_bound_is_refused_before_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(yamldoc, "MAX_DOCUMENT_BYTES", 1000)
    with pytest.raises(ConfigError, match="more than the 1000 accepted"):
        parse_topology_text(GOOD + "#" * 1000, source="t.yaml")


def test_the_c_loader_is_used_where_pyyaml_has_it() -> None:
    assert yamldoc.Loader is getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    assert getattr(yaml, "__with_libyaml__", False), "this environment's PyYAML should ship libyaml"


def test_every_error_of_a_document_is_reported_at_once() -> None:
    text = "clusters:\n  - {name: a, name: b, endpoints: []}\n  - {name: c, port: 1, port: 2, endpoints: []}\n"
    with pytest.raises(ConfigErrors) as info:
        parse_topology_text(text, source="t.yaml")
    assert [e.path for e in info.value.errors] == ["clusters[0].name", "clusters[1].port"]
    assert "duplicate key 'name'" in str(info.value) and "clusters[1].port: duplicate key 'port'" in str(info.value)


async def test_the_watcher_reads_and_validates_the_file_off_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import controlplane.process

    threads: list[str] = []

    def load(path: Path) -> Any:
        threads.append(threading.current_thread().name)
        return load_topology(path)

    monkeypatch.setattr(controlplane.process, "load_topology", load)
    path = tmp_path / "topology.yaml"
    path.write_text(GOOD)
    cp = ControlPlane(load_topology(path), config_path=path)
    await cp.start()
    try:
        await asyncio.sleep(0.2)
        path.write_text(GOOD.replace("port: 8081", "port: 8089"))

        async def applied() -> bool | None:
            web = cp.topology.cluster("web")
            return True if web is not None and web.endpoint("127.0.0.1:8089") is not None else None

        await poll_until(applied, timeout=15, what="the edit applied")
        assert threads and threading.main_thread().name not in threads
    finally:
        await cp.aclose(grace=0)


def _http_doc(**http: Any) -> dict[str, Any]:
    return {
        "clusters": [{"name": "w", "health_check": {"http": http}, "endpoints": [{"address": "127.0.0.1", "port": 1}]}]
    }


@pytest.mark.parametrize(
    ("http", "field"),
    [
        ({"path": "/x HTTP/1.1\r\nX-Evil: 1\r\n\r\nGET /"}, "path"),
        ({"path": "/a\nb"}, "path"),
        ({"path": "/a b"}, "path"),
        ({"path": "/caf\u00e9"}, "path"),
        ({"host": "a\r\nX-Evil: 1"}, "host"),
        ({"host": "a b"}, "host"),
        ({"host": "h\u00f6st"}, "host"),
        ({"sni": "a\nb"}, "sni"),
        ({"headers": {"X-A": "1\x01"}}, "headers.X-A"),
        ({"headers": {"X-A": "\u00fc"}}, "headers.X-A"),
        ({"headers": {"X-A": "1\x7f"}}, "headers.X-A"),
    ],
)
def test_http_check_parts_that_could_split_a_request_are_refused_naming_the_field(
    http: dict[str, Any], field: str
) -> None:
    with pytest.raises(ConfigError) as info:
        parse_topology(_http_doc(**http), source="t.yaml")
    assert info.value.path == f"clusters[0].health_check.http.{field}"


def test_the_prober_refuses_to_build_a_split_request_even_if_asked() -> None:
    from prober.http1 import build_request

    with pytest.raises(ValueError, match="control character"):
        build_request("GET", "/x HTTP/1.1\r\nX: 1\r\n\r\nGET /", "h", (), None, close=False)
    with pytest.raises(ValueError, match="control character"):
        build_request("GET", "/", "h\r\nX: 1", (), None, close=False)
    assert build_request("GET", "/ok?a=%20", "h:1", (("X", "a b"),), None, close=True).count(b"\r\n\r\n") == 1


@pytest.mark.parametrize(
    ("text", "path", "first_line"),
    [
        ("clusters: [{name: w, endpoints: [{address: 127.0.0.1, port: 8080, port: 9090}]}]\n",
         "clusters[0].endpoints[0].port", 1),
        ("clusters:\n  - name: w\n    health_check:\n      interval: 1s\n      interval: 30s\n    endpoints: []\n",
         "clusters[0].health_check.interval", 4),
        ("controlplane: {}\ncontrolplane: {}\n", "controlplane", 1),
    ],
)  # fmt: skip
def test_duplicate_keys_are_refused_with_the_field_path_and_both_lines(text: str, path: str, first_line: int) -> None:
    with pytest.raises(ConfigError) as info:
        parse_topology_text(text, source="t.yaml")
    assert info.value.path == path
    assert "duplicate key" in info.value.message and f"first on line {first_line}" in info.value.message


def test_every_bad_cluster_listener_and_section_is_reported_not_only_the_first() -> None:
    doc: dict[str, Any] = {
        "controlplane": {"watch_interval": -1},
        "clusters": [
            {"name": "a", "endpoints": [{"address": "127.0.0.1", "port": 70000}]},
            {"name": "b", "endpoints": [{"address": "127.0.0.1", "port": 1}]},
            {"name": "c", "endpoints": [{"address": "not an ip", "port": 1}]},
        ],
        "listeners": [{"name": "l", "port": 10000, "routes": [{"cluster": "a"}, {"cluster": "nope"}]}],
    }
    with pytest.raises(ConfigErrors) as info:
        parse_topology(doc, source="t.yaml")
    assert [e.path for e in info.value.errors] == [
        "clusters[0].endpoints[0].port",
        "clusters[2].endpoints[0].address",
        "listeners[0].routes[1].cluster",  # not routes[0]: cluster a exists, it is only invalid
        "controlplane.watch_interval",
    ]
    assert info.value.path == "clusters[0].endpoints[0].port"
    assert str(info.value).count("t.yaml") == 1 and "and 3 more" in str(info.value)


# --------------------------------------------------------------------------- the admin port's connections


async def _read_all(reader: asyncio.StreamReader) -> bytes:
    data = b""
    try:
        async with asyncio.timeout(10):
            while chunk := await reader.read(65536):
                data += chunk
    except ConnectionError:
        pass
    return data


async def test_the_admin_port_drops_half_sent_requests_and_caps_its_connections(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import controlplane.admin.auth
    from controlplane.admin.app import LIMITS_KEY

    monkeypatch.setattr(controlplane.admin.auth, "BODY_TIMEOUT", 0.3)
    doc: dict[str, Any] = yaml.safe_load(GOOD)
    doc["controlplane"]["admin"]["token"] = "change-token-1"
    cp = ControlPlane(parse_topology(doc))
    await cp.start()
    try:
        assert cp._process is not None and cp._process._admin is not None
        limits = cp._process._admin.app[LIMITS_KEY]  # type: ignore[attr-defined]
        limits.header_timeout = 0.3
        port = cp.admin_port

        # Headers that never end: closed after the deadline, nothing answered.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        assert await _read_all(reader) == b""
        writer.close()
        assert limits.timed_out == 1

        # A body that never ends: 408 naming the body.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"PUT /topology HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer change-token-1\r\n"
            b'Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"clus'
        )
        async with asyncio.timeout(10):  # aiohttp lingers for the rest of the body: read the answer only
            answer = await reader.readuntil(b'"field": "body"}')
        writer.close()
        assert answer.startswith(b"HTTP/1.1 408") and b"Connection: close" in answer

        # The cap: the connections past it get 503 and are closed; a slot frees when one closes.
        limits.header_timeout = 60

        async def idle() -> bool:
            return limits.open == 0

        await poll_until(idle, timeout=30, what="the earlier connections closed")
        limits.max_connections = 3
        held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
        await asyncio.sleep(0.1)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert (await _read_all(reader)).startswith(b"HTTP/1.1 503")
        writer.close()
        assert limits.refused == 1
        held.pop()[1].close()
        await asyncio.sleep(0.2)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert (await _read_all(reader)).startswith(b"HTTP/1.1 200")
        writer.close()
        for _, w in held:
            w.close()
    finally:
        await cp.aclose(grace=0)


def test_the_admin_connection_cap_leaves_xds_most_file_descriptors() -> None:
    import resource

    from controlplane.admin.conns import default_max_connections

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    cap = default_max_connections()
    assert 8 <= cap <= 1024 and (soft == resource.RLIM_INFINITY or cap <= max(8, soft // 4))

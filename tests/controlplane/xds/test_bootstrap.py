"""Generated bootstraps: the lab's files match the command, and Envoy accepts them."""

from __future__ import annotations

import contextlib
import io
import json
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from controlplane.cli.main import main
from controlplane.xds.bootstrap import make_bootstrap
from lab.envoyproc import find_envoy

CONFIGS = sorted((Path(__file__).parents[3] / "envoy-configs").glob("*.yaml"))


def run_cli(argv: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(argv)
    return code, out.getvalue()


def test_lab_has_bootstraps() -> None:
    assert {p.name for p in CONFIGS} >= {"front-envoy.yaml", "webserver01-sidecar.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_envoy_config_matches_the_command_that_made_it(path: Path) -> None:
    header, _, body = path.read_text().partition("\n")
    assert header.startswith("# healthplane bootstrap "), "first line must be the generating command"
    code, output = run_cli(shlex.split(header[2:])[1:])
    assert code == 0
    assert output == body, f"{path.name} is stale: run `make envoy-configs`"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_envoy_validates_config(path: Path) -> None:
    result = subprocess.run(
        [find_envoy(), "--mode", "validate", "-c", str(path), "-l", "error"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout


def test_bootstrap_sets_node_once_and_ads_for_everything() -> None:
    code, output = run_cli(["bootstrap", "--node-id", "n1", "--service", "front", "--xds", "127.0.0.1:18000"])
    assert code == 0
    doc = yaml.safe_load(output)
    assert doc == make_bootstrap(node_id="n1", service="front", xds_host="127.0.0.1", xds_port=18000)
    ads = doc["dynamic_resources"]["ads_config"]
    assert ads["set_node_on_first_message_only"] is True
    assert doc["dynamic_resources"]["cds_config"] == {"ads": {}, "resource_api_version": "V3"}
    assert doc["dynamic_resources"]["lds_config"] == {"ads": {}, "resource_api_version": "V3"}
    [xds] = doc["static_resources"]["clusters"]
    assert xds["type"] == "STATIC"
    assert (
        make_bootstrap(node_id="n", service="s", xds_host="controlplane", xds_port=1)["static_resources"]["clusters"][
            0
        ]["type"]
        == "STRICT_DNS"
    )


@pytest.mark.parametrize("xds", ["nohost", "host:notaport", "host:70000"])
def test_bootstrap_rejects_bad_xds_address(xds: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bootstrap", "--node-id", "n", "--service", "s", "--xds", xds]) == 2
    assert "--xds: must be HOST:PORT" in capsys.readouterr().err


def test_bootstrap_delta_asks_for_incremental_xds_and_envoy_accepts_it(tmp_path: Path) -> None:
    argv = ["bootstrap", "--node-id", "n1", "--service", "front", "--xds", "127.0.0.1:18000", "--delta"]
    code, output = run_cli(argv)
    assert code == 0
    doc = yaml.safe_load(output)
    assert doc == make_bootstrap(node_id="n1", service="front", xds_host="127.0.0.1", xds_port=18000, delta=True)
    assert doc["dynamic_resources"]["ads_config"]["api_type"] == "DELTA_GRPC"
    sotw = make_bootstrap(node_id="n1", service="front", xds_host="127.0.0.1", xds_port=18000)
    assert sotw["dynamic_resources"]["ads_config"]["api_type"] == "GRPC"
    path = tmp_path / "delta.yaml"
    path.write_text(output)
    result = subprocess.run(
        [find_envoy(), "--mode", "validate", "-c", str(path), "-l", "error"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_bootstrap_over_replicas_puts_every_replica_in_the_xds_cluster(tmp_path: Path) -> None:
    argv = ["bootstrap", "--node-id", "n1", "--service", "front"]
    code, output = run_cli([*argv, "--xds", "127.0.0.1:18000", "--xds", "127.0.0.2:18000", "--xds", "[::1]:18001"])
    assert code == 0
    doc = yaml.safe_load(output)
    [xds] = doc["static_resources"]["clusters"]
    assert xds["type"] == "STATIC"
    [locality] = xds["load_assignment"]["endpoints"]
    assert [e["endpoint"]["address"]["socket_address"] for e in locality["lb_endpoints"]] == [
        {"address": "127.0.0.1", "port_value": 18000},
        {"address": "127.0.0.2", "port_value": 18000},
        {"address": "::1", "port_value": 18001},
    ]
    [service] = doc["dynamic_resources"]["ads_config"]["grpc_services"]
    assert service["envoy_grpc"]["retry_policy"] == {"retry_back_off": {"base_interval": "0.25s", "max_interval": "5s"}}
    # One replica keeps Envoy's own backoff, as before.
    _, single = run_cli([*argv, "--xds", "127.0.0.1:18000"])
    [one] = yaml.safe_load(single)["dynamic_resources"]["ads_config"]["grpc_services"]
    assert "retry_policy" not in one["envoy_grpc"]
    # A name among them (a headless Service) needs DNS.
    _, named = run_cli([*argv, "--xds", "127.0.0.1:18000", "--xds", "cp-1.internal:18000"])
    assert yaml.safe_load(named)["static_resources"]["clusters"][0]["type"] == "STRICT_DNS"
    # One DNS name alone (a headless Service: one address per replica) is several replicas too.
    _, dns = run_cli([*argv, "--xds", "healthplane-xds.healthplane.svc.cluster.local:18000"])
    dns_doc = yaml.safe_load(dns)
    assert dns_doc["static_resources"]["clusters"][0]["type"] == "STRICT_DNS"
    [by_name] = dns_doc["dynamic_resources"]["ads_config"]["grpc_services"]
    assert by_name["envoy_grpc"]["retry_policy"] == {"retry_back_off": {"base_interval": "0.25s", "max_interval": "5s"}}
    path = tmp_path / "replicas.yaml"
    path.write_text(output)
    result = subprocess.run(
        [find_envoy(), "--mode", "validate", "-c", str(path), "-l", "error"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("xds", "message"),
    [
        (["127.0.0.1:18000", "127.0.0.1:18000"], "--xds[1]: 127.0.0.1:18000 is given twice (also --xds[0])"),
        (["cp.internal:1", "127.0.0.1:2", "CP.internal:1"], "--xds[2]: CP.internal:1 is given twice (also --xds[0])"),
        (["127.0.0.1:18000", "127.0.0.1"], "--xds[1]: must be HOST:PORT"),
        (["127.0.0.1:18000", "host:0"], "--xds[1]: must be HOST:PORT"),
    ],
)
def test_bootstrap_names_the_bad_replica_address(
    xds: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    for grpc in ([], ["--grpc"]):
        argv = ["bootstrap", *grpc, "--node-id", "n", "--service", "s"]
        assert main([*argv, *(a for x in xds for a in ("--xds", x))]) == 2
        assert message in capsys.readouterr().err


def test_grpc_bootstrap_over_replicas() -> None:
    def uris(*argv: str) -> list[str]:
        code, output = run_cli(["bootstrap", "--grpc", "--node-id", "g1", *argv])
        assert code == 0
        servers = json.loads(output)["xds_servers"]
        assert all(s["channel_creds"] == [{"type": "insecure"}] and s["server_features"] == ["xds_v3"] for s in servers)
        return [s["server_uri"] for s in servers]

    # IPs of one family: one server whose target lists every replica (the channel moves between them).
    assert uris("--xds", "127.0.0.1:18000", "--xds", "127.0.0.2:18001") == ["ipv4:127.0.0.1:18000,127.0.0.2:18001"]
    assert uris("--xds", "[::1]:18000", "--xds", "[::2]:18000") == ["ipv6:[::1]:18000,[::2]:18000"]
    # Names, mixed families, or asked for: one server each, in order (gRPC's fallback, gRFC A71).
    assert uris("--xds", "cp-a:18000", "--xds", "127.0.0.1:18000") == ["cp-a:18000", "127.0.0.1:18000"]
    assert uris("--xds", "127.0.0.1:18000", "--xds", "[::1]:18000") == ["127.0.0.1:18000", "[::1]:18000"]
    fallback = ("--grpc-fallback", "--xds", "127.0.0.1:18000", "--xds", "127.0.0.2:18000")
    assert uris(*fallback) == ["127.0.0.1:18000", "127.0.0.2:18000"]
    assert uris("--xds", "127.0.0.1:18000") == ["127.0.0.1:18000"]


def test_grpc_fallback_is_for_grpc_only(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["bootstrap", "--grpc-fallback", "--node-id", "n", "--service", "s", "--xds", "127.0.0.1:1"]
    assert main(argv) == 2
    assert "--grpc-fallback: is for the proxyless gRPC bootstrap (--grpc) only" in capsys.readouterr().err

"""`healthplane lab`: its layout and documents, and that start/stop leaves nothing behind.

Every lab here runs on free ports (`--ports-base 0`), never on the documented fixed ones, so
tests run in parallel with each other and with a lab someone left running.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from controlplane.cli.main import build_parser, main
from controlplane.errors import ConfigError
from controlplane.topology.parse import parse_topology
from lab.envoyproc import EnvoyTimeout, find_envoy, poll_until
from lab.run import Lab, netns_unavailable_reason
from lab.topology import (
    BACKENDS,
    GRPC_BACKENDS,
    GRPC_CLIENT_NODE,
    GRPC_SERVICE,
    HealthCheckSpec,
    LabConfig,
    LabError,
    Mode,
    PortPlan,
    config_from_args,
    front_bootstrap,
    make_layout,
    sidecar_bootstrap,
    topology_document,
)

# Short checks: a lab is healthy a few hundred milliseconds after it starts.
FAST = HealthCheckSpec(interval=0.2, timeout=0.1)
NETNS_SKIP = netns_unavailable_reason()
needs_netns = pytest.mark.skipif(NETNS_SKIP is not None, reason=f"--netns unavailable: {NETNS_SKIP}")
_SERVER_NAME = re.compile(r"ServerName: (\S+?),")


def netns_config(**kwargs: Any) -> LabConfig:
    """A --netns config whose names and subnet no other test (or process) uses at the same time."""
    n = os.getpid() % 100_000
    subnet = ipaddress.IPv4Network(f"10.200.{50 + n % 200}.0/24")
    return LabConfig(netns=True, ports_base=0, health_check=FAST, netns_prefix=f"t{n}", subnet=subnet, **kwargs)


# ----------------------------------------------------------------------------- leftovers


def _start_time(pid: int) -> str | None:
    """The process's start time (field 22 of /proc/PID/stat); None once it is gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = stat.rpartition(")")[2].split()
    return None if fields[0] == "Z" else fields[19]


class Leftovers:
    """What a lab may leave behind: processes, namespaces, interfaces, Envoy shared memory."""

    def __init__(self, prefix: str | None = None) -> None:
        self.prefix = prefix
        self.shm_before = set(glob.glob("/dev/shm/envoy_shared_memory_*"))
        self.processes: dict[int, tuple[str, str | None]] = {}
        self.workdirs: list[Path] = []  # temporary directories the lab must remove

    def remember(self, children: list[tuple[str, int, bool]]) -> None:
        # (pid, start time): a pid the kernel hands to someone else later is not ours.
        for name, pid, _ in children:
            self.processes[pid] = (name, _start_time(pid))

    def running(self) -> list[str]:
        return [
            f"{name} (pid {pid})"
            for pid, (name, started) in self.processes.items()
            if started is not None and _start_time(pid) == started
        ]

    def namespaces(self) -> list[str]:
        if self.prefix is None:
            return []
        out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
        return [line.split()[0] for line in out.splitlines() if line.startswith(f"{self.prefix}-")]

    def links(self) -> list[str]:
        if self.prefix is None:
            return []
        out = subprocess.run(["ip", "-j", "link", "show"], capture_output=True, text=True, check=True).stdout
        return [link["ifname"] for link in json.loads(out) if link["ifname"].startswith(f"{self.prefix}-")]

    def shm(self) -> set[str]:
        return set(glob.glob("/dev/shm/envoy_shared_memory_*")) - self.shm_before

    def assert_none(self) -> None:
        assert not self.running(), f"processes left running: {self.running()}"
        assert not self.namespaces(), f"namespaces left: {self.namespaces()}"
        assert not self.links(), f"interfaces left: {self.links()}"
        assert not self.shm(), f"shared memory left: {self.shm()}"
        assert not [d for d in self.workdirs if d.exists()], f"directories left: {self.workdirs}"

    async def wait_none(self, timeout: float = 15.0) -> None:  # noqa: ASYNC109 - a deadline
        async def gone() -> bool:
            return not self.running()

        with contextlib.suppress(EnvoyTimeout):
            await poll_until(gone, timeout=timeout, what="the lab's processes to exit")
        self.assert_none()


async def front_answers(lab: Lab, n: int = 30) -> Counter[str]:
    seen: Counter[str] = Counter()
    async with aiohttp.ClientSession() as session:
        for _ in range(n):
            async with session.get(lab.layout.front_url + "/") as resp:
                text = await resp.text()
                match = _SERVER_NAME.search(text)
                seen[match.group(1) if resp.status == 200 and match else f"status {resp.status}"] += 1
    return seen


# ----------------------------------------------------------------------------- layout


def test_documented_ports_and_blocks() -> None:
    fixed = PortPlan()
    assert (fixed.front_listener, fixed.front_admin, fixed.controlplane_admin, fixed.xds) == (10000, 9901, 19000, 18000)
    assert fixed.sidecar_listeners == (10001, 10002, 10003)
    assert fixed.sidecar_admins == (9902, 9903, 9904)
    assert fixed.apps == (8081, 8082, 8083)
    block = PortPlan.from_base(20000)
    ports = [port for port, _ in block.host_ports(netns=False, mode=Mode.CENTRAL)]
    assert sorted(ports) == list(range(20000, 20013))
    free = PortPlan.free()
    ports = [port for port, _ in free.host_ports(netns=False, mode=Mode.CENTRAL)]
    assert len(set(ports)) == 13
    # In namespaces the backends bind nothing on the host.
    assert len(free.host_ports(netns=True, mode=Mode.CENTRAL)) == 4
    assert len(free.host_ports(netns=True, mode=Mode.PER_ENVOY)) == 2


@pytest.mark.parametrize("netns", [False, True], ids=["loopback", "netns"])
def test_topology_restricts_listeners_to_node_clusters(netns: bool) -> None:
    config = LabConfig(netns=netns, health_check=HealthCheckSpec(interval=0.25, timeout=0.1))
    layout = make_layout(config, PortPlan())
    topology = parse_topology(topology_document(layout))
    web = topology.cluster("web")
    assert web is not None and web.health_check is not None
    assert [f"{ep.address}:{ep.port}" for ep in web.endpoints] == [b.endpoint for b in layout.backends]
    assert (web.health_check.interval, web.health_check.timeout) == (0.25, 0.1)
    assert web.health_check.http is not None and web.health_check.http.path == "/livez"
    front = [ln.name for ln in topology.listeners if ln.for_node("front-proxy")]
    assert front == ["ingress"]
    for b in layout.backends:
        [mine] = [ln for ln in topology.listeners if ln.for_node(b.name)]
        assert mine.port == b.listener_port
        cluster = topology.cluster(mine.routes[0].cluster)
        assert cluster is not None and [(ep.address, ep.port) for ep in cluster.endpoints] == [
            ("127.0.0.1", b.app_port)
        ]
    if netns:
        # The compose topology, relocated: every backend its own address, compose's ports.
        assert [b.address for b in layout.backends] == ["10.200.0.11", "10.200.0.12", "10.200.0.13"]
        assert {(b.listener_port, b.app_port, b.admin_port) for b in layout.backends} == {(80, 8080, 9901)}
        assert layout.xds_address == "10.200.0.1"
        assert [b.netns for b in layout.backends] == [f"hplab-{n}" for n in BACKENDS]
    else:
        assert {b.address for b in layout.backends} == {"127.0.0.1"}


@pytest.mark.parametrize("netns", [False, True], ids=["loopback", "netns"])
def test_static_bootstraps_pass_envoy_validate(netns: bool, tmp_path: Path) -> None:
    """The classic config of `--mode per-envoy`: Envoy accepts it, and it checks like the prober."""
    config = LabConfig(mode=Mode.PER_ENVOY, netns=netns, front_proxies=2)
    layout = make_layout(config, PortPlan())
    documents = {f.node_id: front_bootstrap(layout, f) for f in layout.fronts}
    documents |= {b.node_id: sidecar_bootstrap(layout, b) for b in layout.backends}
    for name, doc in documents.items():
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(doc))
        result = subprocess.run(
            [find_envoy(), "--mode", "validate", "-c", str(path), "-l", "error"],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert result.returncode == 0, f"{name}: {result.stdout}{result.stderr}"
    [web] = documents["front-envoy"]["static_resources"]["clusters"]
    [check] = web["health_checks"]
    assert (check["interval"], check["no_traffic_interval"], check["timeout"]) == ("1s", "1s", "0.5s")
    assert (check["healthy_threshold"], check["unhealthy_threshold"]) == (2, 2)
    assert check["http_health_check"]["path"] == "/livez"
    # The sidecars only forward: the front proxies do the checking, as in the classic demo.
    for b in layout.backends:
        assert "health_checks" not in documents[b.node_id]["static_resources"]["clusters"][0]
    # Every front proxy listens on the same port: the kernel spreads connections (SO_REUSEPORT).
    ports = {f.listener_port for f in layout.fronts}
    assert ports == {10000}


def test_options_before_and_after_the_subcommand() -> None:
    parser = build_parser()
    args = parser.parse_args(["lab", "--netns", "--interval", "250ms", "scenario", "--rate", "50"])
    assert (args.lab_command, args.netns, args.interval, args.rate) == ("scenario", True, 0.25, 50.0)
    config = config_from_args(args)
    assert config.netns and config.health_check.interval == 0.25 and config.mode is Mode.CENTRAL
    args = parser.parse_args(["lab", "scenario", "--mode", "per-envoy", "--front-proxies", "3"])
    config = config_from_args(args)
    assert (config.netns, config.mode, config.front_proxies) == (False, Mode.PER_ENVOY, 3)
    args = parser.parse_args(["lab", "compare", "--fleets", "1", "4"])
    assert (args.fleets, args.repeat) == ([1, 4], 3)
    assert parser.parse_args(["lab"]).lab_command is None


def test_delta_option_makes_every_ads_bootstrap_delta() -> None:
    args = build_parser().parse_args(["lab", "--delta", "scenario"])
    config = config_from_args(args)
    assert config.delta
    layout = make_layout(config, PortPlan())
    documents = [front_bootstrap(layout, f) for f in layout.fronts] + [
        sidecar_bootstrap(layout, b) for b in layout.backends
    ]
    assert {d["dynamic_resources"]["ads_config"]["api_type"] for d in documents} == {"DELTA_GRPC"}
    assert not config_from_args(build_parser().parse_args(["lab"])).delta


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--interval", "1s", "--timeout", "2s"], "--timeout: must be more than 0 and at most --interval"),
        (["--ports-base", "80"], "--ports-base: must be 0 (any free ports) or 1024..65522"),
        (["--subnet", "8.8.8.0/24"], "--subnet: must be a private IPv4 subnet"),
        (["--netns-prefix", "Bad-Name"], "--netns-prefix: must be a lowercase letter"),
    ],
)
def test_bad_options_name_the_option(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["lab", "scenario", *argv]) == 2
    assert message in capsys.readouterr().err


async def test_a_port_in_use_is_named_with_the_option_to_change_it() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        lab = Lab(LabConfig(ports_base=port, health_check=FAST))
        with pytest.raises(ConfigError) as caught:
            await lab.start()
        assert str(caught.value).startswith(
            f"--ports-base: port {port} (front proxy listener) on 127.0.0.1 is already in use; "
            "run the lab on other ports with --ports-base N"
        )
        assert lab.children() == []
        await lab.aclose()  # again: a no-op


# ----------------------------------------------------------------------------- start and stop


@pytest.fixture
def leftovers() -> Iterator[Leftovers]:
    yield Leftovers()


@pytest.mark.envoy
async def test_loopback_lab_routes_to_every_backend_and_leaves_nothing(leftovers: Leftovers) -> None:
    lab = Lab(LabConfig(ports_base=0, health_check=FAST))
    async with lab:
        await lab.wait_healthy()
        children = lab.children()
        leftovers.remember(children)
        # control plane, front proxy, 3 demo apps, 3 sidecars: each its own process
        assert len({pid for _, pid, _ in children}) == 8
        assert all(running for _, _, running in children)
        assert set(await front_answers(lab)) == set(BACKENDS)
        nodes = await lab.controlplane_get("/nodes")
        assert {n["id"] for n in nodes["nodes"]} == {"front-envoy", *(f"{b}-sidecar" for b in BACKENDS)}
        assert "curl -X POST -d livez=FAIL" in lab.describe()
        leftovers.workdirs.append(lab.workdir)
    leftovers.assert_none()
    await lab.aclose()  # idempotent


@pytest.mark.envoy
async def test_loopback_lab_with_delta_envoys_routes_to_every_backend(leftovers: Leftovers) -> None:
    lab = Lab(LabConfig(ports_base=0, health_check=FAST, delta=True))
    async with lab:
        await lab.wait_healthy()
        leftovers.remember(lab.children())
        assert set(await front_answers(lab)) == set(BACKENDS)
        nodes = await lab.controlplane_get("/nodes")
        assert {n["protocol"] for n in nodes["nodes"]} == {"delta"} and len(nodes["nodes"]) == 4
        assert "(central prober, delta xDS;" in lab.describe()
        leftovers.workdirs.append(lab.workdir)
    leftovers.assert_none()


@pytest.mark.envoy
@needs_netns
async def test_netns_lab_gives_each_backend_its_own_address_and_cleans_up() -> None:
    config = netns_config()
    leftovers = Leftovers(config.netns_prefix)
    async with Lab(config) as lab:
        await lab.wait_healthy()
        leftovers.remember(lab.children())
        assert sorted(leftovers.namespaces()) == [f"{config.netns_prefix}-{b}" for b in BACKENDS]
        assert set(await front_answers(lab)) == set(BACKENDS)
        snapshot = await lab.controlplane_get("/snapshot")
        [web] = [c for c in snapshot["clusters"] if c["name"] == "web"]
        hosts = list(config.subnet.hosts())
        assert [e["address"] for e in web["endpoints"]] == [str(hosts[10]), str(hosts[11]), str(hosts[12])]
        # Each sidecar is in its namespace: its peers see the namespace's address.
        nodes = {n["id"]: n["peer"] for n in (await lab.controlplane_get("/nodes"))["nodes"]}
        for i, b in enumerate(BACKENDS):
            assert str(hosts[10 + i]) in nodes[f"{b}-sidecar"]
    leftovers.assert_none()


@pytest.mark.envoy
async def test_a_failed_start_says_which_process_and_cleans_up(leftovers: Leftovers) -> None:
    # Envoy refuses the log level: every sidecar exits at once, after the control plane and the
    # demo apps are up.
    lab = Lab(LabConfig(ports_base=0, health_check=FAST, envoy_log_level="loud"))
    with pytest.raises(LabError) as caught:
        await lab.start()
    leftovers.remember(lab.children())
    assert len(lab.children()) >= 5  # control plane, 3 apps, at least one sidecar
    message = str(caught.value)
    assert re.match(r"webserver0\d-sidecar \(exited with code \d+\): exited before LIVE\n--- ", message), message
    assert "loud" in message  # Envoy's own words, from the end of its log
    leftovers.workdirs.append(lab.workdir)
    leftovers.assert_none()


@pytest.fixture
def stale_namespace() -> Iterator[tuple[LabConfig, str]]:
    """A namespace with a lab's name, as a lab killed with SIGKILL leaves behind."""
    config = netns_config()
    stale = f"{config.netns_prefix}-webserver02"
    subprocess.run(["ip", "netns", "add", stale], check=True)
    try:
        yield config, stale
    finally:
        subprocess.run(["ip", "netns", "del", stale], check=True)
    Leftovers(config.netns_prefix).assert_none()


@needs_netns
async def test_a_leftover_namespace_is_named_with_the_command_that_removes_it(
    stale_namespace: tuple[LabConfig, str],
) -> None:
    config, stale = stale_namespace
    lab = Lab(config)
    with pytest.raises(LabError, match=f"network namespace {stale} already exists.*`ip netns del {stale}`"):
        await lab.start()
    assert lab.children() == []


# ----------------------------------------------------------------------------- the command


@contextlib.asynccontextmanager
async def lab_command(*argv: str) -> AsyncIterator[tuple[asyncio.subprocess.Process, list[str]]]:
    """`healthplane lab ARGV` until it printed what to try; yields the process and its lines."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "controlplane", "--log-level", "warning", "lab", *argv,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(90):
            while not lines or not lines[-1].startswith("Bootstraps and logs:"):
                line = await proc.stdout.readline()
                assert line, "healthplane lab exited early:\n" + "\n".join(lines)
                lines.append(line.decode().rstrip())
        yield proc, lines
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def _pids(lines: list[str]) -> list[tuple[str, int, bool]]:
    rows = []
    for line in lines:
        if match := re.match(r"\s+(\S.*?)\s+pid (\d+)\s", line):
            rows.append((match.group(1), int(match.group(2)), True))
    return rows


@pytest.mark.envoy
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
async def test_command_stops_everything_on_a_signal(sig: signal.Signals, leftovers: Leftovers) -> None:
    async with lab_command("--ports-base", "0", "--interval", "200ms", "--timeout", "100ms") as (proc, lines):
        text = "\n".join(lines)
        assert "curl -X POST -d livez=FAIL http://127.0.0.1:" in text
        children = _pids(lines)
        assert len(children) == 8, text
        leftovers.remember(children)
        workdir = Path(lines[-1].split(": ", 1)[1])
        assert (workdir / "topology.yaml").is_file()
        leftovers.workdirs.append(workdir)
        proc.send_signal(sig)
        async with asyncio.timeout(30):
            out = (await proc.communicate())[0].decode()
        assert proc.returncode == 0, out
        assert "stopped" in out
    leftovers.assert_none()


@pytest.mark.envoy
async def test_children_die_with_a_killed_lab(leftovers: Leftovers) -> None:
    """SIGKILL leaves no chance to clean up: the children's parent-death signal stops them."""
    async with lab_command("--ports-base", "0", "--interval", "200ms", "--timeout", "100ms") as (proc, lines):
        leftovers.remember(_pids(lines))
        workdir = Path(lines[-1].split(": ", 1)[1])
        proc.kill()
        await proc.wait()
    try:
        await leftovers.wait_none()
    finally:
        # What only a clean stop removes: the temporary directory.
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.mark.envoy
async def test_grpc_lab_adds_servers_checked_by_the_prober_and_a_proxyless_client(leftovers: Leftovers) -> None:
    lab = Lab(LabConfig(ports_base=0, health_check=FAST, grpc=True))
    async with lab:
        await lab.wait_healthy()  # the gRPC servers too: HEALTHY from the prober's grpc.health.v1 checks
        leftovers.remember(lab.children())
        assert lab.grpc_client is not None
        log = lab.grpc_client.log_path

        def answered_since(offset: int) -> Counter[str]:
            lines = log.read_text().splitlines()[offset:]
            return Counter(json.loads(line).get("server") for line in lines if line.startswith("{"))

        async def every_server() -> bool:
            return set(answered_since(0)) >= set(GRPC_BACKENDS)

        await poll_until(every_server, timeout=20, what="the proxyless client reaching every gRPC server")
        nodes = await lab.controlplane_get("/nodes")
        assert f"{GRPC_CLIENT_NODE}@{GRPC_SERVICE}" in {n["id"] for n in nodes["nodes"]}

        # SIGUSR1 fails grpc01's health service: the prober's verdict takes it out of the client's picks.
        os.kill(lab.grpc_servers[GRPC_BACKENDS[0]].pid, signal.SIGUSR1)

        async def out() -> bool:
            snap = await lab.controlplane_get("/snapshot")
            greeter = next(c for c in snap["clusters"] if c["name"] == GRPC_SERVICE)
            return any(ep["status"] == "UNHEALTHY" for ep in greeter["endpoints"])

        await poll_until(out, timeout=10, what="grpc01 UNHEALTHY")
        await asyncio.sleep(1)  # the client calls twice a second: let a call already on its way land
        offset = len(log.read_text().splitlines())

        async def without_first() -> bool:
            seen = answered_since(offset)
            return sum(seen.values()) >= 6 and GRPC_BACKENDS[0] not in seen

        await poll_until(without_first, timeout=10, what="calls reaching only grpc02 and grpc03")
        assert "kill -USR1" in lab.describe()
        leftovers.workdirs.append(lab.workdir)
    leftovers.assert_none()


def test_grpc_lab_needs_the_central_mode() -> None:
    with pytest.raises(ConfigError) as info:
        LabConfig(grpc=True, mode=Mode.PER_ENVOY)
    assert info.value.path == "--grpc"
    layout = make_layout(LabConfig(grpc=True, ports_base=0), PortPlan.free())
    assert layout.grpc_ports == ()  # picked when the lab starts
    document = topology_document(replace(layout, grpc_ports=(50051, 50052, 50053)))
    topology = parse_topology(document)
    [service] = topology.grpc_services
    cluster = topology.cluster(service.routes[0].clusters[0].cluster)
    assert cluster is not None and cluster.health_check is not None and cluster.health_check.kind == "grpc"
    assert [e.port for e in cluster.endpoints] == [50051, 50052, 50053]

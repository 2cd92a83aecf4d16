"""`healthplane lab`: the docker-compose lab as real processes on this machine.

    async with Lab(LabConfig()) as lab:      # control plane, front proxy, 3 x (demo app + sidecar)
        await lab.wait_healthy()
        await lab.set_livez("webserver01", "FAIL")

Every component is its own process, as in the compose file: the control plane
(`python -m controlplane serve` on a topology file the lab writes), the front Envoy(s), and per
backend a demo app (`python -m lab.demoapp`) and its sidecar Envoy. Separate processes keep the
load generator of `lab scenario` off the event loop whose prober timing it measures, let a
backend be killed on its own (a refused connection instead of a failing /livez), and are the
only way to put a backend inside a network namespace (`ip netns exec`). Children get SIGTERM if
the lab dies (PR_SET_PDEATHSIG) and are started in their own session, so Ctrl-C reaches only the
lab, which stops them in order: Envoys, demo apps, control plane, then the namespaces.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import ipaddress
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TextIO, TypeVar

import aiohttp
import yaml

from controlplane.xds.bootstrap import grpc_bootstrap_json, make_grpc_bootstrap
from lab.envoyproc import EnvoyError, EnvoyProcess, find_envoy, with_parent_death_signal
from lab.topology import (
    GRPC_BACKENDS,
    GRPC_CLIENT_NODE,
    GRPC_SERVICE,
    WEB_CLUSTER,
    BackendLayout,
    LabConfig,
    LabError,
    LabLayout,
    Mode,
    PortPlan,
    check_ports_free,
    front_bootstrap,
    make_layout,
    sidecar_bootstrap,
    topology_document,
    with_grpc_ports,
)

__all__ = [
    "BackendCounters",
    "ChildProcess",
    "Lab",
    "LabNetwork",
    "netns_unavailable_reason",
    "run_until_signal",
    "say",
]

log = logging.getLogger("healthplane.lab")
T = TypeVar("T")

_POLL = 0.05
_STOP_GRACE = 5.0
# Where `python -m lab.demoapp` and `python -m controlplane` are importable from, installed or not.
_SOURCE_ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- processes


class ChildProcess:
    """A process the lab owns, optionally inside a network namespace; stop() is idempotent."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        log_path: Path,
        netns: str | None = None,
        capture_stdout: bool = False,
    ) -> None:
        self.name = name
        self.argv = tuple(argv)
        self.log_path = log_path
        self.netns = netns
        self._capture_stdout = capture_stdout
        self._proc: asyncio.subprocess.Process | None = None
        self._exited: asyncio.Future[int] | None = None
        self._stop_lock = asyncio.Lock()
        self._stopped = False

    async def start(self) -> None:
        """Spawn the process (it may still be starting up when this returns)."""
        if self._proc is not None or self._stopped:
            raise LabError(f"{self.name}: start() can be called only once")
        argv = ["ip", "netns", "exec", self.netns, *self.argv] if self.netns else list(self.argv)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_SOURCE_ROOT), env.get("PYTHONPATH", "")) if p)
        env["PYTHONUNBUFFERED"] = "1"
        try:
            with self.log_path.open("ab") as out:
                self._proc = await asyncio.create_subprocess_exec(
                    *with_parent_death_signal(argv),
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.PIPE if self._capture_stdout else out,
                    stderr=out,
                    env=env,
                    # Its own session: a Ctrl-C in the terminal reaches the lab only, which then
                    # stops everything in order; the death signal covers a lab that is killed.
                    start_new_session=True,
                )
        except OSError as exc:
            raise LabError(f"{self.name}: cannot run {argv[0]}: {exc.strerror}") from exc
        self._exited = asyncio.ensure_future(self._proc.wait())

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise LabError(f"{self.name} has not been started")
        return self._proc.pid

    @property
    def started(self) -> bool:
        return self._proc is not None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    @property
    def exited(self) -> asyncio.Future[int]:
        """Resolves to the exit code when the process exits."""
        if self._exited is None:
            raise LabError(f"{self.name} has not been started")
        return self._exited

    def log_tail(self, n: int = 20) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return ""
        return "\n".join(lines[-n:])

    def failure(self, what: str) -> LabError:
        """A LabError saying `what` went wrong, with the exit code and the end of the log."""
        code = self._proc.returncode if self._proc is not None else None
        status = f" (exited with code {code})" if code is not None else ""
        tail = self.log_tail() or "(empty)"
        return LabError(f"{self.name}{status}: {what}\n--- {self.log_path} ---\n{tail}")

    async def first_line(self, timeout: float) -> str:  # noqa: ASYNC109 - a startup deadline
        """The first line the process prints on stdout (capture_stdout=True)."""
        if self._proc is None or self._proc.stdout is None:
            raise LabError(f"{self.name}: stdout is not captured")
        try:
            line = await asyncio.wait_for(self._proc.stdout.readline(), timeout)
        except TimeoutError:
            raise self.failure(f"printed nothing within {timeout:g}s") from None
        if not line:
            await asyncio.wait({self.exited}, timeout=1.0)
            raise self.failure("exited while starting")
        return line.decode(errors="replace").strip()

    async def wait_until(
        self,
        probe: Callable[[], Awaitable[bool]],
        *,
        timeout: float,  # noqa: ASYNC109 - a startup deadline
        what: str,
    ) -> None:
        """Poll `probe` until it holds; LabError when the process exits first or at the deadline."""
        deadline = time.monotonic() + timeout
        while True:
            if self.exited.done():
                raise self.failure(f"exited before {what}")
            with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError):
                if await probe():
                    return
            if time.monotonic() >= deadline:
                raise self.failure(f"not {what} after {timeout:g}s")
            # Waiting on the exit doubles as the poll interval and notices a crash at once.
            await asyncio.wait({self.exited}, timeout=_POLL)

    async def stop(self, grace: float = _STOP_GRACE) -> None:
        """SIGTERM, then SIGKILL after `grace` seconds; safe to call twice."""
        async with self._stop_lock:
            if self._stopped:
                return
            self._stopped = True
            if self._proc is None or self._exited is None:
                return
            try:
                if self._proc.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        self._proc.send_signal(signal.SIGTERM)
                    done, _ = await asyncio.wait({self._exited}, timeout=grace)
                    if not done:
                        log.warning("%s did not exit within %gs of SIGTERM; killing it", self.name, grace)
                        with contextlib.suppress(ProcessLookupError):
                            self._proc.kill()
                await self._exited
            finally:
                if self._proc.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        self._proc.kill()


def _envoy_argv(bootstrap: Path, log_level: str) -> list[str]:
    return [
        find_envoy(), "-c", str(bootstrap),
        # Neither flag leaves /dev/shm/envoy_shared_memory_* behind; several Envoys need the first.
        "--use-dynamic-base-id", "--disable-hot-restart",
        # One worker each: a lab of up to a dozen Envoys on a small machine.
        "--concurrency", "1", "-l", log_level,
    ]  # fmt: skip


# ----------------------------------------------------------------------------- network namespaces


async def _ip(*args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        "ip", *args, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise LabError(f"`ip {' '.join(args)}` failed: {err.decode(errors='replace').strip()}")
    return out.decode()


def netns_unavailable_reason(prefix: str = "hplab") -> str | None:
    """Why `--netns` cannot work here (not root, no `ip`, namespaces refused), or None."""
    if os.geteuid() != 0:
        return "--netns needs root (it creates network namespaces, a bridge and veth pairs)"
    if shutil.which("ip") is None:
        return "--netns needs the `ip` command (iproute2)"
    probe = f"{prefix}-probe{os.getpid()}"
    added = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, check=False)
    if added.returncode != 0:
        return f"`ip netns add` is not allowed here: {added.stderr.strip()}"
    try:
        # The lab also needs a bridge and veth pairs; try both inside the throwaway namespace.
        for args in (
            ["link", "add", "br0", "type", "bridge"],
            ["link", "add", "v0", "type", "veth", "peer", "name", "v1"],
        ):
            made = subprocess.run(["ip", "-n", probe, *args], capture_output=True, text=True, check=False)
            if made.returncode != 0:
                return f"`ip {' '.join(args)}` is not allowed here: {made.stderr.strip()}"
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True, check=False)
    return None


class LabNetwork:
    """The namespaces, bridge and veth pairs of `--netns`; remove() deletes only what create() made."""

    def __init__(self, layout: LabLayout) -> None:
        self.layout = layout
        self._namespaces: list[str] = []
        self._veths: list[str] = []
        self._bridge: str | None = None

    async def create(self) -> None:
        """A bridge holding the subnet's first address, one namespace per backend wired to it."""
        layout = self.layout
        assert layout.bridge is not None and layout.bridge_cidr is not None
        reason = await asyncio.to_thread(netns_unavailable_reason, layout.config.netns_prefix)
        if reason is not None:
            raise LabError(reason)
        await self._check_free()
        try:
            await _ip("link", "add", layout.bridge, "type", "bridge")
            self._bridge = layout.bridge
            await _ip("addr", "add", layout.bridge_cidr, "dev", layout.bridge)
            await _ip("link", "set", layout.bridge, "up")
            for b in layout.backends:
                assert b.netns is not None and b.veth is not None and b.cidr is not None
                await _ip("netns", "add", b.netns)
                self._namespaces.append(b.netns)
                # The namespace end is created inside the namespace, so no `eth0` ever exists here.
                await _ip("link", "add", b.veth, "type", "veth", "peer", "name", "eth0", "netns", b.netns)
                self._veths.append(b.veth)
                await _ip("link", "set", b.veth, "master", layout.bridge)
                await _ip("link", "set", b.veth, "up")
                await _ip("-n", b.netns, "addr", "add", b.cidr, "dev", "eth0")
                await _ip("-n", b.netns, "link", "set", "eth0", "up")
                await _ip("-n", b.netns, "link", "set", "lo", "up")
                # No default route: from a namespace only the lab subnet is reachable.
        except BaseException:
            await self.remove()
            raise

    async def _check_free(self) -> None:
        layout = self.layout
        names = {b.netns for b in layout.backends if b.netns is not None}
        existing = {line.split()[0] for line in (await _ip("netns", "list")).splitlines() if line.strip()}
        if stale := sorted(names & existing):
            raise LabError(
                f"network namespace {', '.join(stale)} already exists: another lab is running with "
                f"--netns-prefix {layout.config.netns_prefix}, or one was killed; remove them with "
                + "; ".join(f"`ip netns del {n}`" for n in stale)
                + f" (and `ip link del {layout.bridge}`), or pick another --netns-prefix"
            )
        links = {link["ifname"] for link in json.loads(await _ip("-j", "link", "show"))}
        wanted = {n for n in (layout.bridge, *(b.veth for b in layout.backends)) if n is not None}
        if taken := sorted(wanted & links):
            raise LabError(
                f"interface {', '.join(taken)} already exists (a lab killed before cleanup?): "
                + "; ".join(f"`ip link del {n}`" for n in taken)
                + ", or pick another --netns-prefix"
            )
        subnet = layout.config.subnet
        for link in json.loads(await _ip("-j", "-4", "addr", "show")):
            for addr in link.get("addr_info", []):
                local = addr.get("local")
                if local and _in_subnet(local, subnet):
                    raise LabError(
                        f"{link['ifname']} already has {local}, inside --subnet {subnet}; pick another --subnet"
                    )

    async def remove(self) -> None:
        """Delete the veth pairs, the namespaces and the bridge; safe to call twice."""
        errors: list[str] = []
        # A namespace's interfaces would go with it, but asynchronously (the kernel's netns
        # cleanup); deleting one end of a pair takes both away before this returns.
        while self._veths:
            veth = self._veths.pop()
            try:
                await _ip("link", "del", veth)
            except LabError as exc:
                errors.append(str(exc))
        while self._namespaces:
            ns = self._namespaces.pop()
            try:
                await _ip("netns", "del", ns)
            except LabError as exc:
                errors.append(str(exc))
        if self._bridge is not None:
            bridge, self._bridge = self._bridge, None
            try:
                await _ip("link", "del", bridge)
            except LabError as exc:
                errors.append(str(exc))
        if errors:
            raise LabError("could not remove the lab network: " + "; ".join(errors))


def _in_subnet(address: str, subnet: ipaddress.IPv4Network) -> bool:
    try:
        return ipaddress.ip_address(address) in subnet
    except ValueError:
        return False


# ----------------------------------------------------------------------------- the lab


class State(enum.Enum):
    UNOPENED = "unopened"
    RUNNING = "running"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class BackendCounters:
    """What a demo app counted (its GET /configs): requests on `/` and GETs of the health path."""

    served: int
    health_checks: int


class Lab:
    """The whole lab: start() brings it up, aclose() takes everything down (safe to call twice)."""

    def __init__(self, config: LabConfig, *, start_timeout: float = 60.0) -> None:
        self.config = config
        self.start_timeout = start_timeout
        self.state = State.UNOPENED
        self._layout: LabLayout | None = None
        self._workdir: Path | None = None
        self._own_workdir = False
        self._network: LabNetwork | None = None
        self._session: aiohttp.ClientSession | None = None
        self.controlplane: ChildProcess | None = None
        self.apps: dict[str, ChildProcess] = {}
        self.sidecars: dict[str, ChildProcess] = {}
        self.fronts: list[EnvoyProcess] = []
        self.grpc_servers: dict[str, ChildProcess] = {}  # --grpc
        self.grpc_client: ChildProcess | None = None
        self._close_lock = asyncio.Lock()
        self.started_in: float | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Start every process and wait until each answers (not until the backends are healthy)."""
        if self.state is not State.UNOPENED:
            raise LabError(f"the lab is {self.state.value}; start() can be called only once")
        self.state = State.RUNNING
        began = time.monotonic()
        try:
            await self._start()
        except BaseException:
            try:
                await self.aclose()
            except Exception as exc:  # the start failure is the news; the cleanup's is logged
                log.error("while cleaning up after a failed start: %s", exc)
            raise
        self.started_in = time.monotonic() - began

    async def _start(self) -> None:
        config = self.config
        layout = self._layout = with_grpc_ports(make_layout(config, PortPlan.resolve(config.ports_base)))
        if config.workdir is not None:
            config.workdir.mkdir(parents=True, exist_ok=True)
            self._workdir = config.workdir
        else:
            self._workdir = Path(tempfile.mkdtemp(prefix="healthplane-lab-"))
            self._own_workdir = True
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
        if config.netns:
            self._network = LabNetwork(layout)
            await self._network.create()
        # After the network: in namespaces the xDS server binds the bridge's address.
        check_ports_free(layout)
        deadline = time.monotonic() + self.start_timeout
        if config.mode is Mode.CENTRAL:
            await self._start_controlplane(deadline)
        await _all(self._start_backend(b, deadline) for b in layout.backends)
        await _all(self._start_front(i, deadline) for i in range(len(layout.fronts)))
        if config.grpc:
            await self._start_grpc(deadline)

    async def _start_controlplane(self, deadline: float) -> None:
        layout, workdir = self.layout, self.workdir
        path = workdir / "topology.yaml"
        path.write_text(
            "# Written by `healthplane lab`: the compose topology with the lab's addresses. Edits are served live.\n"
            + yaml.safe_dump(topology_document(layout), sort_keys=False)
        )
        cp = self.controlplane = ChildProcess(
            "control plane",
            [sys.executable, "-m", "controlplane", "serve", "--config", str(path)],
            log_path=workdir / "controlplane.log",
        )
        await cp.start()
        url = f"{layout.controlplane_url}/readyz"
        await cp.wait_until(lambda: self._http_ok(url), timeout=_left(deadline), what="serving its admin API")

    async def _start_backend(self, backend: BackendLayout, deadline: float) -> None:
        workdir = self.workdir
        app = self.apps[backend.name] = ChildProcess(
            f"{backend.name} app",
            [sys.executable, "-m", "lab.demoapp", "--host", "127.0.0.1", "--port", str(backend.app_port),
             "--name", backend.name],
            log_path=workdir / f"{backend.name}-app.log",
            netns=backend.netns,
            capture_stdout=True,
        )  # fmt: skip
        await app.start()
        await app.first_line(timeout=_left(deadline))  # "demoapp NAME listening on URL"
        bootstrap = workdir / f"{backend.node_id}.yaml"
        bootstrap.write_text(yaml.safe_dump(sidecar_bootstrap(self.layout, backend), sort_keys=False))
        sidecar = self.sidecars[backend.name] = ChildProcess(
            backend.node_id,
            _envoy_argv(bootstrap, self.config.envoy_log_level),
            log_path=workdir / f"{backend.node_id}.log",
            netns=backend.netns,
        )
        await sidecar.start()
        # LIVE once it has its listener (over ADS in central mode).
        await sidecar.wait_until(
            lambda: self._http_ok(f"{backend.admin_url}/ready", body="LIVE"),
            timeout=_left(deadline),
            what="LIVE",
        )

    async def _start_grpc(self, deadline: float) -> None:
        """`--grpc`: the gRPC demo servers, then a proxyless client of xds:///greeter logging who answered."""
        workdir = self.workdir

        async def server(name: str, port: int) -> None:
            proc = self.grpc_servers[name] = ChildProcess(
                f"{name} gRPC server",
                [sys.executable, "-m", "lab.grpcdemo", "--host", "127.0.0.1", "--port", str(port), "--name", name],
                log_path=workdir / f"{name}.log",
                capture_stdout=True,
            )
            await proc.start()
            await proc.first_line(timeout=_left(deadline))  # "grpc demo NAME on HOST:PORT"

        await _all(server(name, port) for name, port in zip(GRPC_BACKENDS, self.layout.grpc_ports, strict=True))
        bootstrap = workdir / f"{GRPC_CLIENT_NODE}.json"
        bootstrap.write_text(
            grpc_bootstrap_json(
                make_grpc_bootstrap(
                    node_id=GRPC_CLIENT_NODE, xds_host=self.layout.xds_address, xds_port=self.layout.ports.xds
                )
            )
        )
        self.grpc_client = ChildProcess(
            "proxyless gRPC client",
            [sys.executable, "-m", "lab.grpcclient", "--bootstrap", str(bootstrap), "--target", GRPC_SERVICE,
             "--rate", "2", "--name", GRPC_CLIENT_NODE],
            log_path=workdir / f"{GRPC_CLIENT_NODE}.log",
        )  # fmt: skip
        await self.grpc_client.start()

    async def _start_front(self, index: int, deadline: float) -> None:
        front = self.layout.fronts[index]
        envoy = EnvoyProcess(
            front_bootstrap(self.layout, front),
            name=front.node_id,
            log_level=self.config.envoy_log_level,
            workdir=self.workdir / front.node_id,
            extra_args=("--concurrency", "1"),
        )
        self.fronts.append(envoy)
        try:
            await envoy.start(timeout=_left(deadline))
            await envoy.wait_live(timeout=_left(deadline))
        except EnvoyError as exc:
            raise LabError(f"front proxy {front.node_id}: {exc}") from exc

    async def aclose(self) -> None:
        """Stop every process (Envoys, apps, control plane), remove the namespaces; idempotent."""
        async with self._close_lock:
            if self.state is State.CLOSED:
                return
            self.state = State.CLOSED
            errors: list[BaseException] = []

            async def stop_all(stops: Sequence[Awaitable[None]]) -> None:
                results = await asyncio.gather(*stops, return_exceptions=True)
                errors.extend(r for r in results if isinstance(r, BaseException))

            # Envoys first: with the control plane gone first they would only log xDS errors.
            await stop_all([f.stop() for f in self.fronts] + [s.stop() for s in self.sidecars.values()])
            if self.grpc_client is not None:
                await stop_all([self.grpc_client.stop()])
            await stop_all([a.stop() for a in [*self.apps.values(), *self.grpc_servers.values()]])
            if self.controlplane is not None:
                await stop_all([self.controlplane.stop()])
            if self._network is not None:
                await stop_all([self._network.remove()])
            if self._session is not None:
                await self._session.close()
            if self._own_workdir and self._workdir is not None:
                shutil.rmtree(self._workdir, ignore_errors=True)
            if errors:
                raise LabError("; ".join(str(e) for e in errors)) from errors[0]

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    # -- facts -------------------------------------------------------------------------------

    @property
    def layout(self) -> LabLayout:
        if self._layout is None:
            raise LabError("the lab has not been started")
        return self._layout

    @property
    def workdir(self) -> Path:
        if self._workdir is None:
            raise LabError("the lab has not been started")
        return self._workdir

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            raise LabError("the lab is not running")
        return self._session

    def children(self) -> list[tuple[str, int, bool]]:
        """(name, pid, running) of every process the lab has started."""
        procs: list[ChildProcess] = [*self.apps.values(), *self.sidecars.values(), *self.grpc_servers.values()]
        if self.controlplane is not None:
            procs.append(self.controlplane)
        if self.grpc_client is not None:
            procs.append(self.grpc_client)
        rows = [(p.name, p.pid, p.running) for p in procs if p.started]
        for envoy in self.fronts:
            with contextlib.suppress(EnvoyError):  # not spawned: start() failed before
                rows.append((envoy.name, envoy.pid, envoy.running))
        return rows

    # -- talking to the lab ------------------------------------------------------------------

    async def _http_ok(self, url: str, *, body: str | None = None) -> bool:
        async with self.session.get(url, timeout=aiohttp.ClientTimeout(total=1)) as resp:
            if resp.status != 200:
                return False
            return body is None or (await resp.text()).strip() == body

    async def controlplane_get(self, path: str) -> Any:
        """JSON of GET `path` on the control plane's admin API (central mode)."""
        async with self.session.get(self.layout.controlplane_url + path) as resp:
            resp.raise_for_status()
            return await resp.json()

    async def set_livez(self, backend: str, value: str) -> float:
        """POST livez=`value` to a demo app through its sidecar; the time.time() it answered."""
        b = self.layout.backend(backend)
        async with self.session.post(f"{b.url}/livez", data={"livez": value}) as resp:
            text = await resp.text()
            answered = time.time()
            if resp.status != 200:
                raise LabError(f"POST {b.url}/livez answered {resp.status}: {text.strip()}")
        return answered

    async def counters(self) -> dict[str, BackendCounters]:
        """Every demo app's counters, read through its sidecar (GET /configs)."""

        async def one(b: BackendLayout) -> tuple[str, BackendCounters]:
            async with self.session.get(f"{b.url}/configs") as resp:
                resp.raise_for_status()
                doc = await resp.json()
            path = self.config.health_check.path
            return b.name, BackendCounters(int(doc["served"]), int(doc["health_checks"].get(path, 0)))

        return dict(await asyncio.gather(*(one(b) for b in self.layout.backends)))

    async def front_healthy(self) -> list[int]:
        """Each front proxy's count of healthy hosts in `web` (Envoy's membership_healthy gauge)."""
        name = f"cluster.{WEB_CLUSTER}.membership_healthy"

        async def one(envoy: EnvoyProcess) -> int:
            return (await envoy.stats(f"^{name}$")).get(name, -1)

        return list(await asyncio.gather(*(one(f) for f in self.fronts)))

    async def wait_healthy(self, timeout: float = 30.0) -> None:  # noqa: ASYNC109 - a deadline
        """Until every backend is HEALTHY everywhere: in the control plane and in each front proxy."""
        deadline = time.monotonic() + timeout
        n = len(self.layout.backends)
        if self.config.mode is Mode.CENTRAL:
            checked = (WEB_CLUSTER, GRPC_SERVICE) if self.config.grpc else (WEB_CLUSTER,)

            async def verdicts() -> bool:
                snap = await self.controlplane_get("/snapshot")
                return all(
                    ep["status"] == "HEALTHY" for c in snap["clusters"] if c["name"] in checked for ep in c["endpoints"]
                )

            await self._poll(verdicts, deadline, "every backend HEALTHY in the control plane's /snapshot")

        async def fronts() -> bool:
            return all(h == n for h in await self.front_healthy())

        await self._poll(fronts, deadline, f"{n} healthy hosts in cluster web of every front proxy")

    async def _poll(self, probe: Callable[[], Awaitable[bool]], deadline: float, what: str) -> None:
        while True:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError, EnvoyError):
                if await probe():
                    return
            if time.monotonic() >= deadline:
                raise LabError(f"timed out waiting for {what}; logs in {self.workdir}")
            await asyncio.sleep(_POLL)

    def describe(self) -> str:
        """What is running where, and what to try."""
        layout, config = self.layout, self.config
        b1 = layout.backends[0]
        where = (
            f"each backend in its own network namespace on {config.subnet}"
            if config.netns
            else "everything on 127.0.0.1"
        )
        took = f" in {self.started_in:.1f}s" if self.started_in is not None else ""
        tries = [
            (f"curl {layout.front_url}/", "round robin over " + ", ".join(b.name for b in layout.backends)),
            (f"curl -X POST -d livez=FAIL {b1.url}/livez", f"{b1.name} fails its health check (still serves /)"),
            (f"curl -X POST -d livez=OK {b1.url}/livez", "...and recovers"),
        ]
        if config.mode is Mode.CENTRAL:
            cp = layout.controlplane_url
            tries += [
                (f"curl {cp}/snapshot", "the prober's verdicts, as served over EDS"),
                (f"curl {cp}/nodes", "which Envoy ACKed which version"),
                (f"curl '{cp}/events?kind=probe'", "every verdict change"),
            ]
        if self.grpc_client is not None:
            first = GRPC_BACKENDS[0]
            tries += [
                (
                    f"tail -f {self.grpc_client.log_path}",
                    f"the proxyless client: which server answered xds:///{GRPC_SERVICE}",
                ),
                (
                    f"kill -USR1 {self.grpc_servers[first].pid}",
                    f"{first} fails its gRPC health check (again: recovers)",
                ),
            ]
        tries += [
            (f"curl -s {self.fronts[0].admin_url}/clusters | grep health_flags", "the front proxy's view"),
            (f"curl {b1.url}/configs", f"{b1.name}'s counters: requests served, /livez checks received"),
        ]
        pad = max(len(cmd) for cmd, _ in tries)
        lines = [
            f"healthplane lab is up{took} ({config.mode.title}{', delta xDS' if config.delta else ''}; {where}). "
            "Ctrl-C stops everything.",
            "",
            "Try:",
            *(f"  {cmd:<{pad}}  # {why}" for cmd, why in tries),
            "",
            "Processes:",
        ]
        rows: list[tuple[str, str, str]] = []
        if self.controlplane is not None:
            rows.append(
                ("control plane", str(self.controlplane.pid),
                 f"xDS {layout.xds_address}:{layout.ports.xds}, admin {layout.controlplane_url}")
            )  # fmt: skip
        for envoy in self.fronts:
            rows.append((envoy.name, str(envoy.pid), f"listener {layout.front_url}, admin {envoy.admin_url}"))
        for b in layout.backends:
            ns = f" (netns {b.netns})" if b.netns else ""
            rows.append((b.node_id, str(self.sidecars[b.name].pid), f"listener {b.url}, admin {b.admin_url}{ns}"))
            rows.append((f"{b.name} app", str(self.apps[b.name].pid), f"http://127.0.0.1:{b.app_port}{ns}"))
        for (name, proc), port in zip(self.grpc_servers.items(), layout.grpc_ports, strict=True):
            rows.append((f"{name} gRPC", str(proc.pid), f"127.0.0.1:{port}, in xds:///{GRPC_SERVICE}"))
        if self.grpc_client is not None:
            rows.append((GRPC_CLIENT_NODE, str(self.grpc_client.pid), f"log {self.grpc_client.log_path}"))
        width = max(len(r[0]) for r in rows)
        lines += [f"  {name:<{width}}  pid {pid:<7}  {what}" for name, pid, what in rows]
        lines.append("")
        if config.mode is Mode.CENTRAL:
            lines.append(f"Topology (edits are served live): {self.workdir / 'topology.yaml'}")
        lines.append(f"Bootstraps and logs: {self.workdir}")
        return "\n".join(lines)


async def _all(coros: Iterable[Coroutine[Any, Any, None]]) -> None:
    """Run concurrently; the first failure cancels the rest and is raised as itself."""
    try:
        async with asyncio.TaskGroup() as tg:
            for coro in coros:
                tg.create_task(coro)
    except BaseExceptionGroup as group:
        first, *others = _leaves(group)
        for exc in others:
            log.error("also failed while starting: %s", exc)
        raise first from None


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        out.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out


def _left(deadline: float) -> float:
    return max(0.1, deadline - time.monotonic())


# ----------------------------------------------------------------------------- command line


class Interrupted(Exception):
    """SIGINT or SIGTERM stopped the command."""


async def run_until_signal(main: Coroutine[Any, Any, T]) -> T:
    """Run `main`, cancelling it (once: its cleanup must finish) on SIGINT or SIGTERM."""
    task = asyncio.ensure_future(main)
    loop = asyncio.get_running_loop()
    signalled: list[int] = []

    def on_signal(sig: int) -> None:
        if signalled:
            return
        signalled.append(sig)
        task.cancel()
        # After the cancel: a closed stderr (`| head`) must not keep the lab running.
        say(f"\nhealthplane lab: {signal.Signals(sig).name}, stopping everything...", file=sys.stderr)

    installed = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, on_signal, sig)
            installed.append(sig)
    try:
        return await task
    except asyncio.CancelledError:
        if signalled:
            raise Interrupted(signal.Signals(signalled[0]).name) from None
        raise
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


def say(text: str, *, file: TextIO | None = None) -> None:
    """Print, unless the terminal or pipe is gone: stopping cleanly matters more."""
    with contextlib.suppress(OSError, ValueError):
        print(text, file=file or sys.stdout, flush=True)

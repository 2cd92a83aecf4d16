"""Propagation benchmark: convergence at N simulated nodes, what measuring it costs, and the model vs theory.

One control plane runs in its own process (`ControlPlane` on ephemeral ports, one cluster `web`
with three endpoints, one listener); W worker processes hold N simulated nodes between them
(`lab.fleet.Fleet`: real grpc.aio ADS streams subscribing CDS, EDS, LDS and RDS, ACKing at once).
The parent flips one endpoint's override, one push at a time, and per push the server reports:

- push time: from the verdict (taken right before `ControlPlane.set_override`) to the last
  node's EDS ACK as the server processed it, counted by a small callback present in every push;
- the server's CPU time over the same span (getrusage, all threads);
- with the tracker on, its own convergence figure for the version (which should match).

Pushes alternate between the propagation tracker on and off (removed from the stream callbacks
and from publishing; on, off, off, on, ...), so both are measured side by side under the same
load: the overhead is the ratio of their medians, in wall time and in the server's CPU time (the
steadier of the two on a shared machine). With `--model-nodes`, a second part serves a uniform 0-200 ms modelled
delay to every node and compares the measured convergence with the expected maximum of N
uniform draws, 200*N/(N+1) ms, plus the push time measured without a model.

    python bench/propagation.py --nodes 10 100 1000 5000 [--pushes 20] [--model-nodes 10 100] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import math
import multiprocessing as mp
import os
import signal
import statistics
import sys
import time
from collections.abc import Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

_HERE = Path(__file__).resolve().parent
if str(_HERE.parent) not in sys.path:
    sys.path.append(str(_HERE.parent))
if str(_HERE) not in sys.path:
    sys.path.append(str(_HERE))

from fanout import _cpu_seconds  # noqa: E402

from bench.procs import Child, child_setup, dispatch, raise_fd_limit, rss_kb, serve_commands  # noqa: E402

EDS = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
CLUSTER = "web"
FLIPPED = "127.0.0.1:18081"
MODEL_HIGH_MS = 200.0


def topology(propagation: dict[str, Any] | None) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "controlplane": {
            "xds": {"address": "127.0.0.1", "port": 0},
            "admin": {"address": "127.0.0.1", "port": 0},
            "watch_interval": 0,
        },
        "clusters": [{"name": CLUSTER, "endpoints": [{"address": "127.0.0.1", "port": 18081 + i} for i in range(3)]}],
        "listeners": [{"name": "ingress", "port": 10000, "routes": [{"cluster": CLUSTER}]}],
    }
    if propagation is not None:
        doc["controlplane"]["propagation"] = propagation
    return doc


# --------------------------------------------------------------------------- server process


def server_main(conn: Connection, propagation: dict[str, Any] | None) -> None:
    child_setup()
    asyncio.run(_server(conn, propagation))


async def _server(conn: Connection, propagation: dict[str, Any] | None) -> None:
    from controlplane.app import ControlPlane, tune_gc_for_streams
    from controlplane.health.store import HealthStatus
    from controlplane.topology.parse import parse_topology
    from controlplane.xds.server import StreamCallbacks
    from controlplane.xds.stream import RequestKind, RequestOutcome, StreamState

    class LastAck(StreamCallbacks):
        """Notes when the push's last EDS ACK is processed; present whether the tracker is on or off."""

        def __init__(self) -> None:
            self.version: str | None = None
            self.remaining = 0
            self.done = asyncio.Event()
            self.at = 0.0
            self.cpu = 0.0

        def arm(self, version: str, expected: int) -> None:
            self.version, self.remaining = version, expected
            self.done.clear()

        def on_request(self, stream: StreamState, outcome: RequestOutcome) -> None:
            if outcome.kind is RequestKind.ACK and outcome.type_url == EDS and outcome.version == self.version:
                self.remaining -= 1
                if self.remaining == 0:
                    self.at, self.cpu = time.time(), _cpu_seconds()
                    self.done.set()

    cp = ControlPlane(parse_topology(topology(propagation), source="bench"))
    tune_gc_for_streams()
    tracker = cp.propagation
    assert tracker is not None
    last = LastAck()
    cp.stream_callbacks.add(last)
    # The model's draws of each push, to tell the sampling (vs theory) from the system's own time.
    draws: list[float] = []
    model = cp.ads.delay
    assert model is not None

    def recording(stream: StreamState) -> float:
        draw = model(stream)
        draws.append(draw)
        return draw

    cp.ads.delay = recording

    # The tracker's own time per push: its two entry points timed (the wrapper's cost counts against it).
    inside = [0.0]

    def timed(method: Any) -> Any:
        def call(*args: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return method(*args)
            finally:
                inside[0] += time.perf_counter() - t0

        return call

    tracker.on_request = timed(tracker.on_request)  # type: ignore[method-assign]
    tracker.on_snapshot = timed(tracker.on_snapshot)  # type: ignore[method-assign]
    await cp.start()
    conn.send({"xds_port": cp.xds_port, "pid": os.getpid(), "rss_kb": rss_kb()})
    flips = 0

    def measuring(on: bool) -> None:
        chain = cp.stream_callbacks.callbacks
        if on and tracker not in chain:
            chain.insert(chain.index(last), tracker)
            cp.propagation = tracker
        elif not on and tracker in chain:
            chain.remove(tracker)
            cp.propagation = None

    async def settle(expected: int, limit: float) -> dict[str, Any]:
        deadline = time.monotonic() + limit
        while True:
            current = cp.snapshot.type_versions[EDS]
            acked = sum(
                1 for s in cp.nodes.streams() if (ts := s.types.get(EDS)) is not None and ts.acked_version == current
            )
            if acked >= expected or time.monotonic() > deadline:
                return {"acked": acked, "rss_kb": rss_kb()}
            await asyncio.sleep(0.05)

    async def push(expected: int, on: bool, limit: float) -> dict[str, Any]:
        nonlocal flips
        measuring(on)
        status = HealthStatus.UNHEALTHY if flips % 2 == 0 else HealthStatus.HEALTHY
        flips += 1
        draws.clear()
        inside[0] = 0.0
        cpu0 = _cpu_seconds()
        verdict = time.time()
        snapshot = cp.set_override(CLUSTER, FLIPPED, status, who="bench")
        published = time.time()
        if snapshot is None:
            raise RuntimeError(f"setting {FLIPPED} {status.name} published nothing")
        last.arm(snapshot.type_versions[EDS], expected)
        try:
            await asyncio.wait_for(last.done.wait(), limit)
        except TimeoutError:
            return {"complete": False, "on": on, "missing": last.remaining}
        record = tracker.get(snapshot.version) if on else None
        await asyncio.sleep(0.05)  # the writers' wake-ups after the last ACKs, outside the measure
        return {
            "complete": True,
            "on": on,
            "push_ms": (last.at - verdict) * 1000,
            "publish_ms": (published - verdict) * 1000,
            "cpu_ms": (last.cpu - cpu0) * 1000,
            "tracker_ms": inside[0] * 1000,
            "cause_ms": (verdict - snapshot.cause.time) * 1000,
            "tracker_convergence_ms": None
            if record is None or record.convergence is None
            else record.convergence * 1000,
            "tracker_nodes": None if record is None else len(record.deliveries),
            "max_draw_ms": max(draws) * 1000 if draws else None,
            "draws": len(draws),
            "tracker_p50_ms": None if record is None or not (d := record.delays()) else d[(len(d) - 1) // 2] * 1000,
        }

    try:
        await serve_commands(conn, dispatch({"settle": settle, "push": push}))
    finally:
        await cp.aclose(grace=0)


# --------------------------------------------------------------------------- fleet processes


def worker_main(conn: Connection, port: int, prefix: str, count: int, batch: int) -> None:
    child_setup()
    asyncio.run(_worker(conn, port, prefix, count, batch))


async def _worker(conn: Connection, port: int, prefix: str, count: int, batch: int) -> None:
    from lab.fleet import Fleet

    fleet = Fleet(f"127.0.0.1:{port}", count, prefix=prefix)

    async def connect(limit: float) -> dict[str, Any]:
        try:
            await fleet.start(limit=limit, batch=batch)
        except (TimeoutError, ConnectionError) as exc:
            return {"connected": sum(1 for n in fleet.nodes if n.ready.is_set() and not n.error), "error": str(exc)}
        return {"connected": count, "error": None}

    try:
        await serve_commands(conn, dispatch({"connect": connect}))
    finally:
        await fleet.aclose()


# --------------------------------------------------------------------------- parent


def _median(values: Sequence[float | None]) -> float:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else math.nan


def run_nodes(
    ctx: Any,
    children: list[Child],
    nodes: int,
    *,
    pushes: int,
    workers: int,
    batch: int,
    propagation: dict[str, Any] | None,
    alternate: bool,
    log: Any,
) -> list[dict[str, Any]]:
    """A fresh server and fleet of `nodes`; `pushes` measured pushes (alternating on/off if asked)."""
    server = Child(ctx, "propagation-server", server_main, propagation)
    children.append(server)
    ready = server.recv(60)
    port = ready["xds_port"]
    workers = max(1, min(workers, nodes))
    shares = [nodes // workers + (1 if w < nodes % workers else 0) for w in range(workers)]
    fleet = [Child(ctx, f"fleet-{w}", worker_main, port, f"w{w}", share, batch) for w, share in enumerate(shares)]
    children.extend(fleet)
    try:
        limit = 60 + nodes * 0.05
        t0 = time.monotonic()
        for c in fleet:
            c.send("connect", limit)
        answers = [c.recv(limit + 30) for c in fleet]
        if any(a["error"] for a in answers):
            raise RuntimeError(f"fleet did not connect: {[a['error'] for a in answers if a['error']][:2]}")
        settled = server.ask("settle", nodes, limit, limit=limit + 30)
        log(f"  {nodes} nodes connected in {time.monotonic() - t0:.1f} s; server RSS {settled['rss_kb']} kB")
        results = []
        server.ask("push", nodes, True, limit, limit=limit + 30)  # warm-up, unmeasured
        for i in range(pushes):
            # on, off, off, on, ...: each mode gets as many UNHEALTHY as HEALTHY flips, early and late.
            on = (i % 4 in (0, 3)) if alternate else True
            result = server.ask("push", nodes, on, limit, limit=limit + 30)
            if not result["complete"]:
                raise RuntimeError(f"push {i} at {nodes} nodes: {result['missing']} nodes did not ACK in {limit} s")
            results.append(result)
            time.sleep(0.1)
        return results
    finally:
        for c in [*fleet, server]:
            c.close()
            children.remove(c)


def overhead_row(nodes: int, results: list[dict[str, Any]]) -> dict[str, Any]:
    on = [r for r in results if r["on"]]
    off = [r for r in results if not r["on"]]
    push_on, push_off = _median([r["push_ms"] for r in on]), _median([r["push_ms"] for r in off])
    cpu_on, cpu_off = _median([r["cpu_ms"] for r in on]), _median([r["cpu_ms"] for r in off])
    pub_on, pub_off = _median([r["publish_ms"] for r in on]), _median([r["publish_ms"] for r in off])
    return {
        "nodes": nodes,
        "pushes": f"{len(on)}+{len(off)}",
        "convergence_ms": _median([r["tracker_convergence_ms"] for r in on]),
        "push_on_ms": push_on,
        "push_off_ms": push_off,
        "push_overhead_pct": 100 * (push_on / push_off - 1),
        "cpu_on_ms": cpu_on,
        "cpu_off_ms": cpu_off,
        "cpu_overhead_pct": 100 * (cpu_on / cpu_off - 1),
        "cpu_mean_overhead_pct": 100
        * (statistics.fmean(r["cpu_ms"] for r in on) / statistics.fmean(r["cpu_ms"] for r in off) - 1),
        "publish_on_ms": pub_on,
        "publish_off_ms": pub_off,
        # The tracker's own code, timed from inside, against the server's CPU for the push.
        "tracker_ms": _median([r["tracker_ms"] for r in on]),
        "tracker_share_pct": 100 * _median([r["tracker_ms"] / r["cpu_ms"] for r in on if r["cpu_ms"] > 0]),
    }


def model_row(nodes: int, results: list[dict[str, Any]], baseline_ms: float) -> dict[str, Any]:
    conv = [r["tracker_convergence_ms"] for r in results]
    maxima = [r["max_draw_ms"] for r in results]
    expected_max = MODEL_HIGH_MS * nodes / (nodes + 1)
    mean = statistics.fmean(conv)
    # The spread of a mean of `pushes` maxima: one max of N uniforms has sd 200*sqrt(N/((N+1)^2 (N+2))).
    sd_of_mean = MODEL_HIGH_MS * math.sqrt(nodes / ((nodes + 1) ** 2 * (nodes + 2))) / math.sqrt(len(conv))
    return {
        "nodes": nodes,
        "pushes": len(conv),
        "theory_max_ms": expected_max,
        "drawn_max_ms": statistics.fmean(maxima),
        "theory_sd_ms": sd_of_mean,
        "baseline_push_ms": baseline_ms,
        "theory_ms": expected_max + baseline_ms,
        "measured_ms": mean,
        "measured_p50_ms": _median(conv),
        "diff_ms": mean - (expected_max + baseline_ms),
        "over_drawn_max_ms": _median([c - m for c, m in zip(conv, maxima, strict=True)]),
        "node_p50_ms": _median([r["tracker_p50_ms"] for r in results]),
    }


def table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    headers = list(rows[0])
    cells = [headers] + [[f"{v:.1f}" if isinstance(v, float) else str(v) for v in r.values()] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in cells)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, nargs="*", default=[10, 100, 1000], help="fleet sizes, no model")
    parser.add_argument("--pushes", type=int, default=20, help="measured pushes per size (half on, half off)")
    parser.add_argument("--model-nodes", type=int, nargs="*", default=[10, 100], help="fleet sizes for the model")
    parser.add_argument("--model-pushes", type=int, default=20, help="measured pushes per size with the model")
    parser.add_argument("--workers", type=int, default=2, help="fleet processes")
    parser.add_argument("--batch", type=int, default=250, help="streams each fleet process opens at a time")
    parser.add_argument("--json", type=Path, help="write every push's figures here")
    args = parser.parse_args(argv)

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    def on_sigterm(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    raise_fd_limit()
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, on_sigterm)
    ctx = mp.get_context("spawn")
    children: list[Child] = []
    raw: dict[str, Any] = {"overhead": {}, "model": {}}
    overhead: list[dict[str, Any]] = []
    model: list[dict[str, Any]] = []
    try:
        for n in args.nodes:
            log(f"{n} nodes, no model, tracker on/off alternating; load {os.getloadavg()}")
            results = run_nodes(
                ctx, children, n, pushes=args.pushes, workers=args.workers, batch=args.batch,
                propagation=None, alternate=True, log=log,
            )  # fmt: skip
            raw["overhead"][n] = results
            overhead.append(overhead_row(n, results))
            log(table([overhead[-1]]))
        for n in args.model_nodes:
            baseline = next((r["push_on_ms"] for r in overhead if r["nodes"] == n), None)
            if baseline is None:
                log(f"{n} nodes, no model (baseline); load {os.getloadavg()}")
                results = run_nodes(
                    ctx, children, n, pushes=max(6, args.model_pushes // 2), workers=args.workers,
                    batch=args.batch, propagation=None, alternate=False, log=log,
                )  # fmt: skip
                baseline = _median([r["push_ms"] for r in results])
            log(f"{n} nodes, uniform 0-{MODEL_HIGH_MS:g} ms model; load {os.getloadavg()}")
            propagation = {"seed": 1, "delays": [{"uniform": ["0ms", f"{MODEL_HIGH_MS:g}ms"]}]}
            results = run_nodes(
                ctx, children, n, pushes=args.model_pushes, workers=args.workers, batch=args.batch,
                propagation=propagation, alternate=False, log=log,
            )  # fmt: skip
            raw["model"][n] = results
            model.append(model_row(n, results, baseline))
            log(table([model[-1]]))
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        for c in list(children):
            c.close()
    print("convergence and the cost of measuring it (medians; on/off alternate push by push):")
    print(table(overhead))
    if model:
        print(
            f"\nuniform 0-{MODEL_HIGH_MS:g} ms per node: the mean convergence against 200*N/(N+1) + push time "
            "(and the largest delay actually drawn per push):"
        )
        print(table(model))
    if args.json is not None:
        import json

        args.json.write_text(
            json.dumps({"argv": sys.argv, "overhead": overhead, "model": model, "raw": raw}, indent=1, default=str)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

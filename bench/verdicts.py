"""What fault handling adds to the verdict path: quorum, guard and the SQLite write per batch.

A ControlPlane (not started: no sockets, the verdict path only) over N endpoints in clusters of
100 takes verdict batches shaped like a prober's: the full state (every endpoint, as after a
connect) and a round of changes (1% of endpoints flip, under the mass-failure share). Each is
timed `--repeat` times with `controlplane.data_dir` unset (quorum and guard only) and set (plus
one SQLite transaction per batch), and with fault handling bypassed (the path before issue 7a) as
the baseline; the SQLite write alone is timed on the same batches, and the start-up (first
snapshot) with and without restoring N endpoints from the file. Times are CPU milliseconds of the
process (medians), not wall time: the machine is shared and noisy.

    python bench/verdicts.py --endpoints 1000 10000 [--repeat 7]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

from controlplane.app import ControlPlane
from controlplane.health.store import HealthStatus, Verdict
from controlplane.topology.parse import parse_topology

H, U = HealthStatus.HEALTHY, HealthStatus.UNHEALTHY


def topology(n: int, data_dir: str | None) -> dict[str, Any]:
    clusters = []
    for c in range((n + 99) // 100):
        eps = [{"address": f"10.{c // 250}.{c % 250}.{i}", "port": 8080} for i in range(min(100, n - c * 100))]
        clusters.append({"name": f"c{c}", "endpoints": eps})
    cp: dict[str, Any] = {"xds": {"port": 0}, "admin": {"port": 0}, "watch_interval": 0}
    if data_dir is not None:
        cp["data_dir"] = data_dir
    return {"controlplane": cp, "clusters": clusters}


def timed(fn: Callable[[], object]) -> float:
    """CPU milliseconds of this process in `fn` (the machine is shared: wall time mostly measures others)."""
    start = time.process_time()
    fn()
    return (time.process_time() - start) * 1000


def measure(n: int, repeat: int, data_dir: str | None, *, baseline: bool = False) -> dict[str, float]:
    """Batch costs for one setting (data_dir unset: in memory only; baseline: fault handling bypassed)."""
    label = "baseline" if baseline else "memory" if data_dir is None else "sqlite"
    cp = ControlPlane(parse_topology(topology(n, data_dir)))
    if baseline:
        # What submit_verdicts did before issue 7a: every verdict straight to the health store.
        cp.admission.admit = list  # type: ignore[method-assign]
    keys = [(e.cluster, f"{e.address}:{e.port}") for e in cp.snapshot.endpoints]
    full, rounds = [], []
    for r in range(repeat):
        # The whole fleet with a new reason each time: every row is rewritten, as after a connect.
        everyone = [Verdict(c, e, H, f"ok {r}", source="prober:a") for c, e in keys]
        full.append(timed(lambda: cp.submit_verdicts(everyone)))  # noqa: B023 (called at once)
        flips = [Verdict(c, e, U if r % 2 == 0 else H, "http 506", source="prober:a") for c, e in keys[::100]]
        rounds.append(timed(lambda: cp.submit_verdicts(flips)))  # noqa: B023 (called at once)
    out = {f"{label}_full_ms": statistics.median(full), f"{label}_round_ms": statistics.median(rounds)}
    store = cp.admission.store
    if store is not None:
        batch = [Verdict(c, e, H, "ok", source="prober:a") for c, e in keys]
        small = batch[::100]
        out["sqlite_write_full_ms"] = statistics.median(
            timed(lambda: store.save_batch(verdicts=batch, votes=batch)) for _ in range(repeat)
        )
        out["sqlite_write_round_ms"] = statistics.median(
            timed(lambda: store.save_batch(verdicts=small, votes=small)) for _ in range(repeat)
        )
    cp.admission.close()
    return out


def start_ms(n: int, repeat: int, data_dir: str | None) -> float:
    """Constructing the ControlPlane (topology in hand): restore from SQLite and the first snapshot."""
    document = parse_topology(topology(n, data_dir))
    times = []
    for _ in range(repeat):
        t0 = time.process_time()
        cp = ControlPlane(document)
        times.append((time.process_time() - t0) * 1000)
        cp.admission.close()
    return statistics.median(times)


def run(n: int, repeat: int) -> dict[str, Any]:
    out: dict[str, Any] = {"endpoints": n}
    with tempfile.TemporaryDirectory() as tmp:
        out.update(measure(n, repeat, None, baseline=True))
        out.update(measure(n, repeat, None))
        out.update(measure(n, repeat, tmp))
        out["start_without_ms"] = start_ms(n, repeat, None)
        out["start_with_restore_ms"] = start_ms(n, repeat, tmp)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--endpoints", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    columns = [
        "endpoints", "baseline_full_ms", "memory_full_ms", "sqlite_full_ms", "sqlite_write_full_ms",
        "baseline_round_ms", "memory_round_ms", "sqlite_round_ms", "sqlite_write_round_ms",
        "start_without_ms", "start_with_restore_ms",
]  # fmt: skip
    print("| " + " | ".join(columns) + " |")
    print("|" + "---:|" * len(columns))
    for n in args.endpoints:
        row = run(n, args.repeat)
        print("| " + " | ".join(f"{row[c]:.1f}" if isinstance(row[c], float) else str(row[c]) for c in columns) + " |")


if __name__ == "__main__":
    main()

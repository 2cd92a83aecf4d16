"""Every benchmark still runs: each at a toy size, in its own process, as the docs run it.

The figures are not judged here (the machine is shared and noisy; docs/benchmarks.md holds them);
what is checked is that a benchmark starts its servers and clients, measures, and prints its table.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lab.etcd import EtcdNotFound, find_etcd

BENCH = Path(__file__).parent.parent / "bench"

TOY_RUNS: dict[str, tuple[list[str], str | tuple[str, ...]]] = {
    "fanout.py": (
        [
            "--nodes",
            "5",
            "--pushes",
            "2",
            "--warmup",
            "1",
            "--repeat",
            "1",
            "--workers",
            "1",
            "--xds-workers",
            "floor",
            "1",
            "2",
        ],
        ("| 5 | floor |", "| 5 | 2 |"),
    ),
    "relay.py": (["--rounds", "3", "--repeat", "1"], "| 2 | "),
    "prober_load.py": (
        [
            "--endpoints",
            "20",
            "--modes",
            "http-keepalive",
            "tcp",
            "--duration",
            "1",
            "--warmup",
            "0.5",
            "--backends",
            "1",
            # A toy run checks that the benchmark works, not its figures: no waiting for an idle machine.
            "--busy-retries",
            "0",
        ],
        "http-keepalive",
    ),
    "checkers.py": (
        # A toy run measures nothing: no waiting for a quiet machine (--busy-retries 0).
        # Two sizes in one run (--plan), the second with its backends given; then the verdict.
        [
            *("--plan", "20:envoy,prober", "10/1:tcp:prober", "--rounds", "1", "--duration", "1", "--warmup", "0.5"),
            *("--backends", "1", "--busy-retries", "0"),
        ],
        "| 10 | tcp:prober | 1 |",
    ),
    "admin.py": (["--endpoints", "20", "--nodes", "2", "--repeat", "1"], "CSDS 2 nodes"),
    "propagation.py": (
        ["--nodes", "5", "--pushes", "2", "--model-nodes", "5", "--model-pushes", "2", "--workers", "1"],
        "200*N/(N+1)",
    ),
    "replicas.py": (
        ["--nodes", "30", "--overrides", "2", "--workers", "1", "--pause", "0.1", "--envoy-rounds", "1"],
        "| 30 | 3 |",
    ),
    "soak.py": (["--nodes", "5", "--minutes", "0.1", "--workers", "1"], '"refused_streams": 0'),
    "verdicts.py": (["--endpoints", "20", "--repeat", "1"], "| 20 |"),
    "passive.py": (
        ["--record", "100", "--seconds", "1", "--streams", "2", "--replay-rate", "2000", "--rounds", "1"],
        "median passive",
    ),
    "fuzz_xds.py": (["--fuzz-count", "50"], '"findings": []'),
    # Both trees are this one: what is checked is the A B B A order and that each run's table is shown.
    "compare_trees.py": (
        [
            *("--old", str(BENCH.parent), "--new", str(BENCH.parent), "--rounds", "1"),
            *("--", "verdicts.py", "--endpoints", "20", "--repeat", "1"),
        ],
        "## run 4: old",
    ),
    "delta.py": (
        ["--nodes", "4", "--clusters", "20", "--pushes", "1", "--adds", "1", "--workers", "1", "--pause", "0.1"],
        "| one cluster added | bytes written per node |",
    ),
    "prober_shards.py": (
        [
            *("--endpoints", "6", "--probers", "1", "2", "--replicas", "1", "--duration", "0.5"),
            *("--repeat", "1", "--leave", "SIGKILL"),
        ],
        "| SIGKILL |",
    ),
    "grpc_proxyless.py": (
        ["--processes", "1", "--targets", "2", "--envoys", "1", "--envoy-channels", "1", "--rounds", "1"],
        "| 2 proxyless channels",
    ),
}


# Toy runs that start a real etcd (Debian's etcd-server): skipped with the reason without it.
NEEDS_ETCD = {"replicas.py"}


@pytest.mark.parametrize("script", sorted(TOY_RUNS))
def test_benchmark_runs_at_a_toy_size(script: str, tmp_path: Path) -> None:
    args, expected = TOY_RUNS[script]
    if script in NEEDS_ETCD:
        try:
            find_etcd()
        except EtcdNotFound as exc:
            pytest.skip(str(exc))
    done = subprocess.run(
        [sys.executable, str(BENCH / script), *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    for line in (expected,) if isinstance(expected, str) else expected:
        assert line in output, output[-3000:]


def test_no_benchmark_shadows_a_package() -> None:
    # `python bench/X.py` puts bench/ first on sys.path: a bench/prober.py once hid the prober
    # package from every module the benchmarks import.
    packages = {"controlplane", "prober", "lab", "healthplane", "envoy", "xds", "udpa", "validate", "bench"}
    assert not {p.stem for p in BENCH.glob("*.py")} & packages


def test_every_benchmark_has_a_toy_run() -> None:
    scripts = {p.name for p in BENCH.glob("*.py") if 'if __name__ == "__main__":' in p.read_text()}
    assert scripts == set(TOY_RUNS)

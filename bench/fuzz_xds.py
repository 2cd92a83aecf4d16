"""A longer fuzz run of the ADS server than the test's: malformed and mutated DiscoveryRequests.

    python bench/fuzz_xds.py --fuzz-count 100000 [--seed 1] [--concurrency 32] [--delta]

Starts a control plane on ephemeral ports and one well-behaved node, then sends `--fuzz-count`
fuzzed streams (tests/controlplane/xds/xds_fuzz.py), checking after every 500 that the healthy node
still gets and ACKs a push. Prints the status codes returned, per-category counts and any
finding (a status other than OK / INVALID_ARGUMENT / RESOURCE_EXHAUSTED, or one without a
message); exits 1 if there is one. `--delta` fuzzes DeltaAggregatedResources with
DeltaDiscoveryRequests, and the healthy node speaks delta.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import time
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.append(_ROOT)


async def run(count: int, seed: int, concurrency: int, delta: bool = False) -> int:
    import logging

    import grpc

    from controlplane.app import ControlPlane
    from controlplane.snapshots import resources as rs
    from controlplane.topology.parse import parse_topology
    from tests.controlplane.xds.test_xds_fuzz import Flipper, topology
    from tests.controlplane.xds.xds_fuzz import FuzzReport, HealthyNode, fuzz

    logging.getLogger("healthplane.xds").setLevel(logging.ERROR)  # one warning per refused stream otherwise
    cp = ControlPlane(parse_topology(topology(max_message_bytes=1 << 20), source="bench"))
    await cp.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{cp.xds_port}")
    healthy = HealthyNode(channel, delta=delta)
    await healthy.start()
    await healthy.wait_version(cp.snapshot.type_versions[rs.ENDPOINT])
    t0 = time.monotonic()

    def progress(r: FuzzReport) -> None:
        if r.inputs % 5000 < concurrency:
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
            print(f"  {r.inputs} inputs, {time.monotonic() - t0:.0f} s, max RSS {rss} MB, {dict(r.codes)}", flush=True)

    try:
        report = await fuzz(
            channel,
            healthy,
            Flipper(cp),
            count=count,
            seed=seed,
            concurrency=concurrency,
            push_every=500,
            progress=progress,
            delta=delta,
        )
    finally:
        await healthy.aclose()
        await channel.close()
        await cp.aclose(grace=0)
    elapsed = time.monotonic() - t0
    summary = {
        "method": "DeltaAggregatedResources" if delta else "StreamAggregatedResources",
        "inputs": report.inputs,
        "seconds": round(elapsed, 1),
        "codes": dict(report.codes),
        "categories": dict(report.categories),
        "healthy_node_pushes": report.healthy_pushes,
        "streams_left": len(cp.ads.streams),
        "findings": report.findings[:20],
    }
    print(json.dumps(summary, indent=1))
    return 1 if report.findings else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fuzz-count", type=int, default=20_000, help="fuzzed streams to send")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=32, help="fuzzed streams open at a time")
    parser.add_argument("--delta", action="store_true", help="fuzz DeltaAggregatedResources instead")
    args = parser.parse_args()
    return asyncio.run(run(args.fuzz_count, args.seed, args.concurrency, args.delta))


if __name__ == "__main__":
    sys.exit(main())

"""healthplane's prober: actively checks every endpoint and turns the results into verdicts.

state      the threshold state machine (pure): counters in, transitions out
checks     HTTP(S), TCP and gRPC health checks over real sockets
scheduler  when each endpoint is checked next (pure), and the `Prober` that runs it all
events     `ProbeEvent`, the `ProberSink` interface, the JSON-lines event log
shards     which of N processes checks an endpoint (pure)
limits     the open-files limit and the keep-alive pool sized to it
processes  `ShardedProber`: one prober across N worker processes (`--processes N`)
dns        a `--controlplane` name: one link per address it resolves to (prober/dns/)
"""

from __future__ import annotations

from prober.checks import Checker, NetworkChecker
from prober.events import JsonLinesLog, NullSink, ProbeEvent, ProberSink, QueueSink
from prober.processes import ShardedProber
from prober.scheduler import (
    EndpointReport,
    Prober,
    ProberStats,
    TopologyChange,
    first_check_time,
    next_check_time,
    targets,
)
from prober.shards import shard_of
from prober.state import (
    CheckResult,
    Counters,
    EndpointState,
    ResultKind,
    Target,
    Thresholds,
    Transition,
)

__all__ = [
    "CheckResult",
    "Checker",
    "Counters",
    "EndpointReport",
    "EndpointState",
    "JsonLinesLog",
    "NetworkChecker",
    "NullSink",
    "ProbeEvent",
    "Prober",
    "ProberSink",
    "ProberStats",
    "QueueSink",
    "ResultKind",
    "ShardedProber",
    "Target",
    "Thresholds",
    "TopologyChange",
    "Transition",
    "first_check_time",
    "next_check_time",
    "shard_of",
    "targets",
]

"""Is every remote prober still heard? The staleness alarm and the silence gauge.

A prober silent past `controlplane.prober_staleness` raises a `prober_stale` alarm; its verdicts
stay as they were (nothing is guessed). A prober that takes a share (issue 17) raises none once
its share is someone else's (other probers share the endpoints without it) or when it left
cleanly: nothing served depends on it being heard. Pure: the records, the alarms and the clock
come in.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Iterable, Iterator

from prometheus_client.core import GaugeMetricFamily, Metric

from controlplane.health.admission import PROBER_STALE
from controlplane.health.alarms import Alarms
from controlplane.probers.link import ProberRecord, last_heard

__all__ = ["check_probers", "handed_over", "last_heard", "silence_metrics"]


def handed_over(record: ProberRecord, members: Collection[str]) -> bool:
    """A sharing prober that left cleanly, or whose share the live members took over."""
    return record.shards and (record.left or (bool(members) and record.prober_id not in members))


def check_probers(
    records: Iterable[ProberRecord],
    alarms: Alarms,
    limit: float,
    now: float | None = None,
    *,
    members: Collection[str] = (),
) -> None:
    """Raise or resolve the staleness alarm of each remote prober (`members`: the probers sharing the endpoints now)."""
    now = time.time() if now is None else now
    for record in list(records):
        age = now - last_heard(record)
        if handed_over(record, members):
            why = "it left cleanly" if record.left else "its share moved to the probers that remain"
            alarms.resolve(PROBER_STALE, record.prober_id, f"cleared: {why}")
        elif age > limit:
            state = "connected but silent" if record.connected else "disconnected"
            alarms.raise_(
                PROBER_STALE,
                record.prober_id,
                f"prober {record.prober_id} {state}: nothing heard for {age:.0f}s (limit {limit:g}s); "
                "its last verdicts are kept as they were",
                prober=record.prober_id,
            )
        else:
            alarms.resolve(PROBER_STALE, record.prober_id, "cleared: the prober reports again")


def silence_metrics(records: Iterable[ProberRecord]) -> Iterator[Metric]:
    """Seconds since each remote prober was last heard, for /metrics."""
    age = GaugeMetricFamily(
        "healthplane_prober_silence_seconds", "Seconds since each remote prober was last heard.", labels=["prober"]
    )
    now = time.time()
    for record in records:
        age.add_metric([record.prober_id], now - last_heard(record))
    yield age

"""Is every remote prober still heard? The staleness alarm and the silence gauge.

A prober silent past `controlplane.prober_staleness` raises a `prober_stale` alarm; its verdicts
stay as they were (nothing is guessed). Pure: the records, the alarms and the clock come in.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator

from prometheus_client.core import GaugeMetricFamily, Metric

from controlplane.health.admission import PROBER_STALE
from controlplane.health.alarms import Alarms
from controlplane.probers.link import ProberRecord


def last_heard(record: ProberRecord) -> float:
    return max(record.last_message_at or 0.0, record.connected_at)


def check_probers(records: Iterable[ProberRecord], alarms: Alarms, limit: float, now: float | None = None) -> None:
    """Raise or resolve the staleness alarm of each remote prober."""
    now = time.time() if now is None else now
    for record in list(records):
        age = now - last_heard(record)
        if age > limit:
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

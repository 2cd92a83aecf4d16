"""What the admin API shows, as plain data: endpoint rows, snapshot history and diffs, the status page.

Pure and synchronous: every function takes snapshots, health records and check details and
returns JSON-ready values (or text), so they are unit-tested without a server. The aiohttp
handlers (one module per resource) only pick the inputs and serialize the outputs.
"""

from __future__ import annotations

import csv
import html
import io
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any

from controlplane.health.checks import CheckInfo
from controlplane.health.passive import PassiveState
from controlplane.health.store import EndpointHealth, EndpointId, HealthStatus
from controlplane.snapshots import resources as rs
from controlplane.snapshots.snapshot import EndpointView, Snapshot

HealthLookup = Callable[[str, str], EndpointHealth]
CheckLookup = Callable[[str, str], CheckInfo | None]
PassiveLookup = Callable[[str, str], PassiveState | None]
OwnerLookup = Callable[[str, str], tuple[str, ...]]  # the probers that check an endpoint (issue 17)


def passive_row(state: PassiveState, now: float) -> dict[str, Any]:
    """One endpoint's passive checks as `/endpoints` shows them: the consecutive counters across
    every Envoy, who saw the failures of the current run, and the latest ejection and its hold."""
    held = state.ejected and state.ejected_until is not None
    return {
        "successes": state.successes,
        "http_failures": state.http_failures,
        "tcp_failures": state.tcp_failures,
        "timeouts": state.timeouts,
        "seen_by": dict(sorted(state.seen_by.items())),
        "ejected": state.ejected,
        "ejections_in_a_row": state.ejections_in_a_row,
        "ejected_at": state.ejected_at,
        "ejected_until": state.ejected_until,
        "remaining_s": round(max(0.0, (state.ejected_until or now) - now), 3) if held else None,
    }


def endpoint_row(
    view: EndpointView,
    health: EndpointHealth,
    check: CheckInfo | None,
    passive: PassiveState | None = None,
    now: float = 0.0,
    owners: tuple[str, ...] | None = None,
) -> dict[str, Any]:
    """One endpoint as `/endpoints` shows it: the status served, why, since when, and its checks
    (and, for a cluster with `passive`, its passive counters and ejection as of `now`; with
    `owners`, the remote probers that check it: empty unless probers share the endpoints)."""
    row = {
        "cluster": view.cluster,
        "address": view.address,
        "port": view.port,
        "endpoint": f"{view.address}:{view.port}",
        "zone": view.zone,
        "weight": view.weight,
        "status": view.status.name,
        "reason": health.reason,
        "source": health.source,
        "since": health.since or None,
        "override": health.override.status.name if health.override else None,
        "override_by": health.override.source.removeprefix("override:") if health.override else None,
        "check": check.to_json() if check is not None else None,
    }
    if owners is not None:
        row["owners"] = list(owners)
    if passive is not None:
        row["passive"] = passive_row(passive, now)
    return row


# nginx check_status's two words: "up" where Envoy sends traffic (UNKNOWN and DEGRADED hosts
# too), "down" where it does not. Operators of nginx filter and read these.
UP = frozenset({HealthStatus.HEALTHY, HealthStatus.UNKNOWN, HealthStatus.DEGRADED})
DOWN = frozenset({HealthStatus.UNHEALTHY, HealthStatus.DRAINING, HealthStatus.TIMEOUT})


def up_or_down(status: HealthStatus) -> str:
    """`status` in nginx check_status's words: "up" or "down"."""
    return "up" if status in UP else "down"


def parse_status_filter(text: str | None) -> frozenset[HealthStatus] | None:
    """`?status=` as the statuses it selects: a HealthStatus name, or nginx's up or down (any case).

    None selects every status; ValueError names both vocabularies.
    """
    if text is None or text == "":
        return None
    word = text.strip().lower()
    if word in ("up", "down"):
        return UP if word == "up" else DOWN
    try:
        return frozenset({HealthStatus.parse(text)})
    except ValueError as exc:
        raise ValueError(f"{exc}, or up or down") from None


def endpoint_rows(
    snapshot: Snapshot,
    health: HealthLookup,
    check: CheckLookup,
    *,
    cluster: str | None = None,
    status: Collection[HealthStatus] | None = None,
    passive: PassiveLookup | None = None,
    now: float | None = None,
    owners: OwnerLookup | None = None,
) -> list[dict[str, Any]]:
    """Every endpoint of `snapshot` in topology order, filtered by cluster and served status; rows
    of clusters with `passive` carry their passive state (`passive`, timed from `now`), and with
    `owners` every row names the probers that check it."""
    now = time.time() if now is None else now
    rows = []
    for v in snapshot.endpoints:
        if (cluster is None or v.cluster == cluster) and (status is None or v.status in status):
            key = f"{v.address}:{v.port}"
            state = passive(v.cluster, key) if passive is not None else None
            who = owners(v.cluster, key) if owners is not None else None
            rows.append(endpoint_row(v, health(v.cluster, key), check(v.cluster, key), state, now, who))
    return rows


# --------------------------------------------------------------------------- snapshots


def status_counts(endpoints: Iterable[EndpointView]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for ep in endpoints:
        counts[ep.status.name] = counts.get(ep.status.name, 0) + 1
    return dict(sorted(counts.items()))


def snapshot_summary(snapshot: Snapshot) -> dict[str, Any]:
    """One line of history: the version, why it exists and when, and what it serves."""
    cause = snapshot.cause
    return {
        "version": snapshot.version,
        "created": snapshot.created,
        "cause": {"kind": cause.kind, "detail": cause.detail, "time": cause.time},
        "type_versions": {rs.SHORT_NAMES[t]: v for t, v in snapshot.type_versions.items()},
        "endpoints": status_counts(snapshot.endpoints),
    }


def snapshot_detail(snapshot: Snapshot) -> dict[str, Any]:
    """A whole snapshot: its summary, every endpoint as served, and every resource's version."""
    clusters: dict[str, list[dict[str, Any]]] = {c.name: [] for c in snapshot.topology.clusters}
    for ep in snapshot.endpoints:
        clusters[ep.cluster].append(
            {"address": ep.address, "port": ep.port, "zone": ep.zone, "weight": ep.weight, "status": ep.status.name}
        )
    return {
        **snapshot_summary(snapshot),
        "clusters": [
            {"name": name, "version": snapshot.resources[rs.ENDPOINT][name].version, "endpoints": eps}
            for name, eps in clusters.items()
        ],
        "resources": {
            rs.SHORT_NAMES[t]: {name: r.version for name, r in table.items()} for t, table in snapshot.resources.items()
        },
    }


def _endpoint_map(snapshot: Snapshot) -> dict[EndpointId, EndpointView]:
    return {(e.cluster, f"{e.address}:{e.port}"): e for e in snapshot.endpoints}


def snapshot_diff(old: Snapshot, new: Snapshot) -> dict[str, Any]:
    """What changed from `old` to `new`: endpoints added, removed and moved, and resources by type."""
    before, after = _endpoint_map(old), _endpoint_map(new)

    def ep(key: EndpointId, view: EndpointView) -> dict[str, Any]:
        return {"cluster": key[0], "endpoint": key[1], "status": view.status.name}

    changed = [
        {"cluster": k[0], "endpoint": k[1], "from": before[k].status.name, "to": v.status.name}
        for k, v in after.items()
        if k in before and before[k].status is not v.status
    ]
    resources: dict[str, dict[str, list[str]]] = {}
    for type_url in rs.ADS_ORDER:
        a, b = old.resources.get(type_url, {}), new.resources.get(type_url, {})
        entry = {
            "added": sorted(set(b) - set(a)),
            "removed": sorted(set(a) - set(b)),
            "changed": sorted(n for n in set(a) & set(b) if a[n].version != b[n].version),
        }
        if any(entry.values()):
            resources[rs.SHORT_NAMES[type_url]] = entry
    return {
        "from": {"version": old.version, "created": old.created},
        "to": {"version": new.version, "created": new.created},
        "endpoints": {
            "added": [ep(k, v) for k, v in after.items() if k not in before],
            "removed": [ep(k, v) for k, v in before.items() if k not in after],
            "status_changed": changed,
        },
        "resources": resources,
    }


# --------------------------------------------------------------------------- status page

STATUS_COLUMNS = (
    "index",
    "cluster",
    "endpoint",
    "status",
    "rise",
    "fall",
    "check_type",
    "last_result",
    "last_check",
    "latency_ms",
    "override",
)

_UP = {HealthStatus.HEALTHY.name: "up", HealthStatus.UNHEALTHY.name: "down"}


def status_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`/endpoints` rows flattened to the status page's columns (nginx check_status, plus ours)."""
    out = []
    for i, row in enumerate(rows):
        check = row["check"] or {}
        counters = check.get("counters") or {}
        last = check.get("last_check") or {}
        out.append(
            {
                "index": i,
                "cluster": row["cluster"],
                "endpoint": row["endpoint"],
                "status": row["status"],
                "rise": counters.get("successes", 0),
                "fall": max(
                    (counters.get(k, 0) for k in ("http_failures", "tcp_failures", "timeouts")),
                    default=0,
                ),
                "check_type": check.get("check_type", "none"),
                "last_result": last.get("result") or "",
                "last_check": last.get("time"),
                "latency_ms": last.get("latency_ms"),
                "override": row["override"] or "",
                "reason": row["reason"],
            }
        )
        if "passive" in row:
            out[-1]["passive"] = row["passive"]
    return out


def status_json(rows: list[dict[str, Any]], generation: str) -> dict[str, Any]:
    """The nginx check_status JSON shape (`servers.server[]`, `status` "up" or "down"), with
    healthplane's extra fields (`health`: the HealthStatus name)."""
    return {
        "servers": {
            "total": len(rows),
            "generation": generation,
            "server": [
                {
                    **r,
                    "upstream": r["cluster"],
                    "name": r["endpoint"],
                    "status": up_or_down(HealthStatus[r["status"]]),
                    "health": r["status"],
                    "up": _UP.get(r["status"], r["status"].lower()),
                    "type": r["check_type"],
                }
                for r in rows
            ],
        }
    }


def status_csv(rows: list[dict[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(STATUS_COLUMNS)
    for r in rows:
        writer.writerow(["" if r[c] is None else r[c] for c in STATUS_COLUMNS])
    return out.getvalue()


def _ago(t: float | None, now: float) -> str:
    if t is None:
        return "-"
    age = max(now - t, 0.0)
    return f"{age:.1f}s ago" if age < 120 else f"{age / 60:.0f}m ago"


def status_html(rows: list[dict[str, Any]], *, version: str, refresh: int, now: float | None = None) -> str:
    """The status page: one row per endpoint, refreshing itself every `refresh` seconds (0: never)."""
    now = time.time() if now is None else now
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "no endpoints"
    e = html.escape
    body = []
    for r in rows:
        body.append(
            f'<tr class="{e(r["status"].lower())}" data-cluster="{e(r["cluster"])}" '
            f'data-endpoint="{e(r["endpoint"])}" data-status="{e(r["status"])}">'
            f"<td>{r['index']}</td><td>{e(r['cluster'])}</td><td>{e(r['endpoint'])}</td>"
            f'<td class="status">{e(r["status"])}</td><td>{r["rise"]}</td><td>{r["fall"]}</td>'
            f'<td>{e(r["check_type"])}</td><td title="{e(r["reason"])}">{e(r["last_result"] or "-")}</td>'
            f"<td>{_ago(r['last_check'], now)}</td>"
            f"<td>{'-' if r['latency_ms'] is None else r['latency_ms']}</td><td>{e(r['override'] or '-')}</td></tr>"
        )
    meta = f'<meta http-equiv="refresh" content="{refresh}">' if refresh > 0 else ""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">{meta}
<title>healthplane status</title>
<style>
body {{ font-family: sans-serif; margin: 1em; }}
table {{ border-collapse: collapse; }}
th, td {{ border: 1px solid #999; padding: 2px 8px; text-align: left; }}
th {{ background: #ddd; }}
tr.healthy td.status {{ background: #bfb; }}
tr.unhealthy td.status {{ background: #fbb; }}
tr.draining td.status, tr.degraded td.status {{ background: #ffb; }}
</style></head>
<body>
<h1>healthplane status</h1>
<p id="summary">Version <span id="version">{e(version)}</span>: {len(rows)} endpoints ({e(summary)}).
{"Refreshing every " + str(refresh) + " s." if refresh > 0 else ""}</p>
<table id="endpoints">
<thead><tr><th>Index</th><th>Cluster</th><th>Endpoint</th><th>Status</th><th>Rise counts</th>
<th>Fall counts</th><th>Check type</th><th>Last result</th><th>Last check</th><th>Latency (ms)</th>
<th>Override</th></tr></thead>
<tbody>
{chr(10).join(body)}
</tbody></table>
</body></html>
"""


def type_short(type_url: str) -> str:
    return rs.SHORT_NAMES.get(type_url, type_url)


def counts_by_cluster(rows: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for r in rows:
        c = out.setdefault(r["cluster"], {})
        c[r["status"]] = c.get(r["status"], 0) + 1
    return out

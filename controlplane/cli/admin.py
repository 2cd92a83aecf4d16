"""`healthplane status | endpoints | nodes | override`: the fleet at a glance, from the admin API.

The commands talk to a running control plane's admin API over HTTP (stdlib urllib, no event
loop) and print tables. The table functions are pure: JSON in, text out.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from typing import Any

from controlplane.errors import AdminError

DEFAULT_ADMIN = "http://127.0.0.1:19000"
ADMIN_ENV = "HEALTHPLANE_ADMIN"
TOKEN_ENV = "HEALTHPLANE_ADMIN_TOKEN"
STATUS_COLUMNS = ("HEALTHY", "UNHEALTHY", "DRAINING", "DEGRADED", "UNKNOWN")


class AdminClient:
    def __init__(self, base: str, token: str = "", timeout: float = 10.0) -> None:
        self.base = base.rstrip("/")
        self.token = token
        self.timeout = timeout

    def call(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base + path, data=data, method=method)
        request.add_header("Accept", "application/json")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        request.add_header("X-Healthplane-Who", f"cli:{os.environ.get('USER', 'unknown')}")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            try:
                problem = json.loads(exc.read())
            except ValueError:
                problem = {"error": exc.reason}
            field = f" ({problem['field']})" if problem.get("field") else ""
            raise AdminError(f"{method} {path}: {exc.code} {problem.get('error', exc.reason)}{field}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise AdminError(f"cannot reach the admin API at {self.base}: {reason}") from None

    def get(self, path: str) -> Any:
        return self.call("GET", path)


# --------------------------------------------------------------------------- tables


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain text table, columns as wide as their widest cell."""
    cells = [[str(h) for h in headers]] + [["-" if c is None or c == "" else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells)


def _ago(t: float | None, now: float) -> str:
    if not t:
        return "-"
    age = max(now - float(t), 0.0)
    if age < 120:
        return f"{age:.0f}s"
    if age < 7200:
        return f"{age / 60:.0f}m"
    return f"{age / 3600:.0f}h"


def _lag(node: dict[str, Any]) -> str:
    lag = node.get("lag")  # filled in by the propagation work (issue 5) when present
    if lag is None:
        return "-"
    if isinstance(lag, int | float):
        return f"{lag:.3f}s"
    if isinstance(lag, dict):
        seconds = lag.get("seconds", lag.get("lag_s"))
        if seconds is None and isinstance(lag.get("behind_ms"), int | float):  # as GET /nodes gives it
            seconds = lag["behind_ms"] / 1000
        versions = lag.get("versions", lag.get("versions_behind"))
        parts = [f"{seconds:.3f}s" if isinstance(seconds, int | float) else "", f"{versions}v" if versions else ""]
        return " ".join(p for p in parts if p) or json.dumps(lag, separators=(",", ":"))
    return str(lag)


def _last_nack(node: dict[str, Any]) -> str:
    nacks = [(short, t["last_nack"]) for short, t in node.get("types", {}).items() if t.get("last_nack")]
    if not nacks:
        return "-"
    short, nack = max(nacks, key=lambda n: n[1].get("time") or 0)
    return f"{short} {nack['version']}: {nack['error'][:60]}"


def clusters_table(endpoints: Sequence[dict[str, Any]]) -> str:
    counts: dict[str, dict[str, int]] = {}
    for e in endpoints:
        c = counts.setdefault(e["cluster"], {})
        c[e["status"]] = c.get(e["status"], 0) + 1
    rows = []
    for cluster, c in counts.items():
        other = sum(n for s, n in c.items() if s not in STATUS_COLUMNS)
        rows.append([cluster, sum(c.values()), *(c.get(s, 0) for s in STATUS_COLUMNS), other])
    return table(["CLUSTER", "ENDPOINTS", *STATUS_COLUMNS, "OTHER"], rows)


def nodes_table(nodes: Sequence[dict[str, Any]], current: str) -> str:
    # XDS (which ADS protocol each node speaks) comes last, and only from a server that says it:
    # the columns before it keep their places for scripts that read them.
    protocols = any("protocol" in n for n in nodes)
    # With proxyless gRPC clients among the nodes, a USER AGENT column tells them from Envoys
    # (and says which gRPC); an all-Envoy fleet keeps the narrower table.
    mixed = any(not (n.get("user_agent") or "envoy").startswith("envoy") for n in nodes)
    rows = [
        [
            n["id"],
            n.get("cluster"),
            n.get("peer"),
            *([(n.get("user_agent") or "-")[:40]] if mixed else []),
            "yes" if n.get("up_to_date") else "no",
            ",".join(f"{s}={t.get('version_acked') or '-'}" for s, t in n.get("types", {}).items()),
            _lag(n),
            _last_nack(n),
            *([n.get("protocol")] if protocols else []),
        ]
        for n in nodes
    ]
    agent = ["USER AGENT"] if mixed else []
    headers = ["NODE", "CLUSTER", "PEER", *agent, "UP-TO-DATE", f"ACKED (current {current})", "LAG", "LAST NACK"]
    return table(headers + (["XDS"] if protocols else []), rows)


def endpoints_table(endpoints: Sequence[dict[str, Any]], now: float) -> str:
    rows = []
    for e in endpoints:
        check = e.get("check") or {}
        counters = check.get("counters") or {}
        last = check.get("last_check") or {}
        rows.append(
            [
                e["cluster"],
                e["endpoint"],
                e["status"],
                e.get("override"),
                _ago(e.get("since"), now),
                f"{counters.get('successes', 0)}/{check['rise']}" if check else None,
                f"{max(counters.get(k, 0) for k in ('http_failures', 'tcp_failures', 'timeouts'))}/{check['fall']}"
                if check
                else None,
                check.get("check_type"),
                last.get("latency_ms"),
                (e.get("reason") or "")[:50],
            ]
        )
    return table(
        ["CLUSTER", "ENDPOINT", "STATUS", "OVERRIDE", "SINCE", "RISE", "FALL", "CHECK", "LAT(ms)", "REASON"], rows
    )


def events_table(events: Sequence[dict[str, Any]]) -> str:
    rows = [[time.strftime("%H:%M:%S", time.localtime(e["time"])), e["kind"], e["message"][:100]] for e in events]
    return table(["TIME", "KIND", "EVENT"], rows)


def alarms_table(alarms: Sequence[dict[str, Any]], now: float) -> str:
    rows = [
        [
            a["id"],
            a["kind"],
            a["subject"],
            f"{_ago(a['raised_at'], now)} ago",
            "active" if a["active"] else a["resolution"],
            a["message"][:90],
        ]
        for a in alarms
    ]
    return table(["ID", "KIND", "SUBJECT", "RAISED", "STATE", "MESSAGE"], rows)


def status_text(
    snapshot: dict[str, Any], endpoints: Any, nodes: Any, events: Any, now: float, alarms: Any = None
) -> str:
    cause = snapshot["cause"]
    head = (
        f"healthplane version {snapshot['version']} ({cause['kind']}: {cause['detail'][:80]}, "
        f"{_ago(snapshot['created'], now)} ago)"
    )
    probers = snapshot.get("probers") or {}
    if probers and not probers.get("connected"):
        head += f"\n{probers.get('note')}"
    active = (alarms or {}).get("active") or []
    parts = [
        head,
        *(
            [
                "ALARMS (healthplane alarms; accept a held mass failure: healthplane accept ID):\n"
                + alarms_table(active, now)
            ]
            if active
            else []
        ),
        clusters_table(endpoints["endpoints"]),
        nodes_table(nodes["nodes"], snapshot["version"]) if nodes["nodes"] else "no nodes connected",
        "recent events:\n" + events_table(events["events"]) if events["events"] else "no events",
    ]
    return "\n\n".join(parts) + "\n"


# --------------------------------------------------------------------------- commands


def _client(args: argparse.Namespace) -> AdminClient:
    return AdminClient(args.admin, args.token)


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=1))


def cmd_status(args: argparse.Namespace) -> int:
    client = _client(args)
    snapshot = client.get("/snapshot")
    endpoints = client.get("/endpoints")
    nodes = client.get("/nodes")
    events = client.get(f"/events?limit={args.events}")
    alarms = client.get("/alarms")
    if args.json:
        _print_json({"snapshot": snapshot, "endpoints": endpoints, "nodes": nodes, "events": events, "alarms": alarms})
    else:
        print(status_text(snapshot, endpoints, nodes, events, time.time(), alarms), end="")
    return 0


def cmd_alarms(args: argparse.Namespace) -> int:
    body = _client(args).get("/alarms")
    shown = body["alarms"] if args.all else body["active"]
    if args.json:
        _print_json(body)
    elif shown:
        print(alarms_table(shown, time.time()))
    else:
        print("no active alarms" + ("" if args.all else " (--all shows the resolved ones)"))
    return 0


def cmd_accept(args: argparse.Namespace) -> int:
    body = _client(args).call("POST", f"/alarms/{urllib.parse.quote(args.alarm, safe='')}/accept", {})
    if args.json:
        _print_json(body)
    else:
        alarm = body["alarm"]
        changed = "new version" if body["changed"] else "unchanged, version"
        what = f"alarm {alarm['id']} ({alarm['kind']} {alarm['subject']})"
        print(f"{what} {alarm['resolution']}; {changed} {body['version']}")
    return 0


def cmd_forget_prober(args: argparse.Namespace) -> int:
    body = _client(args).call("DELETE", f"/probers/{urllib.parse.quote(args.prober, safe='')}")
    if args.json:
        _print_json(body)
    else:
        changed = "new version" if body["changed"] else "unchanged, version"
        print(f"prober {body['forgotten']} forgotten; {changed} {body['version']}")
    return 0


def cmd_endpoints(args: argparse.Namespace) -> int:
    query = urllib.parse.urlencode({k: v for k, v in (("cluster", args.cluster), ("status", args.status)) if v})
    body = _client(args).get("/endpoints" + (f"?{query}" if query else ""))
    if args.json:
        _print_json(body)
    else:
        print(endpoints_table(body["endpoints"], time.time()))
    return 0


def cmd_nodes(args: argparse.Namespace) -> int:
    body = _client(args).get("/nodes")
    if args.json:
        _print_json(body)
    elif body["nodes"]:
        print(nodes_table(body["nodes"], body["version"]))
    else:
        print("no nodes connected")
    return 0


def cmd_override(args: argparse.Namespace) -> int:
    cluster = urllib.parse.quote(args.cluster, safe="")
    endpoint = urllib.parse.quote(args.endpoint, safe=":[]")
    body = _client(args).call("POST", f"/endpoints/{cluster}/{endpoint}/override", {"status": args.status})
    if args.json:
        _print_json(body)
    else:
        pinned = f"pinned {body['override']}" if body["override"] else "no override (auto)"
        changed = "new version" if body["changed"] else "unchanged, version"
        print(f"{body['cluster']} {body['endpoint']}: {body['status']}, {pinned}; {changed} {body['version']}")
    return 0


def admin_arguments() -> argparse.ArgumentParser:
    """`--admin URL` and `--token T`, for every command that talks to the admin API (a parent parser)."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(
        "--admin",
        default=os.environ.get(ADMIN_ENV, DEFAULT_ADMIN),
        help=f"admin API base URL (default ${ADMIN_ENV} or {DEFAULT_ADMIN})",
    )
    parent.add_argument("--token", default=os.environ.get(TOKEN_ENV, ""), help=f"bearer token (default ${TOKEN_ENV})")
    return parent


def add_admin_commands(sub: Any) -> None:
    common = argparse.ArgumentParser(add_help=False, parents=[admin_arguments()])
    common.add_argument("--json", action="store_true", help="print the admin API's JSON instead of a table")

    p = sub.add_parser("status", parents=[common], help="the fleet at a glance: clusters, nodes, recent events")
    p.add_argument("--events", type=int, default=10, help="how many recent events (default 10)")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("endpoints", parents=[common], help="every endpoint with its status, counters, last check")
    p.add_argument("--cluster", help="only this cluster")
    p.add_argument("--status", help="only this status (healthy, unhealthy, ...)")
    p.set_defaults(func=cmd_endpoints)

    p = sub.add_parser(
        "nodes",
        parents=[common],
        help="connected nodes (Envoys, gRPC clients): versions ACKed, lag, last NACK",
    )
    p.set_defaults(func=cmd_nodes)

    p = sub.add_parser("alarms", parents=[common], help="active alarms: stale probers, held mass failures")
    p.add_argument("--all", action="store_true", help="the recently resolved ones too")
    p.set_defaults(func=cmd_alarms)

    p = sub.add_parser("accept", parents=[common], help="apply the failures an active mass_failure alarm held")
    p.add_argument("alarm", metavar="ALARM_ID")
    p.set_defaults(func=cmd_accept)

    p = sub.add_parser("forget-prober", parents=[common], help="forget a disconnected prober for good")
    p.add_argument("prober", metavar="PROBER_ID")
    p.set_defaults(func=cmd_forget_prober)

    p = sub.add_parser("override", parents=[common], help="pin an endpoint's status (auto clears the pin)")
    p.add_argument("cluster")
    p.add_argument("endpoint", metavar="ADDRESS:PORT")
    p.add_argument("status", help="HEALTHY, UNHEALTHY, DRAINING, DEGRADED or auto")
    p.set_defaults(func=cmd_override)

"""`healthplane propagation report`: the propagation chart of the last versions, as a file."""

from __future__ import annotations

import argparse
import time
import urllib.parse
from typing import Any

from controlplane.cli.admin import AdminClient, admin_arguments


def cmd_report(args: argparse.Namespace) -> int:
    """Fetch the last versions' per-node detail from the admin API and write the HTML chart."""
    from controlplane.observe.chart import report_html

    client = AdminClient(args.admin, args.token)
    listing = client.get(f"/versions?limit={args.versions}")
    details = [client.get("/versions/" + urllib.parse.quote(v["version"], safe="")) for v in listing["versions"]]
    page = report_html(details, title=f"healthplane propagation at {args.admin}", now=time.time())
    with open(args.out, "w", encoding="utf-8") as f:
        f.write(page)
    print(f"{args.out}: {len(details)} versions")
    return 0


def add_propagation_commands(sub: Any) -> None:
    p = sub.add_parser("propagation", help="propagation of versions to nodes, from the admin API")
    commands = p.add_subparsers(dest="propagation_command", required=True)
    r = commands.add_parser(
        "report", parents=[admin_arguments()], help="write an HTML page charting the last versions' propagation"
    )
    r.add_argument("--versions", type=int, default=10, help="how many of the last versions (default 10)")
    r.add_argument("--out", "-o", default="propagation.html", help="the HTML file to write")
    r.set_defaults(func=cmd_report)

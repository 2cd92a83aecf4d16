"""The propagation picture: an HTML page with inline SVG, drawn from the admin API's version details.

Two charts, newest versions last:
- convergence: per version, the share of its nodes that have ACKed against the time since its
  cause (a step line that reaches 100% when the fleet agrees);
- timeline: per node (a row), which version it has ACKed over time, one colour per version,
  with each version's cause marked; a NACK is a red cross.

Pure: JSON (as `GET /versions/{version}` answers it) in, text out, so `GET /propagation` and
`healthplane propagation report` draw the same page.
"""

from __future__ import annotations

import html
import math
import re
import time
from collections.abc import Sequence
from typing import Any

PALETTE = (
    "#4e79a7", "#f28e2b", "#59a14f", "#b07aa1", "#76b7b2", "#edc948", "#9c755f", "#ff9da7", "#bab0ac", "#e15759",
)  # fmt: skip
MAX_ROWS = 60  # node rows drawn in the timeline; larger fleets are sampled evenly
WIDTH = 900


def _esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def _short(version: str) -> str:
    """`EPOCH.SEQ` as `SEQ`: the epoch is the same for every version of one control plane."""
    return version.rsplit(".", 1)[-1]


def _natural(name: str) -> list[Any]:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def colours(versions: Sequence[dict[str, Any]]) -> dict[str, str]:
    """One colour per version that reached nodes, in cause order, shared by both charts."""
    drawn = sorted((v for v in versions if v.get("nodes")), key=lambda v: v["cause"]["time"])
    return {v["version"]: PALETTE[i % len(PALETTE)] for i, v in enumerate(drawn)}


def _nice_max(value: float) -> float:
    if value <= 0:
        return 1.0
    exp = 10.0 ** math.floor(math.log10(value))
    for m in (1, 2, 2.5, 5, 10):
        if value <= m * exp:
            return m * exp
    return 10 * exp


def _axis(x0: float, x1: float, y: float, top: float, span: float, unit: str) -> list[str]:
    out = [f'<line x1="{x0}" y1="{y}" x2="{x1}" y2="{y}" stroke="#333"/>']
    for i in range(6):
        v = span * i / 5
        x = x0 + (x1 - x0) * i / 5
        out.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{y}" stroke="#eee"/>')
        out.append(f'<text x="{x:.1f}" y="{y + 14}" text-anchor="middle">{v:g}{unit}</text>')
    return out


def convergence_svg(versions: Sequence[dict[str, Any]], colour: dict[str, str] | None = None) -> str:
    """Share of nodes ACKed against ms since the cause, one step line per version."""
    colour = colour or colours(versions)
    drawn = sorted((v for v in versions if v["version"] in colour), key=lambda v: v["cause"]["time"])
    left, right, top, bottom = 50, WIDTH - 230, 20, 260
    longest = max(
        (n["ack_ms"] for v in drawn for n in v["per_node"] if n.get("ack_ms") is not None),
        default=0.0,
    )
    span = _nice_max(longest)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{bottom + 40}" font-size="11" '
        'font-family="sans-serif" role="img" aria-label="convergence per version">',
        *_axis(left, right, bottom, top, span, " ms"),
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{bottom}" stroke="#333"/>',
    ]
    for pct in (0, 50, 100):
        y = bottom - (bottom - top) * pct / 100
        parts.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{pct}%</text>')
    if not drawn:
        parts.append(f'<text x="{left + 20}" y="{(top + bottom) / 2}">no version reached any node yet</text>')
    for i, v in enumerate(drawn):
        stroke = colour[v["version"]]
        acks = sorted(n["ack_ms"] for n in v["per_node"] if n.get("ack_ms") is not None)
        total = v["nodes"]
        points = [(left, bottom)]
        for k, ms in enumerate(acks, 1):
            x = left + (right - left) * ms / span
            points.append((x, points[-1][1]))
            points.append((x, bottom - (bottom - top) * k / total))
        path = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
        label = f"{_short(v['version'])} {v['cause']['kind']}"
        conv = v.get("convergence_ms")
        label += f": {conv:g} ms" if conv is not None else f": {v.get('acked', 0)}/{total} ACKed"
        parts.append(f'<polyline fill="none" stroke="{stroke}" stroke-width="2" points="{path}"><title>')
        parts.append(f"{_esc(v['version'])}: {_esc(label)}</title></polyline>")
        ly = top + 14 * i + 4
        parts.append(f'<rect x="{right + 12}" y="{ly - 8}" width="10" height="10" fill="{stroke}"/>')
        parts.append(f'<text x="{right + 26}" y="{ly + 1}">{_esc(label)}</text>')
    parts.append(f'<text x="{(left + right) / 2}" y="{bottom + 30}" text-anchor="middle">ms since the cause</text>')
    parts.append("</svg>")
    return "".join(parts)


def timeline_svg(versions: Sequence[dict[str, Any]], colour: dict[str, str] | None = None) -> str:
    """Per node, the version it has ACKed over wall time; causes marked, NACKs as red crosses."""
    colour = colour or colours(versions)
    ordered = sorted((v for v in versions if v["version"] in colour), key=lambda v: v["cause"]["time"])
    nodes = sorted({n["node"] for v in ordered for n in v["per_node"]}, key=_natural)
    sampled = len(nodes) > MAX_ROWS
    if sampled:
        nodes = [nodes[round(i * (len(nodes) - 1) / (MAX_ROWS - 1))] for i in range(MAX_ROWS)]
    row = 12 if len(nodes) > 30 else 18
    left, right, top = 130, WIDTH - 20, 34
    bottom = top + row * max(1, len(nodes))
    if not ordered:
        return (
            '<svg xmlns="http://www.w3.org/2000/svg" width="400" height="30">'
            '<text y="20">no version reached any node yet</text></svg>'
        )
    t0 = float(ordered[0]["cause"]["time"])
    ends = [
        float(v["cause"]["time"]) + (n.get("ack_ms") or n.get("nack_ms") or 0) / 1000
        for v in ordered
        for n in v["per_node"]
    ]
    span = _nice_max(max([*ends, t0]) * 1000 - t0 * 1000 + 1)

    def x_of(t: float) -> float:
        return left + (right - left) * (t - t0) * 1000 / span

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{bottom + 40}" font-size="10" '
        'font-family="sans-serif" role="img" aria-label="each node\'s version over time">',
        *_axis(left, right, bottom, top, span, " ms"),
    ]
    for v in ordered:
        x = x_of(v["cause"]["time"])
        parts.append(
            f'<line x1="{x:.1f}" y1="{top - 8}" x2="{x:.1f}" y2="{bottom}" stroke="{colour[v["version"]]}" '
            f'stroke-dasharray="3,3"><title>{_esc(v["version"])}: {_esc(v["cause"]["detail"])}</title></line>'
        )
        parts.append(f'<text x="{x:.1f}" y="{top - 10}" text-anchor="middle">{_esc(_short(v["version"]))}</text>')
    for r, node in enumerate(nodes):
        y = top + r * row
        parts.append(f'<text x="{left - 6}" y="{y + row * 0.7:.1f}" text-anchor="end">{_esc(node[:22])}</text>')
        acks: list[tuple[float, str]] = []
        for v in ordered:
            for n in v["per_node"]:
                if n["node"] != node:
                    continue
                if n.get("ack_ms") is not None:
                    acks.append((v["cause"]["time"] + n["ack_ms"] / 1000, v["version"]))
                elif n.get("nack_ms") is not None:
                    cx, cy = x_of(v["cause"]["time"] + n["nack_ms"] / 1000), y + row / 2
                    parts.append(
                        f'<path d="M{cx - 4:.1f},{cy - 4:.1f}L{cx + 4:.1f},{cy + 4:.1f}M{cx - 4:.1f},{cy + 4:.1f}'
                        f'L{cx + 4:.1f},{cy - 4:.1f}" stroke="#d00" stroke-width="2"><title>NACK of '
                        f"{_esc(v['version'])}: {_esc(n.get('error') or '')}</title></path>"
                    )
        acks.sort()
        for k, (t, version) in enumerate(acks):
            end = acks[k + 1][0] if k + 1 < len(acks) else t0 + span / 1000
            parts.append(
                f'<rect x="{x_of(t):.1f}" y="{y + 1}" width="{max(1.0, x_of(end) - x_of(t)):.1f}" '
                f'height="{row - 2}" fill="{colour[version]}"><title>{_esc(node)} has {_esc(version)} '
                f"from +{(t - t0) * 1000:.1f} ms</title></rect>"
            )
    note = f" ({len(nodes)} of the nodes, sampled evenly)" if sampled else ""
    parts.append(
        f'<text x="{(left + right) / 2}" y="{bottom + 30}" text-anchor="middle">ms since the first cause{note}</text>'
    )
    parts.append("</svg>")
    return "".join(parts)


def _cell(value: Any) -> str:
    return "" if value is None else _esc(value)


def report_html(
    versions: Sequence[dict[str, Any]], *, title: str = "healthplane propagation", now: float = 0.0, refresh: int = 0
) -> str:
    """The whole page: both charts and a table of the versions, oldest first (reloading every `refresh` s)."""
    ordered = sorted(versions, key=lambda v: v["cause"]["time"])
    rows = "".join(
        "<tr>"
        + "".join(
            f"<td>{_cell(x)}</td>"
            for x in (
                v["version"],
                v["cause"]["kind"],
                v["cause"]["detail"],
                v["nodes"],
                v["acked"],
                v["nacked"],
                v["pending"],
                v["convergence_ms"],
                v["delay_p50_ms"],
                v["delay_p99_ms"],
                ", ".join(v.get("not_acked", [])[:10]),
            )
        )
        + "</tr>"
        for v in ordered
    )
    palette = colours(ordered)
    reload = f'<meta http-equiv="refresh" content="{refresh}">' if refresh > 0 else ""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(now or time.time()))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{_esc(title)}</title>{reload}
<style>body{{font-family:sans-serif;margin:1.5em}}table{{border-collapse:collapse;font-size:12px}}
td,th{{border:1px solid #ccc;padding:2px 6px;text-align:left}}h2{{font-size:15px;margin-top:1.5em}}</style>
</head><body>
<h1>{_esc(title)}</h1>
<p>{len(ordered)} versions, drawn {stamp}. Propagation is measured at each node's ACK, from the time of
the version's cause (a verdict, an override, a topology edit).</p>
<h2>Convergence: share of each version's nodes that have ACKed it</h2>
{convergence_svg(ordered, palette)}
<h2>Each node's version over time</h2>
{timeline_svg(ordered, palette)}
<h2>Versions</h2>
<table><tr><th>version</th><th>cause</th><th>detail</th><th>nodes</th><th>ACKed</th><th>NACKed</th>
<th>pending</th><th>convergence ms</th><th>p50 ms</th><th>p99 ms</th><th>not ACKed</th></tr>
{rows}</table>
</body></html>
"""

"""The propagation page: JSON as GET /versions/{version} answers it in, HTML with inline SVG out."""

from __future__ import annotations

from typing import Any

from controlplane.observe.chart import MAX_ROWS, colours, report_html


def version(seq: int, at: float, nodes: dict[str, tuple[float | None, float | None]]) -> dict[str, Any]:
    per_node = [
        {"node": n, "status": "acked" if a is not None else "nacked", "ack_ms": a, "nack_ms": k, "error": "bad"}
        for n, (a, k) in nodes.items()
    ]
    acks = [a for a, _ in nodes.values() if a is not None]
    return {
        "version": f"1000.{seq}",
        "cause": {"kind": "verdict", "detail": f"web <b>{seq}</b>", "time": at},
        "nodes": len(nodes),
        "acked": len(acks),
        "nacked": len(nodes) - len(acks),
        "pending": 0,
        "convergence_ms": max(acks) if acks else None,
        "delay_p50_ms": None,
        "delay_p99_ms": None,
        "not_acked": [],
        "per_node": per_node,
    }


def test_both_charts_share_colours_and_escape_text() -> None:
    start = version(1, 0.0, {}) | {"cause": {"kind": "start", "detail": "", "time": 0.0}}
    v2 = version(2, 10.0, {"n-2": (5.0, None), "n-10": (8.0, None)})
    v3 = version(3, 10.5, {"n-2": (None, 3.0), "n-10": (40.0, None)})
    page = report_html([v3, start, v2], now=11.0)
    assert page.count("<svg") == 2 and "<b>" not in page and "&lt;b&gt;" in page
    palette = colours([v3, start, v2])
    assert set(palette) == {"1000.2", "1000.3"}  # the start version reached no node
    for colour in palette.values():
        assert page.count(f'"{colour}"') >= 3  # legend, convergence line, timeline
    assert "NACK of 1000.3: bad" in page
    assert page.index(">n-2<") < page.index(">n-10<")  # natural order


def test_large_fleets_are_sampled_and_empty_history_is_said() -> None:
    big = version(2, 1.0, {f"n{i}": (float(i), None) for i in range(500)})
    page = report_html([big], now=2.0)
    assert f"({MAX_ROWS} of the nodes, sampled evenly)" in page
    assert "no version reached any node yet" in report_html([], now=1.0)

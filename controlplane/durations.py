"""Durations as people write them in configs: `1s`, `500ms`, `1m30s`, `0.25s`."""

from __future__ import annotations

import re

_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)(us|ms|s|m|h)")


def parse_duration(text: str) -> float:
    """Seconds in `text` (`1s`, `500ms`, `1m30s`); ValueError when it is not a duration."""
    s = text.strip()
    if not s:
        raise ValueError("empty duration")
    pos = 0
    total = 0.0
    for match in _PART.finditer(s):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    if pos != len(s):
        raise ValueError(f"not a duration: {text!r} (use e.g. 1s, 500ms, 1m30s)")
    return total


def format_duration(seconds: float) -> str:
    """The shortest of `Nms` / `Ns` that round-trips through parse_duration."""
    ms = seconds * 1000
    if ms == int(ms) and int(ms) % 1000:
        return f"{int(ms)}ms"
    if seconds == int(seconds):
        return f"{int(seconds)}s"
    return f"{seconds:g}s"

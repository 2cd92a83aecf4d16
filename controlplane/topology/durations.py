"""Durations as people write them in configs: `1s`, `500ms`, `1m30s`, `0.25s`."""

from __future__ import annotations

import re
from decimal import Decimal

# Decimal, not float: `9ms` and `0.009s` must parse to the same float (9 * 1e-3 does not).
_UNITS = {"us": Decimal("1e-6"), "ms": Decimal("1e-3"), "s": Decimal(1), "m": Decimal(60), "h": Decimal(3600)}
_PART = re.compile(r"(\d+(?:\.\d+)?)(us|ms|s|m|h)")


def parse_duration(text: str) -> float:
    """Seconds in `text` (`1s`, `500ms`, `1m30s`); ValueError when it is not a duration."""
    s = text.strip()
    if not s:
        raise ValueError("empty duration")
    pos = 0
    total = Decimal(0)
    for match in _PART.finditer(s):
        if match.start() != pos:
            break
        total += Decimal(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    if pos != len(s):
        raise ValueError(f"not a duration: {text!r} (use e.g. 1s, 500ms, 1m30s)")
    return float(total)


def format_duration(seconds: float) -> str:
    """The shortest of `Nms` / `Ns` that round-trips through parse_duration."""
    # repr is the shortest decimal that reads back as `seconds`; written out without an exponent
    # (`1e-05` is not a duration).
    exact = Decimal(repr(seconds))
    ms = exact * 1000
    if ms == ms.to_integral_value() and ms % 1000:
        return f"{int(ms)}ms"
    if exact == exact.to_integral_value():
        return f"{int(exact)}s"
    return f"{exact:f}s"

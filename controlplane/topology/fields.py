"""`Field`: one value of a YAML document with its path, and the typed readers every parser uses, so each
error is a `ConfigError` naming the file and the field path (`clusters[1].endpoints[0].port`).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any

from controlplane.errors import ConfigError
from controlplane.topology.durations import parse_duration

# --------------------------------------------------------------------------- reading


class Field:
    """A value in the document with the path that reached it, for precise errors."""

    def __init__(self, value: Any, path: str, source: str) -> None:
        self.value = value
        self.path = path
        self.source = source

    def error(self, message: str) -> ConfigError:
        return ConfigError(message, path=self.path, source=self.source)

    def child(self, key: str | int) -> Field:
        if isinstance(key, int):
            return Field(self.value[key], f"{self.path}[{key}]", self.source)
        return Field(self.value.get(key), f"{self.path}.{key}" if self.path else key, self.source)

    @property
    def missing(self) -> bool:
        return self.value is None

    def mapping(self, allowed: set[str], *, also: Mapping[str, str] | None = None) -> Field:
        """Check this is a mapping of `allowed` keys, or of keys in `also` (key -> what it is for,
        named after the others in the error)."""
        if not isinstance(self.value, dict):
            raise self.error(f"must be a mapping, got {kind_of(self.value)}")
        extra = also or {}
        for key in self.value:
            if not isinstance(key, str):
                raise self.error(f"keys must be strings, got {key!r}")
            if key not in allowed and key not in extra:
                hint = ", ".join(sorted(allowed))
                more = "".join(f"; {why}: {name}" for name, why in extra.items())
                raise self.child(key).error(f"unknown field (expected one of: {hint}){more}")
        return self

    def items(self) -> Iterator[Field]:
        if not isinstance(self.value, list):
            raise self.error(f"must be a list, got {kind_of(self.value)}")
        for i in range(len(self.value)):
            yield self.child(i)

    def string(self, *, default: str | None = None, pattern: re.Pattern[str] | None = None) -> str:
        if self.value is None:
            if default is None:
                raise self.error("is required")
            return default
        if not isinstance(self.value, str):
            raise self.error(f"must be a string, got {kind_of(self.value)}")
        if pattern is not None and not pattern.fullmatch(self.value):
            raise self.error(f"{self.value!r} does not match {pattern.pattern}")
        return self.value

    def opt_str(self) -> str | None:
        return None if self.value is None else self.string()

    def integer(self, *, default: int | None = None, lo: int | None = None, hi: int | None = None) -> int:
        if self.value is None:
            if default is None:
                raise self.error("is required")
            return default
        if isinstance(self.value, bool) or not isinstance(self.value, int):
            raise self.error(f"must be an integer, got {kind_of(self.value)}")
        if (lo is not None and self.value < lo) or (hi is not None and self.value > hi):
            raise self.error(range_text(lo, hi))
        return self.value

    def number(self, *, default: float, lo: float, hi: float) -> float:
        if self.value is None:
            return default
        if isinstance(self.value, bool) or not isinstance(self.value, int | float):
            raise self.error(f"must be a number, got {kind_of(self.value)}")
        if not lo <= self.value <= hi:
            raise self.error(f"must be {lo:g}..{hi:g}")
        return float(self.value)

    def boolean(self, *, default: bool) -> bool:
        if self.value is None:
            return default
        if not isinstance(self.value, bool):
            raise self.error(f"must be true or false, got {kind_of(self.value)}")
        return self.value

    def duration(self, *, default: float | None = None, positive: bool = False) -> float:
        if self.value is None:
            if default is None:
                raise self.error("is required")
            return default
        if isinstance(self.value, bool):
            raise self.error("must be a duration such as 1s or 500ms")
        if isinstance(self.value, int | float):
            seconds = float(self.value)
        elif isinstance(self.value, str):
            try:
                seconds = parse_duration(self.value)
            except ValueError as exc:
                raise self.error(str(exc)) from None
        else:
            raise self.error(f"must be a duration such as 1s or 500ms, got {kind_of(self.value)}")
        if seconds != seconds:  # NaN passes every comparison below
            raise self.error("must be a duration such as 1s or 500ms, got NaN")
        if seconds < 0 or (positive and seconds == 0):
            raise self.error("must be greater than 0" if positive else "must not be negative")
        if seconds > 86400 * 365:
            raise self.error("is absurdly long (more than a year)")
        return seconds

    def opt_duration(self, *, positive: bool = True) -> float | None:
        return None if self.value is None else self.duration(positive=positive)


def kind_of(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), type(value).__name__
    )


def range_text(lo: int | None, hi: int | None) -> str:
    if lo is not None and hi is not None:
        return f"must be {lo}..{hi}"
    return f"must be >= {lo}" if lo is not None else f"must be <= {hi}"

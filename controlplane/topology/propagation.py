"""The propagation model: a modelled delay before a response is sent to a node.

One machine can then show what a fleet across zones and slow networks looks like. The
`controlplane.propagation` section of the topology holds the rules; the first rule whose match
fits a node gives its delay distribution (fixed, uniform, normal with a floor, or a recorded
trace), drawn once per push to that node from one seeded RNG. No rule, no delay.

    controlplane:
      propagation:
        history: 32
        seed: 7
        delays:
          - {node: "front-*", uniform: [0ms, 200ms]}
          - {zone: "eu-west-1b", normal: {mean: 80ms, stddev: 20ms, floor: 10ms}}
          - {cluster: "batch-*", trace: traces/wan.txt}
          - {fixed: 5ms}

Parsing is pure and raises ConfigError naming the field (`controlplane.observe.propagation.delays[1].uniform`).
"""

from __future__ import annotations

import fnmatch
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from controlplane.errors import ConfigError
from controlplane.topology.durations import parse_duration

if TYPE_CHECKING:  # topology imports this module, and stream imports topology
    pass

KINDS = ("fixed", "uniform", "normal", "trace")
_MATCH = ("node", "cluster", "zone")
MAX_DELAY = 3600.0


@dataclass(frozen=True, slots=True)
class Distribution:
    """A delay distribution in seconds."""

    kind: str  # one of KINDS
    low: float = 0.0  # fixed: the delay; uniform: the low end; normal: the mean
    high: float = 0.0  # uniform: the high end; normal: the standard deviation
    floor: float = 0.0  # normal: draws below this are raised to it
    samples: tuple[float, ...] = ()  # trace: the recorded delays
    trace: str = ""  # trace: where they were read from

    def sample(self, rng: random.Random) -> float:
        if self.kind == "fixed":
            return self.low
        if self.kind == "uniform":
            return rng.uniform(self.low, self.high)
        if self.kind == "normal":
            return max(self.floor, rng.gauss(self.low, self.high))
        return rng.choice(self.samples)

    @property
    def mean(self) -> float:
        """The distribution's mean (the floor of `normal` ignored), for reports."""
        if self.kind == "fixed":
            return self.low
        if self.kind == "uniform":
            return (self.low + self.high) / 2
        if self.kind == "normal":
            return self.low
        return sum(self.samples) / len(self.samples)


@dataclass(frozen=True, slots=True)
class DelayRule:
    """Which nodes (globs on node.id, node.cluster, node.locality.zone; all must fit) and their delay."""

    distribution: Distribution
    node: str | None = None
    cluster: str | None = None
    zone: str | None = None

    def matches(self, node: str, cluster: str, zone: str) -> bool:
        return (
            (self.node is None or fnmatch.fnmatchcase(node, self.node))
            and (self.cluster is None or fnmatch.fnmatchcase(cluster, self.cluster))
            and (self.zone is None or fnmatch.fnmatchcase(zone, self.zone))
        )


@dataclass(frozen=True, slots=True)
class PropagationConfig:
    """The `controlplane.propagation` section: history kept and the delay rules."""

    history: int = 32  # versions kept with their per-node detail
    seed: int | None = None  # None: a different draw each run
    delays: tuple[DelayRule, ...] = ()


# --------------------------------------------------------------------------- parsing


def parse_propagation(
    value: Any, *, path: str = "controlplane.observe.propagation", source: str = ""
) -> PropagationConfig:
    """Validate the `propagation` section (plain JSON types); ConfigError names the bad field."""
    if value is None:
        return PropagationConfig()

    def error(where: str, message: str) -> ConfigError:
        return ConfigError(message, path=where, source=source)

    _mapping(value, path, {"history", "seed", "delays"}, error)
    history = value.get("history", 32)
    if isinstance(history, bool) or not isinstance(history, int) or not 1 <= history <= 10_000:
        raise error(f"{path}.history", "must be an integer 1..10000")
    seed = value.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise error(f"{path}.seed", "must be an integer")
    rules: list[DelayRule] = []
    delays = value.get("delays")
    if delays is not None:
        if not isinstance(delays, list):
            raise error(f"{path}.delays", "must be a list of rules")
        for i, item in enumerate(delays):
            rules.append(_rule(item, f"{path}.delays[{i}]", source, error))
    return PropagationConfig(history=history, seed=seed, delays=tuple(rules))


ErrorFn = Callable[[str, str], ConfigError]


def _mapping(value: Any, path: str, allowed: set[str], error: ErrorFn) -> None:
    if not isinstance(value, dict):
        raise error(path, "must be a mapping")
    for key in value:
        if key not in allowed:
            raise error(f"{path}.{key}", f"unknown field (expected one of: {', '.join(sorted(allowed))})")


def _rule(value: Any, path: str, source: str, error: ErrorFn) -> DelayRule:
    _mapping(value, path, set(_MATCH) | set(KINDS), error)
    kinds = [k for k in KINDS if k in value]
    if len(kinds) != 1:
        raise error(path, f"needs exactly one delay distribution: {', '.join(KINDS)}")
    match: dict[str, str | None] = {}
    for key in _MATCH:
        glob = value.get(key)
        if glob is not None and (not isinstance(glob, str) or not glob):
            raise error(f"{path}.{key}", "must be a non-empty glob such as 'front-*'")
        match[key] = glob
    kind = kinds[0]
    where = f"{path}.{kind}"
    return DelayRule(_distribution(kind, value[kind], where, source, error), **match)


def _duration(value: Any, path: str, error: ErrorFn) -> float:
    if isinstance(value, bool) or value is None:
        raise error(path, "must be a duration such as 50ms or 0.2s")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        try:
            seconds = parse_duration(value)
        except ValueError as exc:
            raise error(path, str(exc)) from None
    else:
        raise error(path, "must be a duration such as 50ms or 0.2s")
    if not math.isfinite(seconds) or not 0 <= seconds <= MAX_DELAY:
        raise error(path, f"must be 0..{MAX_DELAY:g}s")
    return seconds


def _distribution(kind: str, value: Any, path: str, source: str, error: ErrorFn) -> Distribution:
    if kind == "fixed":
        return Distribution("fixed", low=_duration(value, path, error))
    if kind == "uniform":
        if not isinstance(value, list) or len(value) != 2:
            raise error(path, "must be [low, high], such as [0ms, 200ms]")
        low, high = _duration(value[0], f"{path}[0]", error), _duration(value[1], f"{path}[1]", error)
        if low > high:
            raise error(path, f"low ({low:g}s) must not exceed high ({high:g}s)")
        return Distribution("uniform", low=low, high=high)
    if kind == "normal":
        _mapping(value, path, {"mean", "stddev", "floor"}, error)
        for key in ("mean", "stddev"):
            if key not in value:
                raise error(f"{path}.{key}", "is required")
        return Distribution(
            "normal",
            low=_duration(value["mean"], f"{path}.mean", error),
            high=_duration(value["stddev"], f"{path}.stddev", error),
            floor=_duration(value.get("floor", 0), f"{path}.floor", error),
        )
    if not isinstance(value, str) or not value:
        raise error(path, "must be the path of a trace file (one delay per line, e.g. 12ms or 0.012s)")
    trace = Path(value)
    if not trace.is_absolute() and source and Path(source).is_file():
        trace = Path(source).parent / trace
    return Distribution("trace", samples=read_trace(trace, path, error), trace=str(trace))


def read_trace(trace: Path, path: str, error: ErrorFn) -> tuple[float, ...]:
    """Delays recorded one per line (`12ms`, `0.012s`, or a bare number of milliseconds); `#` comments."""
    try:
        text = trace.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise error(path, f"cannot read trace {str(trace)!r}: {getattr(exc, 'strerror', None) or exc}") from None
    samples: list[float] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        item = line.split("#", 1)[0].strip()
        if not item:
            continue
        try:
            seconds = float(item) / 1000 if _is_number(item) else parse_duration(item)
        except ValueError:
            raise error(path, f"{trace}:{lineno}: {item!r} is not a delay (12ms, 0.012s or 12)") from None
        if not math.isfinite(seconds) or not 0 <= seconds <= MAX_DELAY:
            raise error(path, f"{trace}:{lineno}: must be 0..{MAX_DELAY:g}s")
        samples.append(seconds)
    if not samples:
        raise error(path, f"trace {str(trace)!r} holds no delays")
    return tuple(samples)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True

"""`healthplane lab compare`: the same scenario with the central prober and with per-Envoy checks.

For each fleet size (front proxies) and each mode, a fresh lab runs `lab scenario` `--repeat`
times. Side by side: how long the failed backend kept receiving requests, how far apart the front
proxies dropped it, failed requests, and the health-check requests each backend received per
second: about 1 / interval with the central prober whatever the fleet, N / interval when each of
N front proxies checks on its own.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from controlplane.errors import ConfigError
from lab.run import Interrupted, Lab, run_until_signal
from lab.scenario import ScenarioResult, run_scenario, write_json
from lab.topology import BACKENDS, LabConfig, Mode, config_from_args

__all__ = ["Comparison", "compare_command", "format_table", "run_compare"]

MODES = (Mode.CENTRAL, Mode.PER_ENVOY)


@dataclass(frozen=True, slots=True)
class Comparison:
    """Every scenario run of one fleet size in one mode."""

    front_proxies: int
    mode: Mode
    results: tuple[ScenarioResult, ...]

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.results)

    @property
    def checks_per_backend_per_second(self) -> float:
        """Health-check requests a backend received per second, averaged over backends and runs."""
        values = [v for r in self.results for v in r.health_checks_per_second.values()]
        return statistics.fmean(values) if values else 0.0


async def run_compare(
    base: LabConfig,
    *,
    fleets: Sequence[int],
    rate: float,
    victim: str,
    slack: float,
    repeat: int,
    progress: Callable[[str], None] = lambda line: None,
) -> list[Comparison]:
    """For every fleet size, each mode in turn: a fresh lab, `repeat` scenario runs."""
    comparisons = []
    for n in fleets:
        for mode in MODES:
            config = replace(base, mode=mode, front_proxies=n)
            results = []
            async with Lab(config) as lab:
                for i in range(repeat):
                    result = await run_scenario(lab, rate=rate, victim=victim, slack=slack)
                    results.append(result)
                    progress(_summary(result, i, repeat))
            comparisons.append(Comparison(n, mode, tuple(results)))
    return comparisons


def _summary(r: ScenarioResult, i: int, repeat: int) -> str:
    recovery = "never" if r.recovery is None else f"{r.recovery:.2f}s"
    checks = statistics.fmean(r.health_checks_per_second.values())
    line = (
        f"{r.mode.title}, {r.front_proxies} front prox{'y' if r.front_proxies == 1 else 'ies'}, run {i + 1}/{repeat}: "
        f"last request to {r.victim} {r.detection:.2f}s after the failure, back {recovery} after recovery, "
        f"{r.failed} failed of {r.requests}, {checks:.1f} checks/s per backend"
    )
    if not r.ok:
        line += "\n" + "\n".join(f"    FAILED: {s.description}" for s in r.steps if not s.held)
    return line


def _spread(values: Sequence[float], unit: str = " s") -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f}{unit}"
    return f"{statistics.median(values):.2f}{unit} ({min(values):.2f} to {max(values):.2f})"


def format_table(comparisons: Sequence[Comparison]) -> str:
    """A Markdown table: one block of rows per fleet size, one column per mode."""
    by_key = {(c.front_proxies, c.mode): c for c in comparisons}
    fleets = sorted({c.front_proxies for c in comparisons})
    repeat = max((len(c.results) for c in comparisons), default=1)
    runs = f"median (min to max) of {repeat} runs" if repeat > 1 else "one run"
    lines = [
        f"| front proxies | per scenario run ({runs}) | {MODES[0].title} | {MODES[1].title} |",
        "|---:|---|---:|---:|",
    ]
    for n in fleets:
        cells: list[tuple[str, Callable[[Comparison], str]]] = [
            ("failure → last request to the failed backend", lambda c: _spread([r.detection for r in c.results])),
            (
                "front proxies disagreeing after the failure: first → last to drop it",
                lambda c: _spread([s for r in c.results if (s := r.exclusion_spread) is not None]),
            ),
            (
                "recovery → first request to it again",
                lambda c: _spread([v for r in c.results if (v := r.recovery) is not None]),
            ),
            (
                "front proxies disagreeing after recovery: first → last to take it back",
                lambda c: _spread([s for r in c.results if (s := r.readmission_spread) is not None]),
            ),
            (
                "failed requests",
                lambda c: f"{sum(r.failed for r in c.results)} of {sum(r.requests for r in c.results)}",
            ),
            ("/livez checks per backend per second", lambda c: f"{c.checks_per_backend_per_second:.1f}"),
            (
                f"/livez checks per second, all {len(BACKENDS)} backends",
                lambda c: f"{c.checks_per_backend_per_second * len(BACKENDS):.1f}",
            ),
            ("every step held", lambda c: "yes" if c.ok else "**no**"),
        ]
        for label, cell in cells:
            values = [cell(c) if (c := by_key.get((n, m))) is not None else "-" for m in MODES]
            lines.append(f"| {n} | {label} | {values[0]} | {values[1]} |")
    return "\n".join(lines)


def compare_command(args: argparse.Namespace) -> int:
    """`healthplane lab compare`: exit 0 when every step of every run held."""
    base = config_from_args(args)
    if args.rate <= 0:
        raise ConfigError("must be positive", path="--rate")
    if args.repeat < 1:
        raise ConfigError("must be at least 1", path="--repeat")
    if any(not 1 <= n <= 100 for n in args.fleets):
        raise ConfigError("each must be 1..100", path="--fleets")
    hc = base.health_check
    print(
        f"healthplane lab compare: {args.rate:g} requests/s, {hc.describe()}, fleets of "
        f"{', '.join(map(str, args.fleets))} front proxies, {args.repeat} run(s) each",
        flush=True,
    )

    async def main() -> list[Comparison]:
        return await run_compare(
            base,
            fleets=args.fleets,
            rate=args.rate,
            victim=args.fail,
            slack=args.slack,
            repeat=args.repeat,
            progress=lambda line: print(line, flush=True),
        )

    try:
        comparisons = asyncio.run(run_until_signal(main()))
    except Interrupted:
        return 130
    table = format_table(comparisons)
    print()
    print(table, flush=True)
    if args.markdown is not None:
        Path(args.markdown).write_text(table + "\n")
    if args.json is not None:
        write_json(args.json, [r for c in comparisons for r in c.results])
    return 0 if all(c.ok for c in comparisons) else 1

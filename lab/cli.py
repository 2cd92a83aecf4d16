"""`healthplane lab [scenario|compare]` and `healthplane fleet`: the lab's command line.

It sits above run, scenario and compare so that lab/run.py, which the other two build on, imports
neither; they load when a lab command runs, not when `healthplane` parses its arguments.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from controlplane.errors import EnvoyError, LabError
from lab.envoyproc import find_envoy
from lab.fleet import add_fleet_arguments, fleet_command
from lab.topology import LabConfig, add_lab_arguments, config_from_args

__all__ = ["add_fleet_command", "add_lab_command", "lab_command"]


def add_lab_command(sub: Any) -> None:
    """The `lab` subcommand of `healthplane` (with `scenario` and `compare`)."""
    p = sub.add_parser("lab", help="the docker-compose lab as real processes here (docs/lab.md)")
    add_lab_arguments(p)
    p.set_defaults(func=lab_command)


def add_fleet_command(sub: Any) -> None:
    """The `fleet` subcommand of `healthplane`: simulated ADS nodes."""
    p = sub.add_parser("fleet", help="simulated ADS nodes (real gRPC streams) against a control plane")
    add_fleet_arguments(p)
    p.set_defaults(func=fleet_command)


async def _interactive(config: LabConfig) -> None:
    from lab.run import Lab, say

    async with Lab(config) as lab:
        await lab.wait_healthy()
        say(lab.describe())
        # Until a signal; report a process that exits on its own (someone killed a demo app?).
        watched = {p.exited: p for p in [*lab.apps.values(), *lab.sidecars.values()]}
        if lab.controlplane is not None:
            watched[lab.controlplane.exited] = lab.controlplane
        while True:
            if not watched:
                await asyncio.Future()
            done, _ = await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
            for fut in done:
                proc = watched.pop(fut)
                say(f"healthplane lab: {proc.name} exited with code {fut.result()}; log: {proc.log_path}")


def lab_command(args: argparse.Namespace) -> int:
    """`healthplane lab [scenario|compare]`: the CLI's entry into the lab."""
    command = getattr(args, "lab_command", None)
    # Every lab runs Envoys: say how to get one before starting anything that would need cleaning up.
    try:
        find_envoy()
    except EnvoyError as exc:
        raise LabError(str(exc)) from exc
    if command == "scenario":
        from lab.scenario import scenario_command

        return scenario_command(args)
    if command == "compare":
        from lab.compare import compare_command

        return compare_command(args)
    from lab.run import Interrupted, run_until_signal, say

    config = config_from_args(args)
    try:
        asyncio.run(run_until_signal(_interactive(config)))
    except Interrupted:
        say("healthplane lab: stopped, everything cleaned up")
    return 0

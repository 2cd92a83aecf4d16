"""`healthplane lab [scenario|compare]`: the lab's command line, above run, scenario and compare.

Its own module so that lab/run.py, which scenario.py and compare.py build on, imports neither.
"""

from __future__ import annotations

import argparse
import asyncio

from controlplane.errors import EnvoyError, LabError
from lab.compare import compare_command
from lab.envoyproc import find_envoy
from lab.run import Interrupted, Lab, run_until_signal, say
from lab.scenario import scenario_command
from lab.topology import LabConfig, config_from_args

__all__ = ["lab_command"]


async def _interactive(config: LabConfig) -> None:
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
        return scenario_command(args)
    if command == "compare":
        return compare_command(args)
    config = config_from_args(args)
    try:
        asyncio.run(run_until_signal(_interactive(config)))
    except Interrupted:
        say("healthplane lab: stopped, everything cleaned up")
    return 0

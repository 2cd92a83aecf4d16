"""The `healthplane` command, assembled from each part's subcommands.

serve, validate, bootstrap (cli/serve.py); prober (prober/cli.py); status, endpoints, nodes, alarms,
accept, forget-prober, override (cli/admin.py); topology push (cli/topology.py); fleet and lab (lab/cli.py);
propagation report (cli/propagation.py). The only module of `controlplane` that imports `prober` and `lab`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from controlplane.cli.admin import add_admin_commands
from controlplane.cli.propagation import add_propagation_commands
from controlplane.cli.serve import add_serve_commands
from controlplane.cli.topology import add_topology_commands
from controlplane.errors import HealthplaneError
from controlplane.events import JsonFormatter
from controlplane.version import version
from lab.cli import add_fleet_command, add_lab_command
from prober.cli import add_prober_command

LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")


def _logging_options(parser: argparse.ArgumentParser, default: str | None) -> None:
    """`--log-level` and `--log-format`; on a subcommand (default SUPPRESS) a value given there wins."""
    parser.add_argument("--log-level", default=default or "info", choices=LOG_LEVELS, help="default info")
    parser.add_argument(
        "--log-format", default=default or "text", choices=LOG_FORMATS, help="text (default) or json, one object a line"
    )


def configure_logging(level: str, fmt: str) -> None:
    """The root logger at `level`, writing text or JSON lines to stderr."""
    handler = logging.StreamHandler()
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="healthplane", description=__doc__)
    parser.add_argument("--version", action="version", version=f"healthplane {version()}")
    _logging_options(parser, None)
    sub = parser.add_subparsers(dest="command", required=True)

    add_serve_commands(sub)
    add_prober_command(sub)
    add_admin_commands(sub)
    add_fleet_command(sub)
    add_propagation_commands(sub)
    add_topology_commands(sub)
    add_lab_command(sub)
    for command in sub.choices.values():  # `healthplane serve --log-level debug` as well as before it
        _logging_options(command, argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.log_level, args.log_format)
    try:
        return int(args.func(args))
    except HealthplaneError as exc:
        print(f"healthplane: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""The `healthplane` command, assembled from each part's subcommands.

serve, validate, bootstrap (cli/serve.py); prober (prober/cli.py); status, endpoints, nodes, alarms,
accept, forget-prober, override (cli/admin.py); fleet and lab (lab/cli.py); propagation report
(cli/propagation.py). The only module of `controlplane` that imports `prober` and `lab`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from controlplane.cli.admin import add_admin_commands
from controlplane.cli.propagation import add_propagation_commands
from controlplane.cli.serve import add_serve_commands
from controlplane.errors import HealthplaneError
from lab.cli import add_fleet_command, add_lab_command
from prober.cli import add_prober_command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="healthplane", description=__doc__)
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    sub = parser.add_subparsers(dest="command", required=True)

    add_serve_commands(sub)
    add_prober_command(sub)
    add_admin_commands(sub)
    add_fleet_command(sub)
    add_propagation_commands(sub)
    add_lab_command(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except HealthplaneError as exc:
        print(f"healthplane: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

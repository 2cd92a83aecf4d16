"""`healthplane serve`, `validate` and `bootstrap`: run a control plane, check a topology, print a bootstrap."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
from typing import Any

from controlplane.errors import ConfigError


def _serve(args: argparse.Namespace) -> int:
    from controlplane.app import ControlPlane, tune_gc_for_streams
    from controlplane.topology.parse import load_topology

    topology = load_topology(args.config)

    async def run() -> None:
        cp = ControlPlane(topology, config_path=args.config, workers=args.workers)
        if args.no_prober:
            cp.expect_remote_prober = True
        else:
            from prober.embedded import attach_embedded_prober

            attach_embedded_prober(cp)
        tune_gc_for_streams()
        await cp.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        cpc = topology.controlplane
        print(
            f"healthplane: xDS on {cpc.xds.address}:{cp.xds_port}, admin on http://{cpc.admin.address}:"
            f"{cp.admin_port}, version {cp.snapshot.version}",
            flush=True,
        )
        try:
            await stop.wait()
        finally:
            await cp.aclose()

    asyncio.run(run())
    return 0


def _workers(text: str) -> int:
    """`--workers`: a whole number from 1, or `auto` (the cores this process may run on)."""
    if text == "auto":
        return auto_workers()
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a number nor auto") from None
    if not 1 <= n <= 256:
        raise argparse.ArgumentTypeError(f"{n} is not between 1 and 256")
    return n


def auto_workers() -> int:
    """The cores this process may use (its CPU affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _validate(args: argparse.Namespace) -> int:
    from controlplane.topology.parse import load_topology

    topology = load_topology(args.config)
    endpoints = sum(len(c.endpoints) for c in topology.clusters)
    print(
        f"{args.config}: ok ({len(topology.clusters)} clusters, {endpoints} endpoints, "
        f"{len(topology.listeners)} listeners)"
    )
    return 0


def _bootstrap(args: argparse.Namespace) -> int:
    from controlplane.xds.bootstrap import (
        bootstrap_yaml,
        grpc_bootstrap_json,
        make_bootstrap,
        make_grpc_bootstrap,
        xds_servers,
        xds_tls_from_args,
    )

    servers = xds_servers(args.xds, "--xds")
    if args.grpc:
        if args.delta:
            raise ConfigError("gRPC's xDS client speaks state of the world only", path="--delta")
        text = grpc_bootstrap_json(
            make_grpc_bootstrap(
                node_id=args.node_id,
                xds=servers,
                service=args.service or "",
                zone=args.zone,
                tls=xds_tls_from_args(args),
                fallback=args.grpc_fallback,
            )
        )
        return _write_bootstrap(args, text)
    if args.grpc_fallback:
        raise ConfigError("is for the proxyless gRPC bootstrap (--grpc) only", path="--grpc-fallback")
    if not args.service:
        raise ConfigError("is required for an Envoy bootstrap (node.cluster)", path="--service")
    text = bootstrap_yaml(
        make_bootstrap(
            node_id=args.node_id,
            service=args.service,
            xds=servers,
            admin_port=args.admin_port,
            admin_address=args.admin_address,
            zone=args.zone,
            tls=xds_tls_from_args(args),
            delta=args.delta,
        )
    )
    return _write_bootstrap(args, text)


def _write_bootstrap(args: argparse.Namespace, text: str) -> int:
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    return 0


def add_serve_commands(sub: Any) -> None:
    """The `serve`, `validate` and `bootstrap` subcommands of `healthplane`."""
    p = sub.add_parser("serve", help="run the control plane (xDS + admin API) from a topology file")
    p.add_argument("--config", "-c", required=True, help="topology YAML file (watched for edits)")
    p.add_argument("--no-prober", action="store_true", help="do not run the embedded prober (use external ones)")
    p.add_argument(
        "--workers",
        type=_workers,
        default=1,
        metavar="N|auto",
        help="xDS worker processes sharing the xDS port (auto: the cores this process may use; default 1: "
        "ADS served in this process)",
    )
    p.set_defaults(func=_serve)

    p = sub.add_parser("validate", help="check a topology file and exit")
    p.add_argument("config")
    p.set_defaults(func=_validate)

    p = sub.add_parser("bootstrap", help="print an Envoy (or, with --grpc, a proxyless gRPC) bootstrap over ADS")
    p.add_argument(
        "--grpc", action="store_true", help="print the JSON a proxyless gRPC client reads from GRPC_XDS_BOOTSTRAP"
    )
    p.add_argument(
        "--grpc-fallback",
        action="store_true",
        help="with --grpc and several --xds: one xds_servers entry each, in order (gRPC's fallback, gRFC A71) "
        "instead of one entry listing every replica's address",
    )
    p.add_argument("--node-id", required=True, help="node.id (unique per Envoy or gRPC client process)")
    p.add_argument("--service", help="node.cluster, as --service-cluster sets it (required for Envoy)")
    p.add_argument(
        "--xds",
        required=True,
        action="append",
        help="control plane xDS address HOST:PORT; repeat it for each replica (a DNS name with one "
        "address per replica works too)",
    )
    p.add_argument("--admin-port", type=int, default=9901, help="Envoy admin port (0: any free port)")
    p.add_argument("--admin-address", default="127.0.0.1")
    p.add_argument("--zone", default="", help="node.locality.zone")
    p.add_argument("--output", "-o", help="write to this file instead of stdout")
    p.add_argument("--tls-ca", help="reach the control plane over TLS, trusting this CA file (path as Envoy sees it)")
    p.add_argument("--tls-cert", help="Envoy's client certificate file for mutual TLS")
    p.add_argument("--tls-key", help="Envoy's client key file for mutual TLS")
    p.add_argument("--tls-sni", help="SNI and the name the control plane's certificate must carry")
    p.add_argument(
        "--delta", action="store_true", help="incremental xDS (api_type DELTA_GRPC) instead of state of the world"
    )
    p.set_defaults(func=_bootstrap)

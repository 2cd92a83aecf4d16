"""The `healthplane` command: serve, prober, validate, bootstrap, status, endpoints, nodes, override, lab."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Sequence

from controlplane.errors import ConfigError, HealthplaneError
from controlplane.topology.addresses import host_port


def _serve(args: argparse.Namespace) -> int:
    from controlplane.app import ControlPlane, tune_gc_for_streams
    from controlplane.topology.parse import load_topology

    topology = load_topology(args.config)

    async def run() -> None:
        cp = ControlPlane(topology, config_path=args.config)
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


def _prober(args: argparse.Namespace) -> int:
    import socket

    from prober.link import ControlPlaneLink
    from prober.scheduler import Prober, tune_gc_for_checks

    host_port(args.controlplane, "--controlplane")
    prober_id = args.id or socket.gethostname()

    credentials = None
    if args.tls_ca or args.tls_cert or args.tls_key:
        from controlplane.xds.tls import channel_credentials

        credentials = channel_credentials(args.tls_ca, args.tls_cert, args.tls_key)

    check_metrics = metrics_server = None
    if args.metrics:
        from prometheus_client import CollectorRegistry, start_http_server

        from prober.metrics import CheckMetrics

        host, port = host_port(args.metrics, "--metrics", lowest_port=0)
        registry = CollectorRegistry()
        check_metrics = CheckMetrics(registry, who=f"prober {prober_id}")
        try:
            metrics_server, _ = start_http_server(port, addr=host, registry=registry)
        except OSError as exc:
            raise ConfigError(f"cannot listen on {args.metrics}: {exc.strerror or exc}", path="--metrics") from None
        bound = metrics_server.server_address[1]
        print(f"healthplane prober {prober_id}: metrics on http://{args.metrics.rpartition(':')[0]}:{bound}/metrics")

    async def run() -> None:
        link = ControlPlaneLink(args.controlplane, prober_id=prober_id, credentials=credentials)
        prober = Prober(
            sink=link, source=f"prober:{prober_id}", event_log=args.event_log, max_concurrency=args.concurrency
        )
        if check_metrics is not None:
            prober.check_listeners.append(check_metrics.on_check)
        link.prober = prober
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        async with prober:
            tune_gc_for_checks()
            task = asyncio.create_task(link.run())
            print(f"healthplane prober {prober_id}: reporting to {args.controlplane}", flush=True)
            try:
                await stop.wait()
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    try:
        asyncio.run(run())
    finally:
        if metrics_server is not None:
            metrics_server.shutdown()
    return 0


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
        xds_tls_from_args,
    )

    host, port = host_port(args.xds, "--xds")
    if args.grpc:
        text = grpc_bootstrap_json(
            make_grpc_bootstrap(
                node_id=args.node_id,
                xds_host=host,
                xds_port=port,
                service=args.service or "",
                zone=args.zone,
                tls=xds_tls_from_args(args),
            )
        )
        return _write_bootstrap(args, text)
    if not args.service:
        raise ConfigError("is required for an Envoy bootstrap (node.cluster)", path="--service")
    text = bootstrap_yaml(
        make_bootstrap(
            node_id=args.node_id,
            service=args.service,
            xds_host=host,
            xds_port=port,
            admin_port=args.admin_port,
            admin_address=args.admin_address,
            zone=args.zone,
            tls=xds_tls_from_args(args),
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


def _lab(args: argparse.Namespace) -> int:
    from lab.cli import lab_command

    return lab_command(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="healthplane", description=__doc__)
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the control plane (xDS + admin API) from a topology file")
    p.add_argument("--config", "-c", required=True, help="topology YAML file (watched for edits)")
    p.add_argument("--no-prober", action="store_true", help="do not run the embedded prober (use external ones)")
    p.set_defaults(func=_serve)

    p = sub.add_parser("prober", help="run a prober on its own, reporting to a control plane")
    p.add_argument("--controlplane", required=True, help="the control plane's xDS address HOST:PORT")
    p.add_argument("--id", help="prober id (default: the hostname)")
    p.add_argument("--event-log", help="append every status change to this JSON-lines file")
    p.add_argument("--concurrency", type=int, default=512, help="checks in flight at most")
    p.add_argument("--tls-ca", help="connect over TLS, trusting this CA (PEM) for the control plane's certificate")
    p.add_argument("--tls-cert", help="client certificate (PEM) for mutual TLS")
    p.add_argument("--tls-key", help="client key (PEM) for mutual TLS")
    p.add_argument(
        "--metrics", metavar="HOST:PORT", help="serve this prober's Prometheus metrics (checks, latency) at /metrics"
    )
    p.set_defaults(func=_prober)

    p = sub.add_parser("validate", help="check a topology file and exit")
    p.add_argument("config")
    p.set_defaults(func=_validate)

    p = sub.add_parser("bootstrap", help="print an Envoy (or, with --grpc, a proxyless gRPC) bootstrap over ADS")
    p.add_argument(
        "--grpc", action="store_true", help="print the JSON a proxyless gRPC client reads from GRPC_XDS_BOOTSTRAP"
    )
    p.add_argument("--node-id", required=True, help="node.id (unique per Envoy or gRPC client process)")
    p.add_argument("--service", help="node.cluster, as --service-cluster sets it (required for Envoy)")
    p.add_argument("--xds", required=True, help="control plane xDS address HOST:PORT")
    p.add_argument("--admin-port", type=int, default=9901, help="Envoy admin port (0: any free port)")
    p.add_argument("--admin-address", default="127.0.0.1")
    p.add_argument("--zone", default="", help="node.locality.zone")
    p.add_argument("--output", "-o", help="write to this file instead of stdout")
    p.add_argument("--tls-ca", help="reach the control plane over TLS, trusting this CA file (path as Envoy sees it)")
    p.add_argument("--tls-cert", help="Envoy's client certificate file for mutual TLS")
    p.add_argument("--tls-key", help="Envoy's client key file for mutual TLS")
    p.add_argument("--tls-sni", help="SNI and the name the control plane's certificate must carry")
    p.set_defaults(func=_bootstrap)

    from controlplane.cli.admin import add_admin_commands

    add_admin_commands(sub)

    from controlplane.cli.propagation import add_propagation_commands

    add_propagation_commands(sub)  # issue 5: fleet, propagation report

    from lab.topology import add_lab_arguments  # the lab's options; no aiohttp at parse time

    p = sub.add_parser("lab", help="the docker-compose lab as real processes here (docs/lab.md)")
    add_lab_arguments(p)
    p.set_defaults(func=_lab)
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

"""`healthplane prober`: a prober on its own, reporting to a control plane over the prober link."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
from typing import Any

from controlplane.errors import ConfigError
from controlplane.topology.addresses import host_port


def prober_command(args: argparse.Namespace) -> int:
    import socket

    from prober.link import ControlPlaneLinks
    from prober.processes import ShardedProber
    from prober.scheduler import Prober, tune_gc_for_checks

    targets: list[str] = list(dict.fromkeys(args.controlplane))  # each replica once, in the order given
    for target in targets:
        host_port(target, "--controlplane")
    if not args.resolve_interval > 0:
        raise ConfigError(f"must be more than 0 seconds, got {args.resolve_interval}", path="--resolve-interval")
    if not args.resolve_grace >= 0:
        raise ConfigError(f"must be 0 seconds or more, got {args.resolve_grace}", path="--resolve-grace")
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
        # One link per control-plane replica, each sent the same verdicts (issue 17).
        # A name (a headless Service) is one link per address it resolves to, re-resolved.
        link = ControlPlaneLinks(
            targets,
            prober_id=prober_id,
            credentials=credentials,
            resolve_interval=args.resolve_interval,
            resolve_grace=args.resolve_grace,
        )
        prober: Prober | ShardedProber
        if args.processes > 1:  # one prober id to the control plane, the checks across processes
            prober = ShardedProber(
                args.processes,
                sink=link,
                source=f"prober:{prober_id}",
                event_log=args.event_log,
                max_concurrency=args.concurrency,
            )
        else:
            prober = Prober(
                sink=link, source=f"prober:{prober_id}", event_log=args.event_log, max_concurrency=args.concurrency
            )
        if check_metrics is not None:
            if isinstance(prober, ShardedProber):
                prober.tally_listeners.append(check_metrics.add)  # the workers' sums, per report
            else:
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
            print(f"healthplane prober {prober_id}: reporting to {', '.join(targets)}", flush=True)
            try:
                await stop.wait()
                await link.leave()  # a clean stop: each control plane moves the share, raises no alarm
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    try:
        asyncio.run(run())
    finally:
        if metrics_server is not None:
            metrics_server.shutdown()
    return 0


def add_prober_command(sub: Any) -> None:
    """The `prober` subcommand of `healthplane`."""
    p = sub.add_parser("prober", help="run a prober on its own, reporting to a control plane")
    p.add_argument(
        "--controlplane",
        required=True,
        action="append",
        metavar="HOST:PORT",
        help="a control plane's xDS address; repeat it for every replica (each gets the same verdicts). "
        "A name is resolved: one link per address (a headless Service: every replica), kept in step with DNS",
    )
    p.add_argument(
        "--resolve-interval",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="resolve each --controlplane name again this often, linking to new addresses (default 5)",
    )
    p.add_argument(
        "--resolve-grace",
        type=float,
        default=15.0,
        metavar="SECONDS",
        help="close a link once its address has been missing from DNS this long (default 15; DNS answers flap)",
    )
    p.add_argument("--id", help="prober id (default: the hostname)")
    p.add_argument("--event-log", help="append every status change to this JSON-lines file")
    p.add_argument("--concurrency", type=int, default=512, help="checks in flight at most (per process)")
    p.add_argument(
        "--processes", type=int, default=1, help="check from N processes, each a shard of the endpoints (one prober id)"
    )
    p.add_argument("--tls-ca", help="connect over TLS, trusting this CA (PEM) for the control plane's certificate")
    p.add_argument("--tls-cert", help="client certificate (PEM) for mutual TLS")
    p.add_argument("--tls-key", help="client key (PEM) for mutual TLS")
    p.add_argument(
        "--metrics", metavar="HOST:PORT", help="serve this prober's Prometheus metrics (checks, latency) at /metrics"
    )
    p.set_defaults(func=prober_command)

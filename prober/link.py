"""The prober's end of the link to the control plane (protos/healthplane/v1/prober.proto).

`ControlPlaneLink` keeps one `Report` stream open, reconnecting with exponential backoff and
full jitter. On every (re)connection it says hello, sends the prober's full current state, then
forwards verdicts and events as they happen. The control plane sends the clusters to check; each
topology message is loaded with the same validator as the topology file and handed to the
prober, so an edit reaches the prober without a restart.

`ControlPlaneLinks` is one prober linked to every control-plane replica (issue 17): each link
gets the same verdicts and events, through its own bounded queue, so a replica that is down or
slow delays nobody else (its verdicts coalesce to the latest per endpoint until it reads again,
and a link that reconnects starts with the full state). Each replica sends the prober its share;
the prober checks the union of the shares of the links that are up (`merge_shares`): when the
replicas disagree for a moment (a prober seen by one and not yet by another), an endpoint is
checked by one prober too many rather than by none. A control plane given by name (a headless
Service) is one link per address it resolves to, kept in step with DNS (prober/dns/).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import json
import logging
import random
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from dataclasses import replace
from typing import Any, Protocol

import grpc

from controlplane.errors import ConfigError
from controlplane.health.store import EndpointId, HealthStatus, Verdict
from controlplane.topology.addresses import is_ip, split_host_port
from controlplane.topology.model import Cluster, Topology
from controlplane.topology.parse import parse_topology
from healthplane.v1 import prober_pb2, prober_pb2_grpc
from prober.dns import AddressChange, Resolver, watch_name
from prober.events import ProbeEvent
from prober.scheduler import EndpointReport, TopologyChange


class ProbedEndpoints(Protocol):
    """What the link needs from a prober: a `Prober`, or a `ShardedProber` across processes."""

    def update_topology(self, topology: Topology) -> TopologyChange: ...

    def current_verdicts(self) -> list[Verdict]: ...

    def endpoints(self) -> Iterable[EndpointId]: ...

    def endpoint(self, cluster: str, endpoint: str) -> EndpointReport | None: ...


log = logging.getLogger("healthplane.prober.link")

VERSION = "0.1.0"
# Messages waiting for a control plane's gRPC stream, per link. A replica that reads slowly makes
# its link wait here while verdicts coalesce (the latest per endpoint) and events drop the oldest.
MAX_QUEUED_MESSAGES = 16


def _timestamp(seconds: float) -> Any:
    from google.protobuf.timestamp_pb2 import Timestamp

    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def verdict_message(v: Verdict) -> prober_pb2.Verdict:
    return prober_pb2.Verdict(
        cluster=v.cluster, endpoint=v.endpoint, status=v.status.name, reason=v.reason, time=_timestamp(v.time)
    )


def event_message(e: ProbeEvent) -> prober_pb2.ProbeEvent:
    c = e.counters
    return prober_pb2.ProbeEvent(
        cluster=e.cluster,
        endpoint=e.endpoint,
        old_status=e.old.name,
        new_status=e.new.name,
        reason=e.reason,
        counters=prober_pb2.Counters(
            successes=c.successes, http_failures=c.http_failures, tcp_failures=c.tcp_failures, timeouts=c.timeouts
        ),
        time=_timestamp(e.time),
    )


def check_state_message(report: EndpointReport) -> prober_pb2.CheckState:
    """One endpoint's policy, counters and last result, for the control plane's /endpoints."""
    hc = report.target.health_check
    c = report.counters
    last = report.last_result
    message = prober_pb2.CheckState(
        cluster=report.target.cluster,
        endpoint=report.target.endpoint,
        check=hc.kind,
        rise=hc.healthy_threshold,
        fall=hc.unhealthy_threshold,
        counters=prober_pb2.Counters(
            successes=c.successes, http_failures=c.http_failures, tcp_failures=c.tcp_failures, timeouts=c.timeouts
        ),
        checks=report.checks,
    )
    if last is not None:
        message.last_result = last.kind.value
        message.last_reason = last.reason
        message.last_time.CopyFrom(_timestamp(last.time))
        message.last_latency_seconds = last.latency
    return message


def backoff_delays(base: float, cap: float, rng: random.Random) -> Iterator[float]:
    """Exponential backoff with full jitter: uniform(0, min(cap, base * 2**attempt))."""
    ceiling = min(cap, base)
    while True:
        yield rng.uniform(0, ceiling)
        # Doubled only up to the cap: 2**attempt itself would overflow a float after ~1,024
        # failed reconnects and end the link of a prober whose control plane stays away that long.
        ceiling = min(cap, ceiling * 2)


class ControlPlaneLink:
    """Streams a prober's verdicts to a control plane and its topology back; a `ProberSink`."""

    def __init__(
        self,
        target: str,
        prober: ProbedEndpoints | None = None,
        *,
        prober_id: str,
        backoff_base: float = 0.2,
        backoff_cap: float = 10.0,
        max_pending_events: int = 10_000,
        rng: random.Random | None = None,
        check_report_interval: float = 1.0,
        credentials: grpc.ChannelCredentials | None = None,
        shards: bool = True,
        max_queued: int = MAX_QUEUED_MESSAGES,
        on_disconnect: Callable[[], None] | None = None,
        server_name: str | None = None,
    ) -> None:
        self.target = target
        # Over TLS, the name the control plane's certificate is checked for when `target` is one
        # of the addresses a name resolved to (ControlPlaneLinks); None: the target's own host.
        self.server_name = server_name
        # Take a share (Hello.shards): with several probers, the control plane sends only the
        # endpoints this one checks and counts only the owners' votes.
        self.shards = shards
        self.max_queued = max_queued
        self.on_disconnect = on_disconnect
        # TLS (mutual when it holds a client certificate): controlplane.security.channel_credentials.
        self.credentials = credentials
        self.prober = prober
        self.prober_id = prober_id
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self._rng = rng or random.Random()
        self._outbox: asyncio.Queue[prober_pb2.ProberMessage | None] | None = None
        self._events: deque[ProbeEvent] = deque(maxlen=max_pending_events)
        self._verdicts: dict[tuple[str, str], Verdict] = {}
        self._flush = asyncio.Event()
        self.connected = asyncio.Event()
        self.connections = 0
        self.topology_version = ""
        self.check_report_interval = check_report_interval
        self._checks_sent: dict[tuple[str, str], tuple[int, float | None]] = {}
        self._share: set[EndpointId] | None = None  # the endpoints of the last topology on this connection
        self._outbox_now: asyncio.Queue[prober_pb2.ProberMessage | None] | None = None
        self._leaving = False
        self._done = asyncio.Event()  # set when a connection ends

    def _prober(self) -> ProbedEndpoints:
        if self.prober is None:
            raise RuntimeError("ControlPlaneLink.prober is not set")
        return self.prober

    # ------------------------------------------------------------------ ProberSink

    async def on_verdict(self, verdict: Verdict) -> None:
        self._verdicts[verdict.id] = verdict  # only the latest per endpoint matters
        self._flush.set()

    async def on_event(self, event: ProbeEvent) -> None:
        self._events.append(event)
        self._flush.set()

    # ------------------------------------------------------------------ connection

    async def run(self) -> None:
        """Stay connected until cancelled. `prober` must be set (it takes this link as its sink)."""
        if self.prober is None:
            raise RuntimeError("ControlPlaneLink.prober is not set")
        delays = backoff_delays(self.backoff_base, self.backoff_cap, self._rng)
        while not self._leaving:
            started = time.monotonic()
            try:
                await self._connect_once()
            except grpc.aio.AioRpcError as exc:
                log.warning("link to %s: %s %s", self.target, exc.code().name, exc.details())
            finally:
                self.connected.clear()
                self._outbox_now = None
                self._done.set()
                if self.on_disconnect is not None:
                    self.on_disconnect()
            if self._leaving:
                return
            if time.monotonic() - started > self.backoff_cap:  # it was up for a while: start over
                delays = backoff_delays(self.backoff_base, self.backoff_cap, self._rng)
            await asyncio.sleep(next(delays))

    async def leave(self, grace: float = 2.0) -> None:
        """Stop cleanly: end the stream after what is queued (the control plane sees a prober that
        left, not one that died, and moves its share without an alarm) and do not reconnect."""
        self._leaving = True
        outbox = self._outbox_now
        if outbox is None:
            return
        self._done.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace):
                await outbox.put(prober_pb2.ProberMessage(goodbye=prober_pb2.Goodbye(reason="the prober stops")))
                await outbox.put(None)
                await self._done.wait()

    async def _connect_once(self) -> None:
        options = [] if self.server_name is None else [("grpc.ssl_target_name_override", self.server_name)]
        channel_cm = (
            grpc.aio.insecure_channel(self.target)
            if self.credentials is None
            else grpc.aio.secure_channel(self.target, self.credentials, options=options)
        )
        async with channel_cm as channel:
            # Bounded: hello and the full state fit; after that, a slow reader holds the senders.
            outbox: asyncio.Queue[prober_pb2.ProberMessage | None] = asyncio.Queue(max(self.max_queued, 2))
            call = prober_pb2_grpc.ProberLinkStub(channel).Report(self._requests(outbox))
            hello = prober_pb2.Hello(prober_id=self.prober_id, version=VERSION, shards=self.shards)
            await outbox.put(prober_pb2.ProberMessage(hello=hello))
            # Whatever was pending is superseded by the full state sent first.
            self._verdicts.clear()
            self._checks_sent.clear()
            self._share = None
            await outbox.put(
                prober_pb2.ProberMessage(
                    verdicts=prober_pb2.VerdictBatch(
                        full_state=True,
                        verdicts=[verdict_message(v) for v in self._prober().current_verdicts()],
                        events=[event_message(e) for e in self._drain_events()],
                        checks=self._changed_checks(),
                    )
                )
            )
            self.connections += 1
            self._outbox_now = outbox
            self.connected.set()
            log.info("connected to control plane %s", self.target)
            sender = asyncio.create_task(self._send_changes(outbox))
            checks = asyncio.create_task(self._send_checks(outbox))
            try:
                while (message := await call.read()) is not grpc.aio.EOF:
                    self._apply(message)
            finally:
                for task in (sender, checks):
                    task.cancel()
                # Not `suppress(CancelledError): await task`: that also swallows a cancel of this
                # link's own task arriving meanwhile, and the link went on reconnecting for good.
                try:
                    outcomes = await asyncio.gather(sender, checks, return_exceptions=True)
                finally:
                    _end(outbox)
                for outcome in outcomes:
                    if isinstance(outcome, Exception):  # a failure of theirs (not their cancel) still shows
                        raise outcome

    @staticmethod
    async def _requests(
        outbox: asyncio.Queue[prober_pb2.ProberMessage | None],
    ) -> AsyncIterator[prober_pb2.ProberMessage]:
        while (message := await outbox.get()) is not None:
            yield message

    def _drain_events(self) -> list[ProbeEvent]:
        events = list(self._events)
        self._events.clear()
        return events

    async def _send_changes(self, outbox: asyncio.Queue[prober_pb2.ProberMessage | None]) -> None:
        while True:
            await self._flush.wait()
            self._flush.clear()
            verdicts = list(self._verdicts.values())
            self._verdicts.clear()
            events = self._drain_events()
            if verdicts or events:
                await outbox.put(
                    prober_pb2.ProberMessage(
                        verdicts=prober_pb2.VerdictBatch(
                            verdicts=[verdict_message(v) for v in verdicts], events=[event_message(e) for e in events]
                        )
                    )
                )

    def _changed_checks(self) -> list[prober_pb2.CheckState]:
        """Check states of the endpoints checked since they were last sent on this connection
        (of this link's share, once the control plane has sent one)."""
        prober = self._prober()
        share = self._share
        out = []
        for key in list(prober.endpoints()):
            if share is not None and key not in share:
                continue
            report = prober.endpoint(*key)
            if report is None:
                continue
            mark = (report.checks, report.last_result.time if report.last_result else None)
            if self._checks_sent.get(key) != mark:
                self._checks_sent[key] = mark
                out.append(check_state_message(report))
        return out

    async def _send_checks(self, outbox: asyncio.Queue[prober_pb2.ProberMessage | None]) -> None:
        while True:
            await asyncio.sleep(self.check_report_interval)
            # Nothing changed: an empty batch says the prober is alive (a prober with nothing to
            # check, or only steady endpoints, is quiet, not silent; the staleness bound needs it).
            changed = self._changed_checks()
            await outbox.put(prober_pb2.ProberMessage(verdicts=prober_pb2.VerdictBatch(checks=changed)))

    def _apply(self, message: prober_pb2.ControlPlaneMessage) -> None:
        if message.WhichOneof("message") != "topology":
            return
        try:
            document = json.loads(message.topology.clusters_json)
            topology = parse_topology(document, source=f"control plane {self.target}")
        except (ValueError, ConfigError) as exc:
            # The control plane validated it; a failure here means mismatched versions. Keep checking
            # what we have rather than stopping.
            log.error("topology %s from the control plane rejected: %s", message.topology.version, exc)
            return
        prober = self._prober()
        change = prober.update_topology(topology)
        self.topology_version = message.topology.version
        log.info("topology %s: %s", message.topology.version, change)
        share = {(c.name, e.key) for c in topology.clusters for e in c.endpoints}
        added, self._share = (share - self._share if self._share is not None else set()), share
        if added:
            # Endpoints new to this link's share that the prober already knows (it checks them for
            # another replica): this control plane counts its votes from now on, so it gets them now.
            for v in prober.current_verdicts():
                if v.id in added and v.status is not HealthStatus.UNKNOWN:
                    self._verdicts.setdefault(v.id, v)
            self._flush.set()


def _end(outbox: asyncio.Queue[prober_pb2.ProberMessage | None]) -> None:
    """End the request stream after what is queued (a full queue of a dead stream is dropped)."""
    while True:
        try:
            outbox.put_nowait(None)
            return
        except asyncio.QueueFull:
            outbox.get_nowait()


def merge_shares(shares: Sequence[Topology]) -> Topology:
    """The union of several control planes' shares: every cluster, every endpoint once (the first
    share that names an endpoint gives its policy)."""
    clusters: dict[str, Cluster] = {}
    for topology in shares:
        for cluster in topology.clusters:
            have = clusters.get(cluster.name)
            if have is None:
                clusters[cluster.name] = cluster
                continue
            keys = {e.key for e in have.endpoints}
            more = tuple(e for e in cluster.endpoints if e.key not in keys)
            if more:
                clusters[cluster.name] = replace(have, endpoints=have.endpoints + more)
    return Topology(clusters=tuple(clusters.values()), source="the control planes' shares")


class _LinkShare:
    """What one link sees as its prober: its topology goes into the union, the rest is the prober's."""

    def __init__(self, links: ControlPlaneLinks, serial: int) -> None:
        self._links = links
        self._serial = serial

    def update_topology(self, topology: Topology) -> TopologyChange:
        return self._links._set_share(self._serial, topology)

    def current_verdicts(self) -> list[Verdict]:
        return self._links._prober().current_verdicts()

    def endpoints(self) -> Iterable[EndpointId]:
        return self._links._prober().endpoints()

    def endpoint(self, cluster: str, endpoint: str) -> EndpointReport | None:
        return self._links._prober().endpoint(cluster, endpoint)


class ControlPlaneLinks:
    """One prober linked to every control-plane replica: the same verdicts to each, the union of
    their shares checked; a `ProberSink`.

    Each target is `HOST:PORT`. An IP address is one link, for as long as the prober runs. A name
    (a headless Service: one address per ready replica) is resolved now and every
    `resolve_interval` seconds with `resolver` (default: `loop.getaddrinfo`, off the event loop),
    one link per address it resolves to: an address that appears gets a link at once (which starts
    with the full state, as a reconnecting link does), one missing from DNS for `resolve_grace`
    seconds has its link closed with a goodbye, and a failed resolution keeps the links
    (prober/dns/). Over TLS, the links of a name verify the replica's certificate for that name.
    """

    def __init__(
        self,
        targets: Sequence[str],
        prober: ProbedEndpoints | None = None,
        *,
        prober_id: str,
        resolver: Resolver | None = None,
        resolve_interval: float = 5.0,
        resolve_grace: float = 15.0,
        **options: Any,
    ) -> None:
        if not targets:
            raise ValueError("ControlPlaneLinks needs at least one control plane")
        if resolve_interval <= 0 or resolve_grace < 0:
            raise ValueError(
                f"resolve_interval must be > 0 and resolve_grace >= 0: {resolve_interval}, {resolve_grace}"
            )
        self.prober = prober
        self.prober_id = prober_id
        self._options = options
        self.resolver = resolver
        self.resolve_interval = resolve_interval
        self.resolve_grace = resolve_grace
        self.links: list[ControlPlaneLink] = []
        self.names: list[tuple[str, int]] = []  # the targets resolved to one link per address
        self._wanted: dict[str, set[str]] = {}  # link target -> the targets (IP or name) that want it
        # Each link's share by its serial number (a link closed and one opened later to the same
        # address are two links: the old one's last words do not touch the new one's share).
        self._shares: dict[int, Topology | None] = {}
        self._serials: dict[str, int] = {}  # link target -> the serial of its link
        self._next_serial = itertools.count()
        self._leaving = False
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._group: asyncio.TaskGroup | None = None
        self.checked: Topology | None = None  # the union handed to the prober last
        for target in targets:
            host, port = split_host_port(target, lowest_port=1) or (target, 0)
            if is_ip(host) or port == 0:  # an IP, or what gRPC is left to make sense of: one link
                self._want(target, target, server_name=None)
            elif (host, port) not in self.names:
                self.names.append((host, port))

    def _prober(self) -> ProbedEndpoints:
        if self.prober is None:
            raise RuntimeError("ControlPlaneLinks.prober is not set")
        return self.prober

    async def on_verdict(self, verdict: Verdict) -> None:
        for link in list(self.links):
            await link.on_verdict(verdict)  # never waits: a slow link coalesces, it does not block

    async def on_event(self, event: ProbeEvent) -> None:
        for link in list(self.links):
            await link.on_event(event)

    async def run(self) -> None:
        """Keep every link up, and each name's links in step with DNS, until cancelled."""
        self._prober()
        try:
            async with asyncio.TaskGroup() as tg:
                self._group = tg
                for link in self.links:
                    self._start(link)
                for host, port in self.names:
                    tg.create_task(
                        watch_name(
                            host,
                            port,
                            functools.partial(self._resolved, f"{host}:{port}", host),
                            resolver=self.resolver,
                            interval=self.resolve_interval,
                            grace=self.resolve_grace,
                        ),
                        name=f"resolve-{host}:{port}",
                    )
        finally:
            self._group = None

    async def leave(self, grace: float = 2.0) -> None:
        """End every link's stream cleanly (the control planes move this prober's share, no alarm)."""
        self._leaving = True  # and open no new link from a name's answer
        await asyncio.gather(*(link.leave(grace) for link in self.links))

    # ------------------------------------------------------------------ the set of links

    def _want(self, target: str, by: str, *, server_name: str | None) -> ControlPlaneLink | None:
        """Register `by`'s wish for a link to `target`; the new link, if there was none yet."""
        wanted = self._wanted.setdefault(target, set())
        wanted.add(by)
        if len(wanted) > 1:
            return None
        options = dict(self._options)
        if server_name is not None and options.get("credentials") is not None:
            options["server_name"] = server_name
        serial = next(self._next_serial)
        link = ControlPlaneLink(
            target,
            _LinkShare(self, serial),
            prober_id=self.prober_id,
            on_disconnect=functools.partial(self._lost, serial),
            **options,
        )
        self.links.append(link)
        self._shares[serial] = None
        self._serials[target] = serial
        return link

    def _start(self, link: ControlPlaneLink) -> None:
        if self._group is not None:
            self._tasks[link.target] = self._group.create_task(link.run(), name=f"link-{link.target}")

    async def _resolved(self, name: str, host: str, change: AddressChange) -> None:
        if self._leaving:
            return
        for target in change.added:
            link = self._want(target, name, server_name=host)
            if link is not None:
                log.info("linking to control plane %s (%s)", target, name)
                self._start(link)
        for target in change.removed:
            wanted = self._wanted.get(target, set())
            wanted.discard(name)
            if not wanted:
                await self._close(target, f"{name} no longer resolves to it")

    async def _close(self, target: str, why: str) -> None:
        link = next(link for link in self.links if link.target == target)
        log.info("closing the link to control plane %s: %s", target, why)
        # Forgotten first, so that a link to the same address opened meanwhile is a new one.
        del self._wanted[target]
        self.links.remove(link)
        task = self._tasks.pop(target, None)
        self._shares.pop(self._serials.pop(target), None)
        if any(share is not None for share in self._shares.values()) and self.prober is not None:
            self._check_union()
        await link.leave()  # a goodbye if it is up: that replica moves this prober's share, no alarm
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    # ------------------------------------------------------------------ shares

    def _set_share(self, serial: int, topology: Topology) -> TopologyChange:
        if serial in self._shares:  # not a link closed meanwhile
            self._shares[serial] = topology
        return self._check_union()

    def _lost(self, serial: int) -> None:
        # A replica that is gone no longer asks for anything; with none up, keep checking what we have.
        if serial in self._shares:
            self._shares[serial] = None
        if any(share is not None for share in self._shares.values()) and self.prober is not None:
            self._check_union()

    def _check_union(self) -> TopologyChange:
        self.checked = merge_shares([share for share in self._shares.values() if share is not None])
        return self._prober().update_topology(self.checked)

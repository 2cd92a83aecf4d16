"""Operator state shared by replicas in etcd: `connect(settings)` and `EtcdStore`, the asyncio edge.

`EtcdStore` loads the prefix at start (seeding an empty etcd with this replica's fleet topology,
by compare-and-put, so two replicas starting together do not both seed), then watches it from
the next revision and hands every change to the control plane in revision order. Writes go to
etcd in one transaction each and answer once this replica's own watch has applied them.

When etcd cannot be reached the replica keeps serving its last state: `problems()` names etcd
and the reason (/readyz: degraded), writes raise `StoreUnavailable` (503), and a reconnect
resumes the watch after the last revision applied, or loads the prefix again when that revision
was compacted. Verdicts never go through here.

The client is aetcd (maintained, asyncio, on grpcio and protobuf, which healthplane already
has); `connect` adds TLS, which its own `connect` does not do. The pure half is
controlplane/store/sync.py.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Literal

import aetcd
import grpc
from aetcd import rpc
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from controlplane.errors import ConfigError, StoreUnavailable
from controlplane.events import EventSink
from controlplane.snapshots.snapshot import Snapshot
from controlplane.store.changes import Change, ChangeSink, TopologyChange
from controlplane.store.fleet import fleet_document, fleet_topology
from controlplane.store.probers import ProberRegistry
from controlplane.store.replicas import LEASE_TTL, PUBLISH_INTERVAL, ReplicaRecord, decode_record, publish_due
from controlplane.store.sync import (
    Item,
    Keys,
    KeyValue,
    Skipped,
    Sync,
    WatchEvent,
    encode_override,
    encode_topology,
    write_ops,
)
from controlplane.topology.model import Topology
from controlplane.topology.security import read_pem
from controlplane.topology.store import EtcdSettings

log = logging.getLogger("healthplane.store")

RETRY_MIN, RETRY_MAX = 0.1, 2.0  # seconds between reconnects, doubling
PROBE_PERIOD = 1.0  # a lease refresh this often: a hung etcd (no RST) shows as down within timeout + this
TICK = 0.25  # how often this replica's record is looked at for a change to publish
CLOSE_WAIT = 5.0  # how long aclose() waits for the store's task to end after cancelling it
_RESULTS_KEPT = 256


def _target(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _Client(aetcd.Client):  # type: ignore[misc]  # aetcd has no type hints
    """aetcd's client, over TLS when `credentials` is given (aetcd's own connect is plaintext only)."""

    def __init__(self, host: str, port: int, *, credentials: grpc.ChannelCredentials | None, **kwargs: Any) -> None:
        super().__init__(host=host, port=port, **kwargs)
        self._credentials = credentials

    async def connect(self) -> None:
        if self._credentials is None:
            await super().connect()
            return
        if self._connected.is_set():
            return
        self.channel = rpc.secure_channel(
            _target(self._host, self._port), self._credentials, options=list(self._options.items())
        )
        try:
            if self._username is not None:
                self.auth_stub = rpc.AuthStub(self.channel)
                request = rpc.AuthenticateRequest(name=self._username, password=self._password)
                response = await self.auth_stub.Authenticate(request, timeout=self._timeout)
                self.metadata = (("token", response.token),)
        except rpc.AioRpcError as exc:
            await self.channel.close()
            self._init_channel_attrs()
            aetcd.exceptions._handle_exception(exc)
        self.kvstub = rpc.KVStub(self.channel)
        self.clusterstub = rpc.ClusterStub(self.channel)
        self.leasestub = rpc.LeaseStub(self.channel)
        self.maintenancestub = rpc.MaintenanceStub(self.channel)
        self._watcher = aetcd.Watcher(rpc.WatchStub(self.channel), timeout=self._timeout, metadata=self.metadata)
        self._connected.set()


def connect(settings: EtcdSettings, endpoint: int = 0) -> Any:
    """An aetcd client for `settings.endpoints[endpoint]` (modulo their number), with its TLS and
    authentication; it connects on first use. ConfigError naming the field of an unreadable file.

    Reusable by anything else that needs etcd (prober membership leases, say).
    """
    host, port = settings.endpoints[endpoint % len(settings.endpoints)]
    credentials = None
    if settings.tls is not None:
        tls = settings.tls
        prefix = "controlplane.store.etcd.tls"
        credentials = grpc.ssl_channel_credentials(
            root_certificates=None if tls.ca is None else read_pem(tls.ca, f"{prefix}.ca"),
            private_key=None if tls.key is None else read_pem(tls.key, f"{prefix}.key"),
            certificate_chain=None if tls.cert is None else read_pem(tls.cert, f"{prefix}.cert"),
        )
    try:
        password = settings.read_password()
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror}", path="controlplane.store.etcd.password_file") from None
    # A timeout per request: aetcd waits forever without one, and a watch's creation too.
    timeout = max(1, round(settings.timeout))
    return _Client(host, port, credentials=credentials, username=settings.username, password=password, timeout=timeout)


def raise_if_cancelling() -> None:
    """Raise CancelledError if this task was asked to stop and the request was lost on the way.

    Python 3.11's `asyncio.wait_for` returns the inner result, dropping the cancel, when the
    inner awaitable finishes in the same loop step as the cancel arrives (fixed in 3.12), and
    aetcd awaits it in `connect()` and in a watch's setup. A store task whose cancel was lost so
    ran on, and `aclose()` waited for it. `Task.cancelling()` still counts the request: checked
    after each await into aetcd, it ends the task as the cancel should have.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def describe(exc: BaseException) -> str:
    """A short reason for a failed etcd request (the gRPC details, not a traceback)."""
    cause = exc.__cause__
    if isinstance(cause, grpc.aio.AioRpcError):
        return f"{cause.code().name}: {cause.details()}"
    text = str(exc) or type(exc).__name__
    return text if len(text) < 300 else text[:300] + "..."


class EtcdStore:
    """Operator state in etcd for one replica: load, seed, watch, write (see the module docstring)."""

    shared = True

    def __init__(
        self, settings: EtcdSettings, sink: ChangeSink, events: EventSink, *, describe: Callable[[], ReplicaRecord]
    ) -> None:
        self.settings = settings
        self.sink = sink
        self.events = events
        self.describe = describe  # this replica's record for GET /replicas, as it is now
        self.keys = Keys(settings.prefix)
        self.sync = Sync(self.keys, lambda: sink.topology)
        self.where = "etcd " + ",".join(_target(h, p) for h, p in settings.endpoints)
        self._client: Any = None
        self._endpoint = 0
        self._down: str | None = "not connected yet"
        self._down_since = time.time()
        self._synced = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._waiters: dict[int, asyncio.Future[Snapshot | None]] = {}
        self._results: collections.OrderedDict[int, Snapshot | BaseException | None] = collections.OrderedDict()
        self.reloads = 0  # full loads of the prefix (start, compaction, watch errors)
        self._need_load = True
        self._was_up = False
        self._replicas: dict[str, ReplicaRecord] = {}  # by key, from the watch
        self._lease: int | None = None
        self._clash: str | None = None  # why this replica's record is not written (its id is held), if it is not
        # Prober membership (controlplane/store/probers.py): the registrations seen, the probers
        # this replica holds live links to (registered by it), and who to tell of a change.
        self.probers = ProberRegistry(self.keys)
        self._linked: frozenset[str] = frozenset()
        self._wake = asyncio.Event()
        self.on_probers: Callable[[], None] = lambda: None

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Load (or seed) the shared state before the ports open; on no answer within the timeout,
        serve the local file's state, degraded, and keep trying."""
        self._task = asyncio.create_task(self._run(), name="etcd-store")
        try:
            await asyncio.wait_for(self._synced.wait(), self.settings.timeout + 1)
        except TimeoutError:
            log.warning(
                "%s: no answer at start (%s); serving the local topology until it answers", self.where, self._down
            )

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            # Bounded all the same: a cancel lost inside aetcd (see raise_if_cancelling) once hung
            # the replica's shutdown for good, and a third-party await may lose one again.
            done, _ = await asyncio.wait([self._task], timeout=CLOSE_WAIT)
            if not done:
                log.warning(
                    "%s: the store's task did not end within %ss of its cancel; left behind", self.where, CLOSE_WAIT
                )
            self._task = None
        if self._client is not None and self._lease is not None:
            # Leave GET /replicas now rather than when the lease runs out.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._client.revoke_lease(self._lease), 1)
        self._lease = None
        await self._close_client()
        for waiter in self._waiters.values():
            if not waiter.done():
                waiter.set_exception(StoreUnavailable(f"{self.where}: the control plane is shutting down"))
        self._waiters.clear()

    @property
    def available(self) -> bool:
        return self._down is None

    def replicas(self) -> list[ReplicaRecord]:
        return list(self._replicas.values())

    def link_probers(self, linked: Iterable[str]) -> None:
        """The sharing probers this replica holds live links to now: registered in etcd under its lease."""
        linked = frozenset(linked)
        if linked != self._linked:
            self._linked = linked
            self._wake.set()

    def prober_members(self) -> dict[str, tuple[str, ...]] | None:
        """The probers registered in etcd (id -> replicas holding its link); None while etcd is
        unavailable or not loaded yet (the link records are used meanwhile)."""
        if self._down is not None or not self.sync.loaded:
            return None
        return self.probers.members()

    @property
    def member(self) -> str:
        """HOST:PORT of the etcd endpoint this replica uses now (the next one after a failure)."""
        host, port = self.settings.endpoints[self._endpoint % len(self.settings.endpoints)]
        return _target(host, port)

    @property
    def down_reason(self) -> str:
        return self._down or ""

    def metrics(self) -> Iterator[Metric]:
        """For /metrics: etcd reachable, the revision applied, full loads, replicas and their agreement."""
        up = GaugeMetricFamily("healthplane_store_up", "1 while etcd (controlplane.store) is reachable, else 0.")
        up.add_metric([], 0 if self._down else 1)
        yield up
        revision = GaugeMetricFamily("healthplane_store_revision", "The last etcd revision applied here.")
        revision.add_metric([], self.sync.revision)
        yield revision
        reloads = CounterMetricFamily(
            "healthplane_store_reloads", "Full loads of the etcd prefix (start, compaction, watch errors)."
        )
        reloads.add_metric([], self.reloads)
        yield reloads
        me = self.describe()
        digests = {r.eds_digest for r in self._replicas.values() if r.id != me.id} | {me.eds_digest}
        replicas = GaugeMetricFamily("healthplane_replicas", "Replicas registered in etcd, this one included.")
        replicas.add_metric([], len({r.id for r in self._replicas.values()} | {me.id}))
        yield replicas
        agree = GaugeMetricFamily(
            "healthplane_replicas_eds_digests", "Distinct EDS digests among the replicas (1: agree)."
        )
        agree.add_metric([], len(digests))
        yield agree

    def problems(self) -> list[str]:
        problems = [] if self._clash is None else [self._clash]
        if self._down is None:
            return problems
        since = time.time() - self._down_since
        return [
            f"{self.where} unavailable for {since:.0f}s ({self._down}): serving the last state, "
            "operator changes refused until it is back",
            *problems,
        ]

    # ------------------------------------------------------------------ writes

    async def submit(self, change: Change) -> Snapshot | None:
        """Write `change` to etcd and wait for this replica's watch to apply it (its snapshot)."""
        if self._down is not None:
            raise StoreUnavailable(f"{self.where} is unavailable ({self._down}): nothing was changed; try again later")
        self.sink.check_change(change)
        orphans: list[str] = []
        if isinstance(change, TopologyChange):
            # Validated as every replica will read it: the fleet's part with this replica's own settings.
            fleet_topology(fleet_document(change.topology.document), self.sink.topology, source="admin API")
            orphans = [self.keys.override(c, e) for c, e in self.sink.overrides()]
        ops = write_ops(self.keys, change, orphans=orphans)
        revision = await self._txn(ops)
        return await self._applied(revision)

    async def _txn(
        self, ops: Sequence[tuple[str, bytes | None]], compare: Sequence[Any] = (), *, lease: int = 0
    ) -> int:
        """One transaction; the revision it made (0 if `compare` failed)."""
        client = self._client
        if client is None:
            raise StoreUnavailable(f"{self.where} is unavailable ({self._down}): nothing was changed")
        request = rpc.TxnRequest(compare=list(compare), success=[_op(k, v, lease) for k, v in ops])
        try:
            await client.connect()
            response = await client.kvstub.Txn(request, timeout=self.settings.timeout, metadata=client.metadata)
        except (rpc.AioRpcError, aetcd.ClientError, TimeoutError) as exc:
            reason = describe(exc) if not isinstance(exc, rpc.AioRpcError) else f"{exc.code().name}: {exc.details()}"
            raise StoreUnavailable(f"{self.where}: the write failed ({reason}); nothing was changed") from exc
        except asyncio.CancelledError:
            raise_if_cancelling()  # this task's own cancel goes on
            # Not a cancel of this task's: the store closed the connection under the call, to
            # reconnect (to another member, say), and grpc.aio tells that as a cancel.
            raise StoreUnavailable(
                f"{self.where}: the connection closed during the write (reconnecting); it may or may not have "
                "been applied, and if it was, every replica applies it; look before trying again"
            ) from None
        return int(response.header.revision) if response.succeeded else 0

    async def _applied(self, revision: int) -> Snapshot | None:
        if revision in self._results:
            result = self._results[revision]
            if isinstance(result, BaseException):
                raise result
            return result
        if revision <= self.sync.revision:
            return None
        waiter = self._waiters.setdefault(revision, asyncio.get_running_loop().create_future())
        try:
            return await asyncio.wait_for(asyncio.shield(waiter), self.settings.timeout)
        except TimeoutError:
            raise StoreUnavailable(
                f"{self.where}: written at revision {revision} but not applied here within "
                f"{self.settings.timeout:g}s (the watch is behind); every replica applies it when its watch catches up"
            ) from None

    # ------------------------------------------------------------------ applying

    def _apply(self, items: Sequence[Item] | Any) -> int:
        """Apply items in order; resolve the writers waiting on their revisions. How many applied."""
        applied = 0
        for revision, item in items:
            result: Snapshot | BaseException | None
            if isinstance(item, Skipped):
                self.events.record(
                    "store_skipped", f"{item.key} not applied: {item.reason}", key=item.key, revision=revision
                )
                result = ConfigError(item.reason, path="body")
            else:
                try:
                    result = self.sink.apply_change(item)
                    applied += 1
                except ConfigError as exc:
                    self.events.record(
                        "store_skipped",
                        f"{type(item).__name__} at etcd revision {revision} not applied here: {exc}",
                        revision=revision,
                        error=str(exc),
                    )
                    result = exc
            self._resolve(revision, result)
        self._release(self.sync.revision)
        return applied

    def _resolve(self, revision: int, result: Snapshot | BaseException | None) -> None:
        if revision in self._results:  # a transaction of several keys: its first change answers
            return
        self._results[revision] = result
        while len(self._results) > _RESULTS_KEPT:
            self._results.popitem(last=False)
        waiter = self._waiters.pop(revision, None)
        if waiter is not None and not waiter.done():
            if isinstance(result, BaseException):
                waiter.set_exception(result)
            else:
                waiter.set_result(result)

    def _release(self, upto: int) -> None:
        for revision in [r for r in self._waiters if r <= upto]:
            waiter = self._waiters.pop(revision)
            if not waiter.done():
                waiter.set_result(None)

    # ------------------------------------------------------------------ the loop

    async def _run(self) -> None:
        delay = RETRY_MIN
        while True:
            try:
                await self._session()
            except asyncio.CancelledError:
                raise
            except aetcd.RevisionCompactedError as exc:
                # The revisions after the last one applied are gone: load the prefix again.
                log.warning("%s: %s after revision %d; loading the prefix again", self.where, exc, self.sync.revision)
                self._need_load = True
                delay = RETRY_MIN
            except (
                aetcd.ConnectionFailedError,
                aetcd.ConnectionTimeoutError,
                aetcd.WatchTimeoutError,
                TimeoutError,
            ) as exc:
                self._went_down(describe(exc))  # a reconnect resumes the watch after the last revision applied
                self._endpoint += 1  # the next endpoint, if there are several
            except Exception as exc:  # any other watch error: a fresh full load, not a crash
                log.warning("%s: %s; loading the prefix again", self.where, describe(exc))
                self._went_down(describe(exc))
                self._need_load = True
                self._endpoint += 1
            await self._close_client()
            raise_if_cancelling()  # closing aetcd's watcher swallows a cancel that comes meanwhile
            await asyncio.sleep(delay)
            delay = min(RETRY_MAX, delay * 2) if self._down is not None else RETRY_MIN

    async def _session(self) -> None:
        """One connection: a full load when needed (seeding an empty etcd), then the watch from the
        revision after the last applied, until it fails."""
        self._client = client = connect(self.settings, self._endpoint)
        await client.connect()
        raise_if_cancelling()
        if self._need_load:
            await self._load(client)
            raise_if_cancelling()
            self._need_load = False
            self._went_up()  # writes may go now: the watch below starts after the load's revision
        watch = await client.watch_prefix(self.keys.root.encode(), start_revision=self.sync.revision + 1)
        raise_if_cancelling()
        self._went_up()
        tasks = [asyncio.create_task(self._consume(watch)), asyncio.create_task(self._keepalive(client))]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for task in done:
            task.result()  # the failure that ended the session
        raise aetcd.ClientError("the watch ended")

    async def _consume(self, watch: Any) -> None:
        async for event in watch:
            kv = event.kv
            kind: Literal["put", "delete"] = "delete" if event.kind == "DELETE" else "put"
            key = kv.key.decode()
            if key.startswith(self.keys.replicas):
                self._replica_event(key, None if kind == "delete" else kv.value)
                continue
            if key.startswith(self.keys.probers):
                if self.probers.event(key, kind == "put"):
                    self.on_probers()
                continue
            self._apply(self.sync.events([WatchEvent(kind, key, kv.value, kv.mod_revision)]))

    def _replica_event(self, key: str, value: bytes | None) -> None:
        record = None if value is None else decode_record(value)
        if record is None:
            self._replicas.pop(key, None)
        else:
            self._replicas[key] = record

    async def _keepalive(self, client: Any) -> None:
        """This replica's record under a lease: refreshed every PROBE_PERIOD (which also shows a
        hung etcd, whose watch is silent rather than failed), rewritten when it changes."""
        lease = await client.lease(LEASE_TTL)
        self._lease = lease.id
        published: ReplicaRecord | None = None  # None until this replica's record is written under this lease
        self.probers.published = set()  # a new lease: register every linked prober under it
        last_refresh = time.monotonic()
        last_publish = last_refresh - PUBLISH_INTERVAL  # the record first: it claims the replica id
        while True:
            raise_if_cancelling()  # its writes and refreshes go through aetcd's connect()
            now = time.monotonic()
            record = self.describe()
            if publish_due(record, published, last_publish, now):
                stamped = ReplicaRecord(
                    record.id, record.admin_url, record.xds_address, record.version, record.eds_digest, time.time()
                )
                last_publish = now  # written or not: a clash is tried again a PUBLISH_INTERVAL later
                if await self._claim(client, stamped, lease.id):
                    published = record
                else:  # held by another lease: nothing under this id until it is this replica's
                    published = None
                    self.probers.published = set()
            linked = self._linked
            # The probers' registrations under this replica's id only once its record is: a twin
            # with the same replica_id would otherwise delete the holder's and write its own.
            if published is not None and (ops := self.probers.writes(record.id, linked)):
                await self._txn(ops, lease=lease.id)
                self.probers.published = set(linked)
            if now - last_refresh >= PROBE_PERIOD:
                reply = await client.refresh_lease(lease.id)
                last_refresh = now
                if reply is None or reply.TTL <= 0:  # expired while etcd was away: a new one
                    lease = await client.lease(LEASE_TTL)
                    self._lease, published = lease.id, None
                    self.probers.published = set()
            self._wake.clear()
            # A prober's link that ends is unregistered at once, not at the next tick. Not
            # asyncio.wait_for: on Python 3.11 it drops a cancel that arrives as the wake-up does
            # (see raise_if_cancelling), and a replica whose probers were just killed (many
            # wake-ups) so hung in about one close in two; asyncio.wait never loses one.
            waiter = asyncio.ensure_future(self._wake.wait())
            try:
                await asyncio.wait([waiter], timeout=TICK)
            finally:
                waiter.cancel()

    async def _claim(self, client: Any, record: ReplicaRecord, lease: int) -> bool:
        """Write this replica's record under `lease`, unless another replica holds its id: then
        note the clash and write nothing. Whether it was written.

        A record under another lease with this replica's own admin and xDS addresses is this
        replica's previous run (a restart, or a lease that etcd kept through its own restart): it
        is taken over at once rather than left to run out. Under other addresses it is another
        replica with the same `controlplane.store.replica_id`: the first to hold the id keeps it.
        """
        key = self.keys.replica(record.id)
        ours = rpc.Compare(key=key.encode(), result=rpc.Compare.EQUAL, target=rpc.Compare.LEASE, lease=lease)
        absent = rpc.Compare(key=key.encode(), result=rpc.Compare.EQUAL, target=rpc.Compare.CREATE, create_revision=0)
        for compare in (ours, absent):  # the first holds from the second write on
            if await self._txn([(key, record.encode())], [compare], lease=lease):
                self._set_clash(record.id, None)
                return True
        held = await client.get(key.encode())
        if held is None:  # gone meanwhile (its lease ran out): claimed at the next try
            return False
        holder = decode_record(held.value)
        if holder is not None and (holder.admin_url, holder.xds_address) == (record.admin_url, record.xds_address):
            previous = rpc.Compare(
                key=key.encode(), result=rpc.Compare.EQUAL, target=rpc.Compare.LEASE, lease=held.lease
            )
            if await self._txn([(key, record.encode())], [previous], lease=lease):
                self._set_clash(record.id, None)
                return True
            return False  # changed meanwhile: looked at again at the next try
        self._set_clash(record.id, "" if holder is None else f" (admin {holder.admin_url}, xDS {holder.xds_address})")
        return False

    def _set_clash(self, replica_id: str, holder: str | None) -> None:
        """Note a clash over this replica's id (`holder`: how the holder describes itself, or
        None: no clash), logging and recording its start and its end."""
        if holder is None:
            if self._clash is not None:
                self._clash = None
                self.events.record(
                    "store", f"replica {replica_id} registered in {self.where}: the clash is over", replica=replica_id
                )
            return
        message = (
            f"replica_id {replica_id!r} is held in {self.where} under another lease{holder}: another replica "
            f"runs with the same controlplane.store.replica_id, or this replica's previous run does until its "
            f"lease runs out ({LEASE_TTL}s); this replica's record and prober registrations are not written meanwhile"
        )
        if self._clash is None:
            log.warning("%s", message)
            self.events.record("store_clash", message, replica=replica_id)
        self._clash = message

    async def _load(self, client: Any) -> None:
        got = await client.get_prefix(self.keys.root.encode())
        if not any(kv.key.decode() == self.keys.topology for kv in got):
            await self._seed()
            got = await client.get_prefix(self.keys.root.encode())
        entries = [KeyValue(kv.key.decode(), kv.value, kv.mod_revision) for kv in got]
        self._replicas = {}
        self.probers.clear()
        for entry in entries:
            if entry.key.startswith(self.keys.replicas):
                self._replica_event(entry.key, entry.value)
            elif entry.key.startswith(self.keys.probers):
                self.probers.event(entry.key, True)
        self.reloads += 1
        applied = self._apply(self.sync.reload(entries, got.header.revision, self.sink.overrides))
        if applied or self.reloads == 1:
            self.events.record(
                "store",
                f"loaded {self.where}{self.keys.root} at revision {self.sync.revision}: {applied} changes applied",
                revision=self.sync.revision,
                applied=applied,
            )
        self._synced.set()
        self.on_probers()

    async def _seed(self) -> None:
        """An empty prefix gets this replica's fleet topology and pins, unless another replica's came first."""
        topology = self.sink.topology
        replica = self.describe().id
        who = f"replica {replica} (seeded from {topology.source or 'its topology'})"
        ops: list[tuple[str, bytes | None]] = [
            (self.keys.topology, encode_topology(topology, who=who, detail=f"seeded by replica {replica}"))
        ]
        ops += [(self.keys.override(c, e), encode_override(s, who=who)) for (c, e), s in self.sink.overrides().items()]
        create = rpc.Compare(
            key=self.keys.topology.encode(),
            result=rpc.Compare.EQUAL,
            target=rpc.Compare.CREATE,
            create_revision=0,
        )
        revision = await self._txn(ops, compare=[create])
        if revision:
            self.events.record(
                "store",
                f"{self.where}{self.keys.root} was empty: seeded with this replica's fleet topology",
                revision=revision,
            )

    def _went_down(self, reason: str) -> None:
        if self._down is None:
            self._down_since = time.time()
            self.events.record(
                "store",
                f"{self.where} unavailable ({reason}): serving the last state, operator changes refused",
                available=False,
                reason=reason,
            )
        was_up, self._down = self._down is None, reason
        if was_up:
            self.on_probers()  # the members come from this replica's links until etcd is back
        for waiter in self._waiters.values():
            if not waiter.done():
                waiter.set_exception(
                    StoreUnavailable(f"{self.where} became unavailable ({reason}) before the change applied here")
                )
        self._waiters.clear()

    def _went_up(self) -> None:
        if self._down is not None and self._was_up:
            self.events.record(
                "store", f"{self.where} available again: resynced at revision {self.sync.revision}", available=True
            )
        was_down, self._down = self._down is not None, None
        self._was_up = True
        if was_down:
            self.on_probers()  # the members come from etcd again

    async def _close_client(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.close(), 2)


def _op(key: str, value: bytes | None, lease: int = 0) -> Any:
    if value is None:
        return rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=key.encode()))
    return rpc.RequestOp(request_put=rpc.PutRequest(key=key.encode(), value=value, lease=lease))


async def push_topology(settings: EtcdSettings, topology: Topology, *, who: str, detail: str) -> int:
    """Write the fleet's part of a validated `topology` straight to etcd (and drop the pins of
    endpoints it no longer has), in one transaction; the revision. StoreUnavailable if etcd fails."""
    keys = Keys(settings.prefix)
    client = connect(settings)
    where = "etcd " + ",".join(_target(h, p) for h, p in settings.endpoints)
    try:
        pins = await client.get_prefix((keys.root + "overrides/").encode(), keys_only=True)
        ops = write_ops(keys, TopologyChange(topology, who, detail), orphans=[kv.key.decode() for kv in pins])
        request = rpc.TxnRequest(success=[_op(k, v) for k, v in ops])
        await client.connect()
        response = await client.kvstub.Txn(request, timeout=settings.timeout, metadata=client.metadata)
        return int(response.header.revision)
    except (rpc.AioRpcError, aetcd.ClientError, TimeoutError) as exc:
        raise StoreUnavailable(f"{where}: {describe(exc)}; nothing was pushed") from exc
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.close(), 2)

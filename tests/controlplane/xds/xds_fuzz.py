"""A seeded fuzzer for the ADS server: malformed and mutated DiscoveryRequests on real gRPC streams.

Used by tests/controlplane/xds/test_xds_fuzz.py (a few hundred inputs) and bench/fuzz_xds.py (as
many as asked). Every input is one stream: one or more raw messages written as bytes on the
ADS method, then a half-close. What is allowed back: the stream ends OK (the input was valid
enough), or with INVALID_ARGUMENT / RESOURCE_EXHAUSTED and a message. Anything else (INTERNAL,
UNKNOWN, a hang, a crash) is a finding. Meanwhile a well-behaved node keeps its stream and must
receive and ACK every push.

With `delta=True` the inputs are DeltaDiscoveryRequests (subscribe and unsubscribe lists,
initial_resource_versions, nonces never sent, error_detail) on `DeltaAggregatedResources`, and
the well-behaved node speaks delta too.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.rpc import status_pb2

from controlplane.snapshots import resources as rs
from lab.adsclient import AdsClient, AdsStream, DeltaAdsClient, DeltaAdsStream

METHOD = "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"
DELTA_METHOD = "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources"
ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}
TYPE_URLS = [*rs.ADS_ORDER, "", "type.googleapis.com/", "type.googleapis.com/envoy.config.cluster.v2.Cluster", "*"]


def _text(rng: random.Random, n: int) -> str:
    alphabet = "abcXYZ019._-/*:  \t\n\x00é中\U0001f600"
    return "".join(rng.choice(alphabet) for _ in range(n))


def _absurd_string(rng: random.Random) -> str:
    return rng.choice(
        [
            "",
            "0",
            "-1",
            str(2**64),
            "9" * rng.randint(10, 200),
            _text(rng, rng.randint(1, 50)),
            "x" * rng.choice([1000, 5000, 20_000]),
            "\x00\x01\x02",
        ]
    )


def valid_request(rng: random.Random, *, node: bool = True) -> discovery_pb2.DiscoveryRequest:
    request = discovery_pb2.DiscoveryRequest(type_url=rng.choice(rs.ADS_ORDER))
    if node:
        request.node.CopyFrom(base_pb2.Node(id=f"fuzz-{rng.randrange(1_000_000)}", cluster="fuzz"))
    if request.type_url == rs.ENDPOINT:
        request.resource_names.append("web")
    return request


def random_request(rng: random.Random) -> discovery_pb2.DiscoveryRequest:
    request = discovery_pb2.DiscoveryRequest()
    if rng.random() < 0.8:
        request.node.id = rng.choice(["", "n", _absurd_string(rng), f"fuzz-{rng.randrange(1000)}"])
        if rng.random() < 0.3:
            request.node.cluster = _absurd_string(rng)
        if rng.random() < 0.2:
            request.node.locality.zone = _absurd_string(rng)
    request.type_url = rng.choice([*TYPE_URLS, _absurd_string(rng)])
    kind = rng.random()
    if kind < 0.1:  # huge name lists, up to and over the server's cap
        request.resource_names.extend(f"n{i}" for i in range(rng.choice([10_000, 100_001, 150_000])))
    elif kind < 0.6:
        request.resource_names.extend(_absurd_string(rng) for _ in range(rng.randint(0, 20)))
    request.version_info = _absurd_string(rng)
    request.response_nonce = _absurd_string(rng)
    if rng.random() < 0.3:
        request.error_detail.CopyFrom(status_pb2.Status(code=rng.randint(-5, 20), message=_absurd_string(rng)))
    return request


def mutate(rng: random.Random, data: bytes) -> bytes:
    """Flip, drop, insert or duplicate a few bytes of a serialized message."""
    buf = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        op = rng.randrange(4)
        pos = rng.randrange(len(buf) + 1)
        if op == 0 and buf and pos < len(buf):
            buf[pos] ^= 1 << rng.randrange(8)
        elif op == 1 and buf and pos < len(buf):
            del buf[pos : pos + rng.randint(1, 4)]
        elif op == 2:
            buf[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 6)))
        else:
            buf[pos:pos] = buf[max(0, pos - 8) : pos]
    return bytes(buf)


def valid_delta_request(rng: random.Random, *, node: bool = True) -> discovery_pb2.DeltaDiscoveryRequest:
    request = discovery_pb2.DeltaDiscoveryRequest(type_url=rng.choice(rs.ADS_ORDER))
    if node:
        request.node.CopyFrom(base_pb2.Node(id=f"fuzz-{rng.randrange(1_000_000)}", cluster="fuzz"))
    if request.type_url in (rs.ENDPOINT, rs.ROUTE):
        request.resource_names_subscribe.append(rng.choice(["web", "ingress", "missing"]))
    elif rng.random() < 0.3:
        request.resource_names_subscribe.append("*")
    return request


def random_delta_request(rng: random.Random) -> discovery_pb2.DeltaDiscoveryRequest:
    request = discovery_pb2.DeltaDiscoveryRequest()
    if rng.random() < 0.8:
        request.node.id = rng.choice(["", "n", _absurd_string(rng), f"fuzz-{rng.randrange(1000)}"])
        if rng.random() < 0.3:
            request.node.cluster = _absurd_string(rng)
    request.type_url = rng.choice([*TYPE_URLS, _absurd_string(rng)])
    kind = rng.random()
    names = ["*", "web", "api", "ingress", ""]
    if kind < 0.1:  # huge lists, up to and over the server's cap
        n = rng.choice([10_000, 100_001, 150_000])
        field_name = rng.choice(["subscribe", "unsubscribe", "initial"])
        if field_name == "initial":
            request.initial_resource_versions.update({f"n{i}": "v" for i in range(n)})
        else:
            getattr(request, f"resource_names_{field_name}").extend(f"n{i}" for i in range(n))
    elif kind < 0.7:
        request.resource_names_subscribe.extend(
            rng.choice([*names, _absurd_string(rng)]) for _ in range(rng.randint(0, 8))
        )
        request.resource_names_unsubscribe.extend(
            rng.choice([*names, _absurd_string(rng)]) for _ in range(rng.randint(0, 8))
        )
        for _ in range(rng.randint(0, 5)):
            request.initial_resource_versions[rng.choice([*names, _absurd_string(rng)])] = _absurd_string(rng)
    request.response_nonce = _absurd_string(rng)
    if rng.random() < 0.3:
        request.error_detail.CopyFrom(status_pb2.Status(code=rng.randint(-5, 20), message=_absurd_string(rng)))
    return request


def one_delta_input(rng: random.Random) -> tuple[str, list[bytes]]:
    """(category, messages) for one delta stream."""
    category = rng.choice(["bytes", "random", "mutated", "valid-then-bad", "valid-then-random", "unsubscribed"])
    if category == "bytes":
        return category, [rng.randbytes(rng.choice([0, 1, 5, 50, 500, 5000]))]
    if category == "random":
        return category, [random_delta_request(rng).SerializeToString()]
    if category == "mutated":
        return category, [mutate(rng, valid_delta_request(rng).SerializeToString())]
    first = valid_delta_request(rng).SerializeToString()
    if category == "valid-then-bad":
        return category, [first, rng.randbytes(rng.randint(1, 300))]
    if category == "valid-then-random":
        return category, [first, random_delta_request(rng).SerializeToString()]
    # A valid node, then requests that ACK or NACK nonces it was never sent, and change subscriptions.
    follow = valid_delta_request(rng, node=False)
    follow.response_nonce = _absurd_string(rng)
    follow.resource_names_unsubscribe.append(rng.choice(["*", "web", _absurd_string(rng)]))
    if rng.random() < 0.5:
        follow.error_detail.CopyFrom(status_pb2.Status(code=3, message=_absurd_string(rng)))
    return category, [first, follow.SerializeToString()]


def one_input(rng: random.Random) -> tuple[str, list[bytes]]:
    """(category, messages) for one stream."""
    category = rng.choice(["bytes", "random", "mutated", "valid-then-bad", "valid-then-random", "unsubscribed"])
    if category == "bytes":
        return category, [rng.randbytes(rng.choice([0, 1, 5, 50, 500, 5000]))]
    if category == "random":
        return category, [random_request(rng).SerializeToString()]
    if category == "mutated":
        return category, [mutate(rng, valid_request(rng).SerializeToString())]
    first = valid_request(rng).SerializeToString()
    if category == "valid-then-bad":
        return category, [first, rng.randbytes(rng.randint(1, 300))]
    if category == "valid-then-random":
        return category, [first, random_request(rng).SerializeToString()]
    # A valid node, then requests that ACK or NACK nonces it was never sent.
    follow = valid_request(rng, node=False)
    follow.response_nonce = _absurd_string(rng)
    follow.version_info = _absurd_string(rng)
    return category, [first, follow.SerializeToString()]


@dataclass
class FuzzReport:
    inputs: int = 0
    codes: Counter[str] = field(default_factory=Counter)
    categories: Counter[str] = field(default_factory=Counter)
    findings: list[str] = field(default_factory=list)
    healthy_pushes: int = 0


async def send_input(
    channel: grpc.aio.Channel, messages: list[bytes], limit: float = 20.0, *, method: str = METHOD
) -> tuple[grpc.StatusCode, str]:
    """One stream with these raw messages; its final status and details."""
    call = channel.stream_stream(method, request_serializer=None, response_deserializer=None)()
    try:
        async with asyncio.timeout(limit):
            for message in messages:
                await call.write(message)
            await call.done_writing()
            while await call.read() is not grpc.aio.EOF:
                pass
            return await call.code(), await call.details() or ""
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or ""
    except TimeoutError:
        call.cancel()
        return grpc.StatusCode.DEADLINE_EXCEEDED, f"no final status within {limit:.0f} s"


class HealthyNode:
    """A well-behaved ADS client: subscribes to EDS for `web` and ACKs every response."""

    def __init__(self, channel: grpc.aio.Channel, node_id: str = "healthy", *, delta: bool = False) -> None:
        from envoy.service.discovery.v3 import ads_pb2_grpc

        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
        node = base_pb2.Node(id=node_id, cluster="fuzz")
        self.client: Any = DeltaAdsClient(node) if delta else AdsClient(node)
        self.stream: Any = DeltaAdsStream(stub, self.client) if delta else AdsStream(stub, self.client)
        self.delta = delta
        self.node_id = node_id
        self.versions: list[str] = []
        self.changed = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.stream.send(self.client.subscribe(rs.ENDPOINT, ["web"]))
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        try:
            while (response := await self.stream.read()) is not None:
                await self.stream.send(self.client.ack(response))
                self.versions.append(response.system_version_info if self.delta else response.version_info)
                self.changed.set()
        finally:
            self.changed.set()  # a waiter sees the stream end at once rather than at its deadline

    async def wait_version(self, version: str, limit: float = 20.0) -> None:
        async with asyncio.timeout(limit):
            while version not in self.versions:
                if self.task is not None and self.task.done():
                    raise AssertionError(f"the healthy stream ended: {self.task.exception()!r}")
                self.changed.clear()
                await self.changed.wait()

    async def aclose(self) -> None:
        self.stream.cancel()
        if self.task is not None:
            await asyncio.gather(self.task, return_exceptions=True)


async def fuzz(
    channel: grpc.aio.Channel,
    healthy: HealthyNode,
    push: Callable[[], str],
    *,
    count: int,
    seed: int,
    concurrency: int = 16,
    push_every: int = 50,
    progress: Callable[[FuzzReport], Any] | None = None,
    delta: bool = False,
) -> FuzzReport:
    """Send `count` inputs, `concurrency` at a time; every `push_every`, the healthy node must get a push."""
    rng = random.Random(seed)
    make_input, method = (one_delta_input, DELTA_METHOD) if delta else (one_input, METHOD)
    report = FuzzReport()
    sent = 0
    while sent < count:
        batch = [make_input(rng) for _ in range(min(concurrency, count - sent))]
        results = await asyncio.gather(*(send_input(channel, messages, method=method) for _, messages in batch))
        for (category, messages), (code, details) in zip(batch, results, strict=True):
            report.inputs += 1
            report.categories[category] += 1
            report.codes[code.name] += 1
            if code not in ALLOWED or (code is not grpc.StatusCode.OK and not details):
                sizes = [len(m) for m in messages]
                report.findings.append(f"#{report.inputs} {category} sizes {sizes}: {code.name} {details!r}")
        before = sent // push_every
        sent += len(batch)
        if sent // push_every != before or sent >= count:
            await healthy.wait_version(push())
            report.healthy_pushes += 1
            if progress is not None:
                progress(report)
    return report

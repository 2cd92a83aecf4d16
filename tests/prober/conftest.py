"""Fixtures of the prober tests: real backends on 127.0.0.1 and a NetworkChecker."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from prober.checks import NetworkChecker
from tests.prober.backends import GrpcHealthBackend, HttpBackend


@pytest.fixture
async def http_backend() -> AsyncIterator[HttpBackend]:
    backend = await HttpBackend().start()
    try:
        yield backend
    finally:
        await backend.stop()


@pytest.fixture
async def grpc_backend() -> AsyncIterator[GrpcHealthBackend]:
    backend = await GrpcHealthBackend().start()
    try:
        yield backend
    finally:
        await backend.stop()


@pytest.fixture
async def checker() -> AsyncIterator[NetworkChecker]:
    c = NetworkChecker()
    try:
        yield c
    finally:
        await c.aclose()

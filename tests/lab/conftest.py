"""Fixtures shared by the lab tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from lab.demoapp import DemoApp


@pytest.fixture
async def demo() -> AsyncIterator[DemoApp]:
    app = DemoApp("demo-1")
    await app.start("127.0.0.1", 0)
    try:
        yield app
    finally:
        await app.stop()

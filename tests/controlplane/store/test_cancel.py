"""A cancel that asyncio loses on the way still ends the etcd store's tasks (raise_if_cancelling).

No etcd here: the loss is Python's own. On 3.11, `asyncio.wait_for` returns the inner result when
the inner awaitable finishes in the same loop step as the cancel arrives (aetcd awaits it in
`connect()` and in a watch's setup); a store task that so lost its cancel ran on, and the
replica's `aclose()` waited for it.
"""

from __future__ import annotations

import asyncio
import sys

import pytest

from controlplane.store.etcd import raise_if_cancelling


async def test_a_cancel_lost_inside_wait_for_still_ends_the_task() -> None:
    event = asyncio.Event()
    reached: list[str] = []

    async def body() -> None:
        await asyncio.wait_for(event.wait(), 10)
        reached.append("after wait_for")
        raise_if_cancelling()
        reached.append("after the check")

    task = asyncio.create_task(body())
    await asyncio.sleep(0)  # the body waits in wait_for
    event.set()  # the inner wait finishes in the same loop step as ...
    task.cancel()  # ... the cancel arrives
    with pytest.raises(asyncio.CancelledError):
        await task
    assert "after the check" not in reached
    if sys.version_info < (3, 12):
        assert reached == ["after wait_for"], "Python 3.11's wait_for dropped the cancel, as it does"


async def test_a_task_not_cancelled_goes_on() -> None:
    async def body() -> str:
        await asyncio.sleep(0)
        raise_if_cancelling()
        return "went on"

    assert await asyncio.create_task(body()) == "went on"

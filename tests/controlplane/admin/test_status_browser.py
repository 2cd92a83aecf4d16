"""The HTML status page in a real headless browser (Debian's chromium), driven over the DevTools protocol.

The page is loaded once; after an override the test only watches the DOM: the row changes
because the page refreshes itself.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from lab.envoyproc import poll_until
from tests.controlplane.admin.test_admin import Admin
from tests.controlplane.admin.test_admin_api import admin  # noqa: F401  (the fixture)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium on PATH (.ci/run installs Debian's chromium; apt-get install chromium)"
)


class Browser:
    """One headless chromium and a DevTools websocket to its first page."""

    def __init__(self, process: asyncio.subprocess.Process, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.process, self.ws = process, ws
        self._ids = itertools.count(1)

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        message_id = next(self._ids)
        await self.ws.send_json({"id": message_id, "method": method, "params": params})
        while True:
            reply = await asyncio.wait_for(self.ws.receive_json(), 10)
            if reply.get("id") == message_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return dict(reply.get("result", {}))

    async def evaluate(self, expression: str) -> Any:
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")


@pytest.fixture
async def browser(tmp_path: Path) -> AsyncIterator[Browser]:
    assert CHROMIUM is not None
    profile = tmp_path / "chromium"
    process = await asyncio.create_subprocess_exec(
        CHROMIUM,
        "--headless",
        "--no-sandbox",  # tests may run as root in CI containers
        "--disable-gpu",
        "--no-first-run",
        "--remote-debugging-address=127.0.0.1",
        "--remote-debugging-port=0",
        f"--user-data-dir={profile}",
        "about:blank",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    port_file = profile / "DevToolsActivePort"
    try:

        async def devtools_port() -> int | None:
            if process.returncode is not None:
                raise RuntimeError(f"chromium exited with {process.returncode}")
            lines = port_file.read_text().splitlines() if port_file.exists() else []
            return int(lines[0]) if lines and lines[0].isdigit() else None

        port = await poll_until(devtools_port, timeout=30, what="chromium's DevTools port")
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/json/list") as r:
                pages = [t for t in await r.json() if t["type"] == "page"]
            async with session.ws_connect(pages[0]["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                yield Browser(process, ws)
    finally:
        if process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), 10)
            except TimeoutError:
                process.kill()
                await process.wait()


ROWS = """JSON.stringify(Array.from(document.querySelectorAll('#endpoints tbody tr')).map(r => ({
  endpoint: r.dataset.endpoint, cluster: r.dataset.cluster,
  status: r.querySelector('td.status').textContent,
  color: getComputedStyle(r.querySelector('td.status')).backgroundColor})))"""


async def test_status_page_shows_every_endpoint_and_refreshes_itself(admin: Admin, browser: Browser) -> None:  # noqa: F811
    url = f"http://127.0.0.1:{admin.cp.admin_port}/status?refresh=1"
    await browser.call("Page.navigate", url=url)

    async def rows() -> list[dict[str, str]] | None:
        text = await browser.evaluate(ROWS)
        found: list[dict[str, str]] = json.loads(text) if text else []
        return found or None

    first = await poll_until(rows, timeout=10, what="the status table rendered")
    assert [(r["cluster"], r["endpoint"], r["status"]) for r in first] == [
        ("web", "127.0.0.1:8081", "UNKNOWN"),
        ("web", "127.0.0.1:8082", "UNKNOWN"),
        ("api", "10.0.0.1:80", "UNKNOWN"),
    ]
    assert await browser.evaluate("document.title") == "healthplane status"

    code, _ = await admin.call("POST", "/endpoints/web/127.0.0.1:8082/override", json={"status": "UNHEALTHY"})
    assert code == 200

    async def updated() -> dict[str, str] | None:
        current = await rows()
        row = next((r for r in current or [] if r["endpoint"] == "127.0.0.1:8082"), None)
        return row if row is not None and row["status"] == "UNHEALTHY" else None

    row = await poll_until(updated, timeout=10, what="the page to refresh itself and show UNHEALTHY")
    assert row["color"] == "rgb(255, 187, 187)"  # the red of tr.unhealthy td.status
    assert admin.cp.snapshot.version in (await browser.evaluate("document.getElementById('version').textContent"))

"""Watch the topology file and call back when its content changes.

Polling (stat, then a hash when the stat moved) rather than inotify: it works the same on every
filesystem, including bind mounts and editors that replace the file by renaming.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

log = logging.getLogger("healthplane.watch")

Fingerprint = tuple[tuple[int, int, int], str]


def _fingerprint(path: Path, last: Fingerprint | None = None) -> Fingerprint | None:
    """(stat key, content hash); the hash is only recomputed when the stat key moved."""
    try:
        st = path.stat()
        key = (st.st_mtime_ns, st.st_size, st.st_ino)
        if last is not None and key == last[0]:
            return last
        return key, hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None  # mid-rename or deleted: keep serving, look again next time


async def watch_file(path: Path, interval: float, on_change: Callable[[], Awaitable[None] | None]) -> None:
    """Call `on_change` each time the content of `path` changes; runs until cancelled.

    Nothing `on_change` raises ends the watch: it is logged, and the next edit is looked at as usual.
    """
    last = _fingerprint(path)
    while True:
        await asyncio.sleep(interval)
        current = _fingerprint(path, last)
        if current is None or current is last:
            continue
        changed = last is None or current[1] != last[1]
        last = current
        if changed:
            log.info("topology file %s changed", path)
            try:
                result = on_change()
                if result is not None:
                    await result
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("handling the change of %s failed; still watching", path)

"""Watch the topology file and call back when its content changes.

Polling (stat, then a hash when the stat moved) rather than inotify: it works the same on every
filesystem, including bind mounts and editors that replace the file by renaming.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("healthplane.watch")


def _fingerprint(path: Path) -> tuple[tuple[int, int, int], str] | None:
    try:
        st = path.stat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino), digest


async def watch_file(path: Path, interval: float, on_change: Callable[[], None]) -> None:
    """Call `on_change` each time the content of `path` changes; runs until cancelled."""
    last = _fingerprint(path)
    while True:
        await asyncio.sleep(interval)
        try:
            st = path.stat()
            stat_key = (st.st_mtime_ns, st.st_size, st.st_ino)
        except OSError:
            continue  # mid-rename or deleted: keep serving, look again next time
        if last is not None and stat_key == last[0]:
            continue
        current = _fingerprint(path)
        if current is None:
            continue
        if last is None or current[1] != last[1]:
            log.info("topology file %s changed", path)
            last = current
            on_change()
        else:
            last = current

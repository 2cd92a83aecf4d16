"""Framed messages over the main<->worker socket: a 4-byte length, then a pickled message.

The socket is a private `socketpair` between the main process and a worker it started, so the
messages are trusted. Writes never block: they go to the transport's buffer, and the main process
watches that buffer (`buffered`) to tell a worker that stopped reading from one that is busy.
"""

from __future__ import annotations

import asyncio
import struct
from typing import Any

from controlplane.xds.workers.wire import dumps, loads

_LENGTH = struct.Struct("!I")
MAX_FRAME = 1 << 30


class Channel:
    """One end of the main<->worker socket."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    def send(self, message: Any) -> None:
        self.send_bytes(dumps(message))

    def send_bytes(self, data: bytes) -> None:
        """Queue one encoded message (the same bytes may go to every worker)."""
        if not self.writer.is_closing():
            self.writer.write(_LENGTH.pack(len(data)))
            self.writer.write(data)

    async def receive(self) -> Any:
        """The next message; EOFError when the other end is gone."""
        try:
            header = await self.reader.readexactly(_LENGTH.size)
            (length,) = _LENGTH.unpack(header)
            if length > MAX_FRAME:
                raise EOFError(f"frame of {length} bytes")
            return loads(await self.reader.readexactly(length))
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            raise EOFError("the other end closed the channel") from exc

    @property
    def buffered(self) -> int:
        """Bytes written but not yet taken by the other end."""
        transport = self.writer.transport
        return 0 if transport.is_closing() else transport.get_write_buffer_size()

    async def drain(self) -> None:
        await self.writer.drain()

    def close(self) -> None:
        self.writer.close()

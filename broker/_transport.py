"""Byte streams under one interface: TCP (plain or TLS) and WebSocket.

The broker writes from synchronous callbacks (a PUBACK after a store commit), so these
are synchronous to write and asynchronous only to read (aMQTT's adapters, which we no
longer use, made every write awaitable and buffered WebSocket reads per call).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Protocol

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from fieldchat.broker._amqtt import abort_websocket

__all__ = ["TcpTransport", "Transport", "WsTransport"]

log = logging.getLogger(__name__)

_READ_SIZE = 65_536  # one read hands every complete packet in it to the decoder


class Transport(Protocol):
    """What a connection needs of its byte stream.

    ``read`` returns what arrived (one ``recv()`` or WebSocket frame), ``b""`` at end
    of stream; the connection feeds it to its :class:`schemas.mqtt.Decoder`.
    ``host`` is the peer's address without the port (the per-address limits).
    """

    peer: str
    host: str

    async def read(self) -> bytes: ...

    def write(self, data: bytes) -> None: ...

    def buffered(self) -> int:
        """Bytes written but not yet handed to the kernel."""
        ...

    def abort(self) -> None:
        """Close now, dropping anything unsent."""
        ...

    def close(self) -> None:
        """Close after sending what is buffered."""
        ...

    async def wait_closed(self) -> None: ...


class TcpTransport:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._transport = writer.transport
        peer = writer.get_extra_info("peername")
        self.host = str(peer[0]) if isinstance(peer, tuple) else "?"
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "?"

    async def read(self) -> bytes:
        return await self._reader.read(_READ_SIZE)

    def write(self, data: bytes) -> None:
        if not self._transport.is_closing():
            self._transport.write(data)

    def buffered(self) -> int:
        return self._transport.get_write_buffer_size()

    def abort(self) -> None:
        self._transport.abort()

    def close(self) -> None:
        self._writer.close()

    async def wait_closed(self) -> None:
        with contextlib.suppress(OSError, asyncio.CancelledError):
            await self._writer.wait_closed()


class WsTransport:
    """MQTT over WebSocket (binary frames; a frame may hold parts of packets, MQTT §6)."""

    def __init__(self, ws: ServerConnection) -> None:
        self._ws = ws
        self._out = bytearray()
        self._flushing: asyncio.Task[None] | None = None
        addr = ws.remote_address
        self.host = str(addr[0]) if isinstance(addr, tuple) else "?"
        self.peer = f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) else "?"

    async def read(self) -> bytes:
        try:
            frame = await self._ws.recv()
        except ConnectionClosed:
            return b""
        if isinstance(frame, str):  # MQTT-6.0.0-1: binary frames only
            return b""
        return frame

    def write(self, data: bytes) -> None:
        self._out += data
        if self._flushing is None or self._flushing.done():
            self._flushing = asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        while self._out:
            data, self._out = bytes(self._out), bytearray()
            try:
                await self._ws.send(data)
            except ConnectionClosed:
                self._out.clear()
                return

    def buffered(self) -> int:
        return len(self._out)

    def abort(self) -> None:
        self._out.clear()
        abort_websocket(self._ws)

    def close(self) -> None:
        asyncio.get_running_loop().create_task(self._close())

    async def _close(self) -> None:
        if self._flushing is not None:
            with contextlib.suppress(Exception):
                await self._flushing
        with contextlib.suppress(Exception):
            await self._ws.close()

    async def wait_closed(self) -> None:
        with contextlib.suppress(Exception):
            await self._ws.wait_closed()

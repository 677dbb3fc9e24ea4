"""The broker's servers: TCP, TLS and WebSocket listeners handing each socket to a handler.

Ours since issue 15 (before, a subclass of aMQTT's ``Broker`` whose overrides created
these same servers; aMQTT still makes the TLS context, :mod:`fieldchat.broker._amqtt`). Binding
maps "address in use" to :class:`PortInUse` and closes the listeners that did bind,
instead of running half-started. The TLS and WebSocket handshakes time out after
``connect_timeout_s``; a WebSocket frame above ``max_packet_bytes`` (plus a little) is
refused by ``websockets`` before it is buffered.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import errno
import logging
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import websockets
import websockets.asyncio.server
from websockets.asyncio.server import ServerConnection

from fieldchat.broker._config import Limits
from fieldchat.broker._errors import BrokerError, PortInUse
from fieldchat.broker._transport import TcpTransport, Transport, WsTransport

__all__ = ["Kind", "Listener", "Listeners"]

log = logging.getLogger("broker")

_WS_FRAME_SLACK = 16  # a WebSocket frame's own header, above the MQTT packet it carries
_CLOSE_TIMEOUT_S = 5.0

Handler = Callable[[Transport], Awaitable[None]]


class Kind(enum.StrEnum):
    TCP = "tcp"
    WS = "ws"


@dataclass(frozen=True)
class Listener:
    """One listener: ``port`` 0 picks an ephemeral one; ``tls`` makes it TLS (or WSS)."""

    name: str
    kind: Kind
    host: str
    port: int
    tls: ssl.SSLContext | None = None


class Listeners:
    """The running servers and the tasks serving their sockets."""

    def __init__(self, handler: Handler, limits: Limits) -> None:
        self._handler = handler
        self._limits = limits
        self._servers: dict[str, asyncio.Server | websockets.asyncio.server.Server] = {}
        self._tasks: set[asyncio.Task[Any]] = set()

    async def start(self, listeners: list[Listener]) -> None:
        """Bind every listener, or none.

        Raises:
            PortInUse: a port is taken (the listeners that did bind are closed).
            BrokerError: another bind failure.
        """
        try:
            for listener in listeners:
                self._servers[listener.name] = await self._bind(listener)
                log.debug("listener %s bound to port %s", listener.name, self.port(listener.name))
        except BaseException:
            await self.close()
            raise

    async def _bind(self, listener: Listener) -> asyncio.Server | websockets.asyncio.server.Server:
        limits = self._limits
        host = listener.host or None  # "": every interface
        try:
            if listener.kind is Kind.WS:
                return await websockets.serve(
                    self._serve_ws,
                    host,
                    listener.port,
                    ssl=listener.tls,
                    subprotocols=[websockets.Subprotocol("mqtt")],
                    max_size=limits.max_packet_bytes + _WS_FRAME_SLACK,
                    open_timeout=limits.connect_timeout_s,
                )
            return await asyncio.start_server(
                self._serve_tcp,
                host,
                listener.port,
                ssl=listener.tls,
                ssl_handshake_timeout=limits.connect_timeout_s if listener.tls else None,
            )
        except OSError as exc:
            name, port = listener.name, listener.port
            if exc.errno == errno.EADDRINUSE:
                raise PortInUse(
                    f"{name} listener: {host}:{port} is already in use by another "
                    "process (on this machine Mosquitto holds 1883); pass --port with a free "
                    "port, or 0 for any"
                ) from exc
            raise BrokerError(f"{name} listener cannot bind {host}:{port}: {exc}") from exc

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self._serve(TcpTransport(reader, writer))

    async def _serve_ws(self, websocket: ServerConnection) -> None:
        await self._serve(WsTransport(websocket))

    async def _serve(self, transport: TcpTransport | WsTransport) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._handler(transport)
        except asyncio.CancelledError:
            raise
        except Exception:  # a connection's bug must not take the broker down
            log.exception("connection from %s failed", transport.peer)
            transport.abort()
        finally:
            self._tasks.discard(task)

    async def close(self) -> None:
        """Stop accepting: close every server (waiting at most 5 s for each)."""
        servers = list(self._servers.values())
        self._servers.clear()
        for server in servers:
            server.close()
        for server in servers:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(_CLOSE_TIMEOUT_S):
                    await server.wait_closed()

    async def drain(self, timeout: float) -> None:
        """Wait (at most ``timeout``) for the sockets' handlers to finish."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout)

    def port(self, name: str) -> int | None:
        """The bound port of listener ``name`` (None: not running)."""
        server = self._servers.get(name)
        if server is None:
            return None
        for sock in server.sockets:
            return int(sock.getsockname()[1])
        return None

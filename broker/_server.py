"""The embedded broker: aMQTT's listeners feeding fieldchat's router.

aMQTT 0.12.1 (pinned) provides the listener configuration, the TCP/TLS servers, the
WebSocket server (``websockets``) and the TLS context. Its session router is where
the defects of issue 3 live (authentication after takeover, retained replay
without ACL, no keep-alive, lost in-flight messages, unbounded and unpersisted
queues), so :class:`_Listeners` overrides the connection entry points
(``stream_connected``, ``ws_connected``) to hand every socket to
:class:`~broker._connection.Connection`, and ``start``/``shutdown`` so that the
aMQTT broadcast loop and session monitor (unused) are not started. Creating a
server maps "address in use" to :class:`PortInUse` and closes the listeners that
did bind, instead of logging and running on half-started.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import ssl
from typing import Any

import websockets
import websockets.asyncio.server
from amqtt.broker import Broker as _AmqttBroker
from amqtt.contexts import ListenerType
from websockets.asyncio.server import ServerConnection

from broker._config import BrokerConfig
from broker._connection import Connection
from broker._errors import BrokerError, PortInUse
from broker._metrics import Metrics, serve_metrics
from broker._router import Router
from broker._store import Store
from broker._transport import TcpTransport, WsTransport

__all__ = ["EmbeddedBroker"]

log = logging.getLogger("broker")

_ADMIN_POLL_S = 1.0
_WS_FRAME_SLACK = 16


class _Listeners(_AmqttBroker):  # type: ignore[misc]
    def __init__(self, router: Router, listeners: dict[str, Any]) -> None:
        super().__init__({"listeners": listeners, "plugins": {}})
        self._router = router
        self._handlers: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        self.transitions.start()
        try:
            await self._start_listeners()
        except BaseException:
            await self._close_servers()
            self.transitions.starting_fail()
            raise
        self.transitions.starting_success()

    async def shutdown(self) -> None:
        self.transitions.shutdown()
        await self._close_servers()
        for conn in list(self._router.connections):
            conn.kick("shutdown")
        if self._handlers:
            await asyncio.wait(list(self._handlers), timeout=5)
        self.transitions.stopping_success()

    async def _close_servers(self) -> None:
        for server in self._servers.values():
            server.instance.close()
        for server in self._servers.values():
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5):
                    await server.instance.wait_closed()
        self._servers.clear()

    async def _create_server_instance(
        self,
        listener_name: str,
        listener_type: ListenerType,
        address: str | None,
        port: int,
        ssl_context: ssl.SSLContext | None,
    ) -> asyncio.Server | websockets.asyncio.server.Server:
        limits = self._router.limits
        try:
            if listener_type == ListenerType.WS:
                return await websockets.serve(
                    lambda ws: self.ws_connected(ws, listener_name),
                    address,
                    port,
                    ssl=ssl_context,
                    subprotocols=[websockets.Subprotocol("mqtt")],
                    max_size=limits.max_packet_bytes + _WS_FRAME_SLACK,
                    open_timeout=limits.connect_timeout_s,
                )
            return await asyncio.start_server(
                lambda r, w: self.stream_connected(r, w, listener_name),
                address,
                port,
                ssl=ssl_context,
                ssl_handshake_timeout=limits.connect_timeout_s if ssl_context else None,
            )
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise PortInUse(
                    f"{listener_name} listener: {address}:{port} is already in use by another "
                    "process (on this machine Mosquitto holds 1883); pass --port with a free "
                    "port, or 0 for any"
                ) from exc
            raise BrokerError(
                f"{listener_name} listener cannot bind {address}:{port}: {exc}"
            ) from exc

    async def stream_connected(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        listener_name: str,  # noqa: ARG002 - aMQTT signature
    ) -> None:
        await self._serve(TcpTransport(reader, writer))

    async def ws_connected(
        self,
        websocket: ServerConnection,
        listener_name: str,  # noqa: ARG002 - aMQTT signature
    ) -> None:
        await self._serve(WsTransport(websocket))

    async def _serve(self, transport: TcpTransport | WsTransport) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            await Connection(self._router, transport).run()
        except asyncio.CancelledError:
            raise
        except Exception:  # a connection's bug must not take the broker down
            log.exception("connection from %s failed", transport.peer)
            transport.abort()
        finally:
            self._handlers.discard(task)

    def bound_port(self, listener_name: str) -> int | None:
        server = self._servers.get(listener_name)
        if server is None:
            return None
        for sock in server.instance.sockets:
            return int(sock.getsockname()[1])
        return None


class EmbeddedBroker:
    """The hardened broker, in-process.

    ``async with EmbeddedBroker(config) as broker:`` starts the listeners (read the
    bound ports from :attr:`port`, :attr:`tls_port`, :attr:`ws_port`) and stops them
    on exit, writing pending state to ``config.data_dir``. The admin methods act on
    the store and take effect at once (a revoked client is disconnected).

    Raises:
        PortInUse: from :meth:`start` when a listener's port is taken.
        BrokerError: another listener failure.
        ConfigError: the data directory or database cannot be used.
    """

    def __init__(self, config: BrokerConfig) -> None:
        self.config = config
        self.metrics = Metrics()
        self._router: Router | None = None
        self._listeners: _Listeners | None = None
        self._metrics_server: asyncio.Server | None = None
        self._poller: asyncio.Task[None] | None = None
        self._admin: Store | None = None

    async def __aenter__(self) -> EmbeddedBroker:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        config = self.config
        router = Router(config, self.metrics)
        router.open(loop)
        self._router = router
        self._admin = Store(config.db_path)
        listeners: dict[str, Any] = {
            "default": {"type": "tcp", "bind": f"{config.host}:{config.port}"}
        }
        if config.tls is not None:
            tls = {
                "ssl": True,
                "certfile": str(config.tls.certfile),
                "keyfile": str(config.tls.keyfile),
            }
            listeners["tls"] = {"type": "tcp", "bind": f"{config.host}:{config.tls.port}", **tls}
        if config.ws_port is not None:
            listeners["ws"] = {"type": "ws", "bind": f"{config.host}:{config.ws_port}"}
            if config.ws_tls:
                if config.tls is None:
                    await self._close_state()
                    raise BrokerError("ws_tls needs the tls certificate options")
                listeners["ws"].update(
                    ssl=True, certfile=str(config.tls.certfile), keyfile=str(config.tls.keyfile)
                )
        try:
            self._listeners = _Listeners(router, listeners)
            await self._listeners.start()
            if config.metrics_port is not None:
                self._metrics_server = await serve_metrics(
                    self.metrics, config.host, config.metrics_port
                )
        except BaseException:
            if self._listeners is not None:
                await self._listeners._close_servers()
            self._listeners = None
            await self._close_state()
            raise
        self._poller = loop.create_task(self._poll_admin_changes())
        log.info("broker listening on %s", ", ".join(self.urls()))

    async def stop(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
            self._poller = None
        if self._metrics_server is not None:
            self._metrics_server.close()
            await self._metrics_server.wait_closed()
            self._metrics_server = None
        if self._listeners is not None:
            await self._listeners.shutdown()
            self._listeners = None
        await self._close_state()

    async def _close_state(self) -> None:
        if self._router is not None:
            await asyncio.to_thread(self._router.close)
            self._router = None
        if self._admin is not None:
            self._admin.close()
            self._admin = None

    async def _poll_admin_changes(self) -> None:
        while True:
            await asyncio.sleep(_ADMIN_POLL_S)
            try:
                self.router.reload()
            except Exception:  # the long-running loop logs and keeps serving
                log.exception("reloading accounts failed")

    # addresses ---------------------------------------------------------------------

    @property
    def router(self) -> Router:
        if self._router is None:
            raise BrokerError("the broker is not running")
        return self._router

    def _port(self, name: str) -> int | None:
        return self._listeners.bound_port(name) if self._listeners is not None else None

    @property
    def port(self) -> int:
        port = self._port("default")
        if port is None:
            raise BrokerError("the broker is not running")
        return port

    @property
    def tls_port(self) -> int | None:
        return self._port("tls")

    @property
    def ws_port(self) -> int | None:
        return self._port("ws")

    @property
    def metrics_port(self) -> int | None:
        if self._metrics_server is None:
            return None
        return int(self._metrics_server.sockets[0].getsockname()[1])

    def urls(self) -> list[str]:
        host = self.config.host
        out = [f"mqtt://{host}:{self.port}"]
        if self.tls_port is not None:
            out.append(f"mqtts://{host}:{self.tls_port}")
        if self.ws_port is not None:
            out.append(f"{'wss' if self.config.ws_tls else 'ws'}://{host}:{self.ws_port}/")
        if self.metrics_port is not None:
            out.append(f"http://{host}:{self.metrics_port}/metrics")
        return out

    # admin ---------------------------------------------------------------------------

    def _store(self) -> Store:
        if self._admin is None:
            raise BrokerError("the broker is not running")
        return self._admin

    def enroll(self, pid: str) -> str:
        """Issue the credential of participant ``pid`` (replacing any previous one).

        Raises:
            InvalidId: not a pid.
        """
        credential = self._store().enroll(pid)
        self.router.reload()
        return credential

    def add_gateway(self, name: str) -> tuple[str, str]:
        """Issue a gateway credential; return ``(username, credential)``.

        The username is ``gw-<name>`` and is also the client id to use; give each
        replica its own name (``archive-1``, ``archive-2``) and one shared group.
        """
        username, credential = self._store().add_gateway(name)
        self.router.reload()
        return username, credential

    def revoke(self, username: str) -> None:
        """Delete an account: it is disconnected and its session and queue are gone.

        Raises:
            UnknownAccount: no such account.
        """
        self._store().revoke(username)
        self.router.reload()

    def allow(self, pid: str, cid: str) -> None:
        """Make ``pid`` a member of ``cid`` whatever the roster says."""
        self._store().allow(pid, cid)
        self.router.reload()

    def deny(self, pid: str, cid: str) -> None:
        """Exclude ``pid`` from ``cid`` whatever the roster says (takes effect at once)."""
        self._store().deny(pid, cid)
        self.router.reload()

    def clear_override(self, pid: str, cid: str) -> None:
        self._store().clear_override(pid, cid)
        self.router.reload()

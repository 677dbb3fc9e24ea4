"""The embedded broker: our listeners feeding our router, and its admin calls.

:class:`EmbeddedBroker` owns the :class:`~broker._router.Router` (sessions,
subscriptions, state), the :class:`~broker._listeners.Listeners` (asyncio and
``websockets`` servers; the TLS context is aMQTT's, :mod:`fieldchat.broker._amqtt`) and the
poll that applies admin changes made by other processes. Each accepted socket is a
:class:`~broker._connection.Connection`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from fieldchat.broker._amqtt import tls_context
from fieldchat.broker._config import BrokerConfig
from fieldchat.broker._connection import Connection
from fieldchat.broker._errors import BrokerError
from fieldchat.broker._listeners import Kind, Listener, Listeners
from fieldchat.broker._metrics import BrokerMetrics, serve_metrics
from fieldchat.broker._outlet import Close
from fieldchat.broker._quota import Admission
from fieldchat.broker._router import Router
from fieldchat.broker._store import Store
from fieldchat.broker._transport import Transport

__all__ = ["EmbeddedBroker"]

log = logging.getLogger("broker")

_ADMIN_POLL_S = 1.0
_SHUTDOWN_DRAIN_S = 5.0


def _listeners(config: BrokerConfig) -> list[Listener]:
    """The listeners ``config`` asks for.

    Raises:
        BrokerError: WSS without the TLS certificate options.
        ConfigError: the certificate or key cannot be used.
    """
    out = [Listener("default", Kind.TCP, config.host, config.port)]
    tls = config.tls
    if tls is not None:
        out.append(
            Listener("tls", Kind.TCP, config.host, tls.port, tls_context(tls.certfile, tls.keyfile))
        )
    if config.ws_port is not None:
        context = None
        if config.ws_tls:
            if tls is None:
                raise BrokerError("ws_tls needs the tls certificate options")
            context = tls_context(tls.certfile, tls.keyfile)
        out.append(Listener("ws", Kind.WS, config.host, config.ws_port, context))
    return out


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
        self.metrics = BrokerMetrics()
        self._router: Router | None = None
        self._listeners: Listeners | None = None
        self._metrics_server: asyncio.Server | None = None
        self._poller: asyncio.Task[None] | None = None
        self._admin: Store | None = None
        limits = config.limits
        self._admission: Admission[Connection] = Admission(
            max_connections=limits.max_connections,
            per_address=limits.max_pending_per_address,
            pending=limits.pending_cap,
        )

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
        try:
            self._listeners = Listeners(self._serve, config.limits)
            await self._listeners.start(_listeners(config))
            if config.metrics_port is not None:
                self._metrics_server = await serve_metrics(
                    self.metrics, config.host, config.metrics_port
                )
        except BaseException:
            if self._listeners is not None:
                await self._listeners.close()
            self._listeners = None
            await self._close_state()
            raise
        self._poller = loop.create_task(self._poll_admin_changes())
        log.info("broker listening on %s", ", ".join(self.urls()))

    async def _serve(self, transport: Transport) -> None:
        await Connection(self.router, self._admission, transport).run()

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
            await self._listeners.close()
            for conn in list(self._admission.connections):
                conn.kick(Close.SHUTDOWN)
            await self._listeners.drain(_SHUTDOWN_DRAIN_S)
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
        return self._listeners.port(name) if self._listeners is not None else None

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

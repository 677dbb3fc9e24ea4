"""Entry points the CLI calls: serve the app, migrate, bootstrap an administrator."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
from collections.abc import Iterator
from typing import Any

import uvicorn

from fieldchat.gateway._accounts import Accounts
from fieldchat.gateway._app import create_app
from fieldchat.gateway._settings import GatewaySettings
from fieldchat.gateway._sql import open_store
from fieldchat.schemas import tracing
from fieldchat.schemas.signals import stop_signals

__all__ = [
    "GC_THRESHOLDS",
    "GatewayServer",
    "bootstrap_admin",
    "migrate",
    "serve",
    "uvicorn_options",
]

# The cyclic collector's thresholds (CPython's default: 700, 10, 10). Each WebSocket
# client keeps a few dozen long-lived objects (its tasks, protocol, queues); with
# 1,000 of them, the default thresholds ran a full collection every ≈ 7 s during a
# 20 msg/s fan-out, 90-140 ms each with the event loop stopped: every client got
# the next messages that much later (bench/gateway.py's ws_fanout p99 was 92-114 ms,
# p50 13). A young generation of 10,000 lets the per-message garbage die before it is
# promoted, so the old generation grows slowly and no full collection ran in a 30 s
# fan-out (p99 24-25 ms, BENCHMARKS.md). Cyclic garbage waits longer; nothing leaks.
GC_THRESHOLDS = (10_000, 20, 100)


def uvicorn_options(settings: GatewaySettings) -> dict[str, Any]:
    """The uvicorn options of every way the gateway is served (``gateway run``,
    ``fieldchat up``, the tests), besides where it listens."""
    return {
        "lifespan": "on",
        "ws": "websockets-sansio",
        # A message past this closes the socket (1009) before the app sees it; the app
        # refuses frames over gateway._ws.MAX_FRAME_BYTES itself (docs/gateway.md, Limits).
        "ws_max_size": settings.ws_max_message_bytes,
        # Frames carry ciphertext (base64): permessage-deflate would compress each
        # frame once per socket for almost no gain, the largest cost of a fan-out.
        "ws_per_message_deflate": False,
        # Proxy headers (X-Forwarded-For/-Proto) only from the proxies named: uvicorn's
        # own default trusts them from 127.0.0.1, so anything on the machine could pick
        # the address the login and registration limits see.
        "proxy_headers": settings.forwarded_allow_ips is not None,
        "forwarded_allow_ips": settings.forwarded_allow_ips,
    }


class GatewayServer(uvicorn.Server):
    """uvicorn's server, where SIGINT and SIGTERM are both a normal stop.

    uvicorn handles the two itself and, once stopped, raises the signal again with
    its default action: ``gateway run`` ended with status 143 on SIGTERM, and
    ``fieldchat up`` died there, before its broker's clean shutdown. Here, with
    ``handle_signals``, the first signal starts uvicorn's graceful shutdown (the
    lifespan stops the archiver, which acknowledges only what it committed) and a
    second one forces the exit (:mod:`fieldchat.schemas.signals`); without it, the process
    owner handles them (``fieldchat up`` stops the gateway, then the broker).
    """

    def __init__(self, config: uvicorn.Config, *, handle_signals: bool = True) -> None:
        super().__init__(config)
        self.handle_signals = handle_signals

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # Replaces uvicorn's (public since 0.29; serve() runs everything inside it).
        # tests/test_signals.py fails (status 143) if uvicorn stops calling it.
        if not self.handle_signals:
            yield
            return
        with stop_signals(self.stop):
            yield

    def stop(self) -> None:
        """Start the graceful shutdown (what uvicorn does on its first signal)."""
        self.should_exit = True


def serve(settings: GatewaySettings) -> None:
    """Run the gateway until SIGINT or SIGTERM, then stop gracefully and return."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config = uvicorn.Config(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        ssl_certfile=str(settings.tls_certfile) if settings.tls_certfile else None,
        ssl_keyfile=str(settings.tls_keyfile) if settings.tls_keyfile else None,
        log_level="info",
        **uvicorn_options(settings),
    )
    # Everything imported and built so far lives as long as the process: keep it out
    # of the cyclic collector, so full collections under load stay short.
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    tracing.configure(tracing.TraceSettings.from_environ(os.environ))  # docs/tracing.md
    try:
        GatewayServer(config).run()
    finally:
        tracing.shutdown()


def migrate(settings: GatewaySettings) -> int:
    """Create or upgrade the database schema; return its version.

    Raises:
        StorageError: the database failed.
    """

    async def go() -> int:
        store = open_store(settings.database_url)
        try:
            return await store.migrate()
        finally:
            await store.close()

    return asyncio.run(go())


def bootstrap_admin(settings: GatewaySettings, username: str, password: str) -> int:
    """Create an administrator account (the first one, typically); return its id.

    Raises:
        NameTaken: the user name exists.
        StorageError: the database failed.
    """

    async def go() -> int:
        store = open_store(settings.database_url)
        try:
            await store.migrate()
            return await Accounts(store, settings).create(username, password, is_admin=True)
        finally:
            await store.close()

    return asyncio.run(go())

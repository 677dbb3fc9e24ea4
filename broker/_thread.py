"""Run an :class:`EmbeddedBroker` on its own event loop in a background thread,
for synchronous code (paho-mqtt tests, the device engineer's fixtures)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import TypeVar

from fieldchat.broker._config import BrokerConfig
from fieldchat.broker._errors import BrokerError
from fieldchat.broker._server import EmbeddedBroker

__all__ = ["BrokerThread"]

T = TypeVar("T")
_START_TIMEOUT_S = 30


class BrokerThread:
    """``with BrokerThread(config) as broker: broker.port, broker.enroll(pid)``.

    Admin calls run on the broker's loop (thread-safe). :meth:`stop` shuts down
    cleanly; :meth:`start` again reopens the same data directory (a restart).

    Raises:
        PortInUse, BrokerError, ConfigError: from :meth:`start`, as
            :meth:`EmbeddedBroker.start`.
    """

    def __init__(self, config: BrokerConfig) -> None:
        self.config = config
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._broker: EmbeddedBroker | None = None

    def __enter__(self) -> BrokerThread:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        if self._thread is not None:
            raise BrokerError("already running")
        started: Future[None] = Future()
        loop = asyncio.new_event_loop()
        broker = EmbeddedBroker(self.config)

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(broker.start())
            except BaseException as exc:  # noqa: BLE001 - handed to the starting thread
                started.set_exception(exc)
                loop.close()
                return
            started.set_result(None)
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(broker.stop())
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.run_until_complete(loop.shutdown_default_executor())
                loop.close()

        self._thread = threading.Thread(target=run, name="fieldchat-broker", daemon=True)
        self._thread.start()
        try:
            started.result(timeout=_START_TIMEOUT_S)
        except BaseException:
            self._thread.join()
            self._thread = None
            raise
        self._loop, self._broker = loop, broker

    def stop(self) -> None:
        if self._thread is None or self._loop is None:
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._thread = self._loop = self._broker = None

    def restart(self) -> None:
        """Stop and start again on the same ports and data directory."""
        ports = {"port": self.port}
        broker = self.broker
        if broker.tls_port is not None and self.config.tls is not None:
            ports_tls = self.config.tls.model_copy(update={"port": broker.tls_port})
            self.config = self.config.model_copy(update={"tls": ports_tls})
        if broker.ws_port is not None:
            ports["ws_port"] = broker.ws_port
        self.stop()
        self.config = self.config.model_copy(update=ports)
        self.start()

    @property
    def broker(self) -> EmbeddedBroker:
        if self._broker is None:
            raise BrokerError("the broker is not running")
        return self._broker

    def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the broker's loop and return its result."""
        if self._loop is None:
            raise BrokerError("the broker is not running")

        async def wrapped() -> T:
            return fn()

        return asyncio.run_coroutine_threadsafe(wrapped(), self._loop).result(timeout=30)

    @property
    def port(self) -> int:
        return self.broker.port

    def enroll(self, pid: str) -> str:
        return self.call(lambda: self.broker.enroll(pid))

    def add_gateway(self, name: str) -> tuple[str, str]:
        return self.call(lambda: self.broker.add_gateway(name))

    def revoke(self, username: str) -> None:
        self.call(lambda: self.broker.revoke(username))

    def allow(self, pid: str, cid: str) -> None:
        self.call(lambda: self.broker.allow(pid, cid))

    def deny(self, pid: str, cid: str) -> None:
        self.call(lambda: self.broker.deny(pid, cid))

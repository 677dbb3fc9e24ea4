"""Stock aMQTT 0.12.1, configured as closely to our rules as its plugin API allows,
to show that each regression test fails without broker/'s fixes.

Opt in with ``FIELDCHAT_STOCK_AMQTT=1``: every regression test then also runs
against this harness, and is expected to fail there (``xfail(strict=True)``).
Authentication: a password check plugin; authorization: per-user topic lists
(publish, subscribe, receive) matched with aMQTT's own ACL matcher.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field

from amqtt.broker import Broker
from amqtt.contexts import Action
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.plugins.topic_checking import TopicAccessControlListPlugin

from fieldchat.schemas.topics import Topics

T = Topics()


@dataclass
class StockState:
    passwords: dict[str, str] = field(default_factory=dict)
    acl: dict[str, dict[Action, list[str]]] = field(default_factory=dict)


STATE = StockState()  # one stock broker at a time (tests run serially)


class PasswordPlugin(BaseAuthPlugin):  # type: ignore[misc]  # aMQTT ships no types
    async def authenticate(self, *, session) -> bool | None:
        expected = STATE.passwords.get(session.username or "")
        return expected is not None and expected == session.password


class AclPlugin(BaseTopicPlugin):  # type: ignore[misc]  # aMQTT ships no types
    async def topic_filtering(self, *, session=None, topic=None, action=None) -> bool | None:
        rules = STATE.acl.get(session.username if session else "", {})
        allowed = rules.get(action, [])
        return any(TopicAccessControlListPlugin.topic_ac(topic or "", a) for a in allowed)


class StockThread:
    """The same surface as :class:`broker.BrokerThread`, over stock aMQTT."""

    def __init__(self, *, max_connections: int = -1) -> None:
        STATE.passwords.clear()
        STATE.acl.clear()
        self.max_connections = max_connections
        self._port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._broker: Broker | None = None

    def start(self) -> None:
        started: Future[None] = Future()
        loop = asyncio.new_event_loop()
        config = {
            "listeners": {
                "default": {
                    "type": "tcp",
                    "bind": f"127.0.0.1:{self._port}",
                    "max_connections": self.max_connections,
                },
            },
            "plugins": {
                f"{__name__}.PasswordPlugin": {},
                f"{__name__}.AclPlugin": {},
            },
        }

        def run() -> None:
            asyncio.set_event_loop(loop)

            async def boot() -> Broker:
                broker = Broker(config)
                await broker.start()
                return broker

            try:
                self._broker = loop.run_until_complete(boot())
            except BaseException as exc:
                started.set_exception(exc)
                loop.close()
                return
            started.set_result(None)
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(self._broker.shutdown())
                loop.run_until_complete(loop.shutdown_default_executor())
                loop.close()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        started.result(timeout=30)
        self._loop = loop
        assert self._broker is not None
        sock = self._broker._servers["default"].instance.sockets[0]
        self._port = sock.getsockname()[1]

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
        self._loop = self._thread = None

    def restart(self) -> None:
        self.stop()
        self.start()

    @property
    def port(self) -> int:
        return self._port

    def enroll(self, pid: str) -> str:
        password = secrets.token_urlsafe(16)
        STATE.passwords[pid] = password
        STATE.acl[pid] = {
            Action.PUBLISH: [T.bundle(pid), T.status(pid), "fc/v1/p/+/inbox"],
            Action.SUBSCRIBE: [T.inbox(pid), "fc/v1/p/+/bundle", "fc/v1/p/+/status"],
            Action.RECEIVE: [T.inbox(pid), "fc/v1/p/+/bundle", "fc/v1/p/+/status"],
        }
        return password

    def add_gateway(self, name: str) -> tuple[str, str]:
        username = f"gw-{name}"
        password = secrets.token_urlsafe(16)
        STATE.passwords[username] = password
        everything = ["fc/v1/#"]
        STATE.acl[username] = {a: list(everything) for a in Action}
        return username, password

    def allow(self, pid: str, cid: str) -> None:
        for action in (Action.PUBLISH, Action.SUBSCRIBE, Action.RECEIVE):
            STATE.acl[pid][action] += [T.msg(cid), T.roster(cid)]

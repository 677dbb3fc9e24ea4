"""The broker's sessions: which client id holds which, takeover, expiry, wills, storage.

:class:`Sessions` is owned by the :class:`~broker._router.Router`; connections reach
it through :meth:`Router.attach` and :meth:`Router.detach`. A session's subscriptions
are kept here together with the router's index of them
(:class:`~broker._subscriptions.Subscriptions`), so the two never disagree. A will is
published through the ``publish_will`` the router gives (it routes like a PUBLISH).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Iterator

from fieldchat.broker._acl import Principal
from fieldchat.broker._metrics import BrokerMetrics
from fieldchat.broker._outlet import Close, Outlet
from fieldchat.broker._session import NEVER, Session, SubOptions
from fieldchat.broker._store import Account, StoredSession
from fieldchat.broker._subscriptions import Subscriptions
from fieldchat.broker._writebehind import QueueClear, SessionDelete, SessionSave, WriteBehind
from fieldchat.schemas import mqtt

__all__ = ["Sessions"]

log = logging.getLogger("broker")

PublishWill = Callable[[Principal, mqtt.Will], None]


class Sessions:
    """Every session by client id; used only on the event loop."""

    def __init__(
        self,
        subscriptions: Subscriptions,
        metrics: BrokerMetrics,
        clock: Callable[[], float],
        publish_will: PublishWill,
    ) -> None:
        self.by_id: dict[str, Session] = {}
        self.subscriptions = subscriptions
        self.metrics = metrics
        self.clock = clock
        self.publish_will = publish_will
        self.writer: WriteBehind | None = None  # None: nothing is stored
        self._due_wills: dict[str, Callable[[], None]] = {}  # delayed wills, by client id

    def __iter__(self) -> Iterator[Session]:
        return iter(self.by_id.values())

    def __len__(self) -> int:
        return len(self.by_id)

    def get(self, client_id: str) -> Session | None:
        return self.by_id.get(client_id)

    def load(
        self,
        rows: dict[str, StoredSession],
        accounts: dict[str, Account],
        loop: asyncio.AbstractEventLoop,
    ) -> list[Session]:
        """Restore stored sessions (of accounts that still exist); return those whose
        expiry passed while the broker was stopped (drop them once their queues are
        restored and forgotten)."""
        now = self.clock()
        expired: list[Session] = []
        for client_id, row in rows.items():
            account = accounts.get(row.username)
            if account is None or row.username != client_id:
                continue
            principal = Principal(row.username, account.role)
            session = Session(client_id, principal, persistent=True, expiry=row.expiry)
            self.by_id[client_id] = session
            for topic_filter, options in row.subscriptions.items():
                self.add_subscription(session, topic_filter, SubOptions.from_json(options))
            if row.expires_at is not None:  # offline when we stopped: its expiry goes on
                if row.expires_at <= now:
                    expired.append(session)
                else:
                    session.expiry_timer = loop.call_later(
                        row.expires_at - now, self.expire, session
                    )
        return expired

    # subscriptions ----------------------------------------------------------------

    def add_subscription(self, session: Session, topic_filter: str, options: SubOptions) -> None:
        self.subscriptions.add(session.client_id, topic_filter, options)
        session.subscriptions[topic_filter] = options

    def remove_subscription(self, session: Session, topic_filter: str) -> bool:
        self.subscriptions.remove(session.client_id, topic_filter)
        return session.subscriptions.pop(topic_filter, None) is not None

    # a connection takes and leaves a session ------------------------------------------

    def attach(
        self,
        principal: Principal,
        outlet: Outlet,
        *,
        persistent: bool,
        expiry: int,
        clean_start: bool,
    ) -> tuple[Session, bool]:
        """:meth:`Router.attach`."""
        session = self.by_id.get(principal.username)
        if session is not None and session.outlet is not None:
            log.info("%s connected again: closing its previous connection", principal.username)
            session.outlet.kick(Close.TAKEOVER)
        present = False
        if session is not None and (clean_start or not session.persistent):
            self.drop(session)
            session = None
        if session is None:
            session = Session(principal.username, principal, persistent=persistent, expiry=expiry)
            self.by_id[session.client_id] = session
        else:
            present = True
            session.principal = principal
            session.expiry = expiry  # the new CONNECT's interval applies (MQTT-3.1.2-23)
        self._online(session)
        self.persist(session)
        session.outlet = outlet
        self.metrics.connected.inc()
        return session, present

    def detach(self, session: Session, outlet: Outlet, will: mqtt.Will | None) -> None:
        """:meth:`Router.detach`."""
        if session.outlet is not outlet:
            return
        self.metrics.connected.dec()
        session.outlet = None
        if will is not None:
            delay = will.properties.will_delay_interval or 0
            if delay and session.persistent:
                self._delay_will(session, min(delay, session.expiry), will)
            else:
                self.publish_will(session.principal, will)
        if not session.persistent:
            self.drop(session)
        else:
            self._offline(session)

    def _delay_will(self, session: Session, delay: float, will: mqtt.Will) -> None:
        """Publish a will after its Will Delay Interval unless the session is taken
        again before (MQTT 5 §3.1.3.2.2); at the latest when the session ends."""
        principal = session.principal

        def publish() -> None:
            self.publish_will(principal, will)

        def due() -> None:
            session.will_timer = None
            if self._due_wills.pop(session.client_id, None) is not None:
                publish()

        self._due_wills[session.client_id] = publish
        session.will_timer = asyncio.get_running_loop().call_later(delay, due)

    # life and storage ---------------------------------------------------------------

    def persist(self, session: Session, *, expires_at: float | None = None) -> None:
        """Store the session; ``expires_at``: when an offline session ends (None: not
        offline, or never)."""
        if session.persistent and self.writer is not None:
            subscriptions = {f: o.to_json() for f, o in session.subscriptions.items()}
            self.writer.put(
                SessionSave(
                    session.client_id,
                    session.principal.username,
                    json.dumps(subscriptions),
                    session.expiry,
                    expires_at,
                )
            )

    def _offline(self, session: Session) -> None:
        """The session's connection closed: start its Session Expiry Interval (MQTT 5)."""
        if session.expiry == NEVER or not session.persistent:
            return
        loop = asyncio.get_running_loop()
        session.expiry_timer = loop.call_later(session.expiry, self.expire, session)
        self.persist(session, expires_at=self.clock() + session.expiry)

    def _online(self, session: Session) -> None:
        """A connection took the session: stop its expiry and any delayed will."""
        for timer in (session.expiry_timer, session.will_timer):
            if timer is not None:
                timer.cancel()
        session.expiry_timer = session.will_timer = None

    def expire(self, session: Session) -> None:
        """The Session Expiry Interval passed: the session and its queue go (MQTT-4.1.0-2)."""
        if session.outlet is not None or self.by_id.get(session.client_id) is not session:
            return
        if session.will_timer is not None:  # the will goes at the latest now (MQTT-3.1.3-9)
            callback = session.will_timer
            session.will_timer = None
            callback.cancel()
            self._due_wills.pop(session.client_id, lambda: None)()
        log.info("session of %s expired: %d queued messages freed", session, len(session.queue))
        self.drop(session)

    def drop(self, session: Session) -> None:
        """Forget a session: subscriptions, queue, in-flight, stored state."""
        for topic_filter in list(session.subscriptions):
            self.remove_subscription(session, topic_filter)
        if self.by_id.get(session.client_id) is session:
            del self.by_id[session.client_id]
        if session.persistent and self.writer is not None:
            self.writer.put(SessionDelete(session.client_id))
            self.writer.put(QueueClear(session.client_id))
        session.queue.clear()
        session.inflight.clear()
        self._online(session)  # cancels its timers
        self._due_wills.pop(session.client_id, None)

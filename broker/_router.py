"""The routing core: it owns the sessions, and decides what a publish does.

One :class:`Router` per broker, used only from the event loop thread (no locks). A
:class:`~broker._connection.Connection` calls it and acts on what it returns:

* :meth:`Router.attach` hands a session to an authenticated connection (closing the
  one that held it: takeover), :meth:`Router.detach` takes it back (will, expiry);
* :meth:`Router.publish` checks, routes and stores a PUBLISH and returns a
  :class:`Published` (refused and why, or how many sessions it reached and the store
  commit its acknowledgement waits for); :meth:`Router.subscribe` returns the grant
  or refusal of each filter.

The router reaches connections only through :attr:`Session.outlet`
(:class:`~broker._outlet.Outlet`). Its parts: :class:`~broker._access.Access` (who
may do what), :class:`~broker._subscriptions.Subscriptions` (who gets a topic),
:class:`~broker._delivery.Delivery` (queues and in-flight windows), the store.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import NamedTuple

from fieldchat.broker._access import Access
from fieldchat.broker._acl import Deny, Principal
from fieldchat.broker._config import BrokerConfig
from fieldchat.broker._delivery import Delivery
from fieldchat.broker._metrics import BrokerMetrics
from fieldchat.broker._outlet import Close, Outlet
from fieldchat.broker._retained import Retained
from fieldchat.broker._session import Session, SubOptions
from fieldchat.broker._sessions import Sessions
from fieldchat.broker._store import Account, Store
from fieldchat.broker._subscriptions import Subscriptions, valid_filter
from fieldchat.broker._v5 import Refusal, forwarded, session_expiry
from fieldchat.broker._writebehind import FoundedSave, RosterSave, WriteBehind
from fieldchat.schemas import mqtt, tracing
from fieldchat.schemas.errors import MalformedPacket
from fieldchat.schemas.roster import Roster
from fieldchat.schemas.topics import Topic, TopicKind

__all__ = ["Published", "Routed", "Router"]

log = logging.getLogger("broker")


class Routed(NamedTuple):
    """What :meth:`Router.route` did: the sessions it reached, and whether it wrote
    queued copies to the store (an acknowledgement then waits for the commit)."""

    fanout: int
    stored: bool


class Published(NamedTuple):
    """What :meth:`Router.publish` did with a PUBLISH.

    Refused: ``denial`` says why and ``disconnect`` whether the client is closed for
    it. Accepted: ``fanout`` sessions reached; ``pending``, the store commit its
    acknowledgement waits for (None: none).
    """

    parsed: Topic | None
    denial: Deny | None = None
    disconnect: bool = False
    fanout: int = 0
    pending: asyncio.Future[None] | None = None


class Router:
    """Sessions, subscriptions and retained messages of one broker."""

    def __init__(
        self,
        config: BrokerConfig,
        metrics: BrokerMetrics,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.limits = config.limits
        self.metrics = metrics
        self.clock = clock
        self.access = Access(config, clock)
        self.topics = self.access.topics
        self.subscriptions = Subscriptions()
        self.sessions = Sessions(self.subscriptions, metrics, clock, self.publish_will)
        self.retained = Retained()
        self.delivery = Delivery(self.limits, metrics, clock, self._may_receive)
        self.store: Store | None = None
        self.writer: WriteBehind | None = None
        self.tracer = tracing.tracer("broker")  # None unless the entry point turned tracing on
        metrics.queued.set_function(
            lambda: float(sum(len(s.queue) + len(s.inflight) for s in self.sessions))
        )

    # state ----------------------------------------------------------------------

    def open(self, loop: asyncio.AbstractEventLoop) -> None:
        """Open the store and load accounts, memberships and (if persistent) state.

        Raises:
            ConfigError: the database cannot be opened.
        """
        self.store = store = Store(self.config.db_path)
        self.access.load(store)
        if not self.config.persistence:
            return
        now = self.clock()
        self.retained.messages = store.retained()
        self.writer = WriteBehind(self.config.db_path, loop)
        self.sessions.writer = self.delivery.writer = self.retained.writer = self.writer
        expired = self.sessions.load(store.sessions(), self.access.accounts, loop)
        restored = 0
        for client_id, stored in store.queued().items():
            maybe = self.sessions.get(client_id)
            for item in stored:
                self.delivery.seq = max(self.delivery.seq, item.seq)
                if maybe is not None:
                    restored += self.delivery.restore(maybe, item, now)
        for session in expired:
            log.info("session of %s expired while the broker was stopped", session.client_id)
            self.sessions.drop(session)
        log.info(
            "restored %d sessions, %d queued messages, %d retained messages",
            len(self.sessions),
            restored,
            len(self.retained),
        )

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
            self.sessions.writer = self.delivery.writer = self.retained.writer = None
        if self.store is not None:
            self.store.close()
            self.store = None

    def account(self, username: str) -> Account | None:
        """The account of ``username``, reloading first when it is unknown.

        A device enrolled by another process a moment ago (`fieldchat broker enroll`,
        then a connect at once) must not wait for the accounts poll. A reload is one
        PRAGMA unless the store changed.
        """
        account = self.access.accounts.get(username)
        if account is None:
            self.reload()
            account = self.access.accounts.get(username)
        return account

    def reload(self) -> None:
        """Apply account and override changes made by admin commands (any process)."""
        if self.store is None:
            return
        changes = self.access.reload(self.store)
        if changes is None:
            return
        for username in changes.accounts:
            session = self.sessions.get(username)
            if session is None:
                continue
            if session.outlet is not None:
                log.info("credential of %s revoked or replaced: disconnecting it", username)
                session.outlet.kick(Close.REVOKED)
            if username not in self.access.accounts:
                self.sessions.drop(session)
        for cid, pids in changes.memberships.items():
            self.revoke_membership(cid, pids)

    def _may_receive(self, session: Session, topic: str) -> bool:
        return self.access.may_receive(session.principal, topic)

    # membership -------------------------------------------------------------------

    def adopt_roster(self, roster: Roster) -> None:
        now = self.clock()
        lost = self.access.adopt(roster, now)
        if roster.epoch == 0:
            if self.writer is not None:
                self.writer.put(FoundedSave(roster.cid, roster.signer, now))
            elif self.store is not None:
                self.store.record_founded(roster.cid, roster.signer, now)
        if self.writer is not None:
            self.writer.put(RosterSave(roster.cid, roster.epoch, roster.to_bytes()))
        elif self.store is not None:
            self.store.record_roster(roster)
        self.revoke_membership(roster.cid, lost)

    def revoke_membership(self, cid: str, pids: set[str] | frozenset[str]) -> None:
        """Remove the subscriptions of members who lost access to ``cid``."""
        for pid in pids:
            session = self.sessions.get(pid)
            if session is None or session.principal.is_gateway:
                continue
            for topic_filter in list(session.subscriptions):
                parsed = self.access.parse(topic_filter)
                if parsed is not None and parsed.cid == cid:
                    self.sessions.remove_subscription(session, topic_filter)
            self.sessions.persist(session)
            log.info("%s is no longer a member of %s: its subscriptions there are gone", pid, cid)

    # sessions -----------------------------------------------------------------------

    def attach(
        self, principal: Principal, outlet: Outlet, connect: mqtt.Connect
    ) -> tuple[Session, bool]:
        """Give ``principal``'s session to a connection that has just authenticated with
        ``connect``; return it and whether it was there before (CONNACK's Session
        Present).

        A connection holding it is closed first, without its will (takeover: the
        client is still there). Clean Start, or a session that was not persistent,
        starts afresh; a resumed session takes the new CONNECT's Session Expiry
        Interval (MQTT-3.1.2-23).
        """
        persistent, expiry = session_expiry(connect)
        return self.sessions.attach(
            principal, outlet, persistent=persistent, expiry=expiry, clean_start=connect.clean_start
        )

    def resume(self, session: Session) -> None:
        """After the CONNACK: resend what is in flight (DUP), then what is queued."""
        self.delivery.resume(session)

    def detach(self, session: Session, outlet: Outlet, will: mqtt.Will | None) -> None:
        """``outlet`` closed. If it still held ``session``: publish ``will`` (now, or
        after its Will Delay Interval, MQTT 5 §3.1.3.2.2), then end the session or
        start its expiry."""
        self.sessions.detach(session, outlet, will)

    def publish_will(self, principal: Principal, will: mqtt.Will) -> None:
        """Publish a will, checked again now: the membership its CONNECT was checked
        against may be gone (a removed member's will must not reach the others)."""
        rules = self.access.rules
        denial = rules.will(principal, will.topic, will.payload, retain=will.retain)
        parsed = self.access.parse(will.topic)
        if denial is not None or parsed is None:
            self.metrics.denials.labels(Refusal.WILL.label).inc()
            log.info(
                "%s: will on %r not published (%s)",
                principal.username,
                will.topic[:120],
                denial.value if denial else "topic",
            )
            return
        self.metrics.messages_in.inc()
        properties = will.properties
        expires_at = None
        if properties.message_expiry_interval is not None:
            expires_at = self.clock() + properties.message_expiry_interval
        self.route(
            will.topic,
            will.payload,
            will.qos,
            parsed,
            retain=will.retain,
            properties=forwarded(properties),
            expires_at=expires_at,
        )
        if will.retain:
            self.retained.set(will.topic, will.payload, will.qos)

    # subscriptions -----------------------------------------------------------------

    def subscribe(
        self, session: Session, packet: mqtt.Subscribe
    ) -> tuple[list[SubOptions | Deny], list[tuple[str, SubOptions]]]:
        """Grant or refuse each filter of a SUBSCRIBE, in order; also return the
        subscriptions whose retained messages go out after the SUBACK
        (:meth:`replay_retained`, by their Retain Handling, MQTT-3.3.1-9…-11).

        Raises:
            MalformedPacket: No Local on a shared subscription (MQTT-3.8.3-4).
        """
        identifiers = packet.properties.subscription_identifiers
        identifier = identifiers[0] if identifiers else None
        results: list[SubOptions | Deny] = []
        replay: list[tuple[str, SubOptions]] = []
        for subscription in packet.subscriptions:
            topic_filter = subscription.topic_filter
            if topic_filter.startswith("$share/") and subscription.no_local:
                raise MalformedPacket("No Local on a shared subscription", code=0x82)
            denial = None if valid_filter(topic_filter) else Deny.FORBIDDEN
            denial = denial or self.access.rules.subscribe(session.principal, topic_filter)
            new = topic_filter not in session.subscriptions
            if (
                denial is None
                and new
                and len(session.subscriptions) >= self.limits.max_subscriptions
            ):
                denial = Deny.TOO_MANY
            if denial is not None:
                self.metrics.denials.labels(denial.value).inc()
                log.info(
                    "%s may not subscribe to %r (%s)", session.client_id, topic_filter[:120], denial
                )
                results.append(denial)
                continue
            grant = min(subscription.qos, 1)  # QoS 2 is granted as 1 (MQTT-3.9.3)
            options = SubOptions(
                grant, subscription.no_local, subscription.retain_as_published, identifier
            )
            self.sessions.add_subscription(session, topic_filter, options)
            results.append(options)
            handling = subscription.retain_handling
            if handling == mqtt.RetainHandling.SEND_ON_SUBSCRIBE or (
                handling == mqtt.RetainHandling.SEND_IF_NEW and new
            ):
                replay.append((topic_filter, options))
        self.sessions.persist(session)
        return results, replay

    def unsubscribe(self, session: Session, topic_filters: tuple[str, ...]) -> list[bool]:
        """Remove each filter; return whether each existed."""
        existed = [self.sessions.remove_subscription(session, f) for f in topic_filters]
        self.sessions.persist(session)
        return existed

    # publishing ---------------------------------------------------------------------

    def publish(self, principal: Principal, session: Session, packet: mqtt.Publish) -> Published:
        """Check a client's PUBLISH, route it, retain it; return what happened."""
        denial, roster = self.access.authorize(
            principal, packet.topic, packet.payload, retain=packet.retain
        )
        if denial is not None:
            self.metrics.denials.labels(denial.value).inc()
            log.info(
                "%s may not publish to %r (%s)", principal.username, packet.topic[:120], denial
            )
            disconnect = denial.disconnects or (
                denial.is_race and self.config.on_not_member == "disconnect"
            )
            return Published(self.access.parse(packet.topic), denial, disconnect)
        if roster is not None:
            self.adopt_roster(roster)
        parsed = self.access.parse(packet.topic)
        assert parsed is not None
        self.metrics.messages_in.inc()
        properties, expires_at = packet.properties, None
        if properties is not mqtt.NO_PROPERTIES:
            if properties.message_expiry_interval is not None:
                expires_at = self.clock() + properties.message_expiry_interval
            properties = forwarded(properties)
        fanout, stored = self.route(
            packet.topic,
            packet.payload,
            packet.qos,
            parsed,
            sender=session.client_id,
            retain=packet.retain,
            properties=properties,
            expires_at=expires_at,
        )
        if parsed.kind is TopicKind.PROPOSE:
            assert parsed.cid is not None
            stored = self.retain_roster(parsed.cid, packet.payload) or stored
        elif packet.retain:
            stored = self.retained.set(packet.topic, packet.payload, packet.qos) or stored
        pending = None
        if stored and packet.qos and self.writer is not None:
            pending = self.writer.committed()
        return Published(parsed, None, False, fanout, pending)  # positional: per PUBLISH

    def route(
        self,
        topic: str,
        payload: bytes,
        qos: int,
        parsed: Topic,
        *,
        sender: str | None = None,
        retain: bool = False,
        properties: mqtt.Properties = mqtt.NO_PROPERTIES,
        expires_at: float | None = None,
    ) -> Routed:
        """Deliver a message to every subscribed session allowed to receive it.

        ``sender``: the publishing client id, whose No Local subscriptions are skipped
        (MQTT-3.8.3-3); ``retain``: the PUBLISH's RETAIN, forwarded to Retain As
        Published subscriptions (MQTT-3.3.1-12, -13). A session matched by several
        subscriptions gets one copy at the highest QoS with all their Subscription
        Identifiers (MQTT-3.3.4-3, -4).
        """
        targets, merged = self.subscriptions.match(topic, self._connected)
        stored = False
        fanout = 0
        sessions = self.sessions.by_id
        receive = self.access.rules.receive
        deliver = self.delivery.deliver
        for client_id, options in targets.items():
            if options.no_local and client_id == sender:
                continue
            session = sessions.get(client_id)
            if session is not None and receive(session.principal, parsed):
                sub_qos, rap = options.qos, options.retain_as_published
                identifiers: tuple[int, ...] = ()
                if options.identifier:
                    identifiers = (options.identifier,)
                both = merged.get(client_id)
                if both is not None:
                    sub_qos, rap, identifiers = both
                stored |= deliver(
                    session,
                    topic,
                    payload,
                    min(qos, sub_qos),
                    retain=retain and rap,
                    properties=properties,
                    expires_at=expires_at,
                    identifiers=identifiers,
                )
                fanout += 1
        return Routed(fanout, stored)

    def _connected(self, client_id: str) -> bool:
        session = self.sessions.get(client_id)
        return session is not None and session.outlet is not None

    def acked(self, session: Session, packet_id: int) -> None:
        self.delivery.acked(session, packet_id)

    # retained ---------------------------------------------------------------------

    def retain_roster(self, cid: str, payload: bytes) -> bool:
        """Make ``payload`` (an accepted roster of ``cid``) the retained roster.

        A proposal becomes the roster here, routed to the roster's subscribers and
        retained, as if it had been published on ``c/{cid}/roster`` with RETAIN; the
        roster already retained is left alone. Returns whether the store was written.
        """
        topic = self.topics.roster(cid)
        held = self.retained.get(topic)
        if held is not None and held[0] == payload:
            return False
        stored = self.route(topic, payload, 1, Topic(TopicKind.ROSTER, cid=cid)).stored
        return self.retained.set(topic, payload, 1) or stored

    def replay_retained(self, session: Session, topic_filter: str, granted: SubOptions) -> None:
        """Send the retained messages matching a new subscription that ``session`` may read."""
        if topic_filter.startswith("$share/"):
            return  # shared subscriptions get no retained messages (MQTT 5 §4.8.2)
        for topic, payload, qos in self.retained.matching(topic_filter):
            if self._may_receive(session, topic):
                identifiers = (granted.identifier,) if granted.identifier else ()
                self.delivery.deliver(
                    session,
                    topic,
                    payload,
                    min(qos, granted.qos),
                    retain=True,
                    identifiers=identifiers,
                )

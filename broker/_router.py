"""The routing core: sessions, subscriptions, retained messages, membership, state.

One :class:`Router` per broker, used only from the event loop thread (no locks).
:class:`~broker._connection.Connection` drives it from the network.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from broker._acl import Deny, Membership, Principal, Rules
from broker._config import BrokerConfig
from broker._metrics import Metrics
from broker._quota import FoundingQuota, Pending, Throttle
from broker._session import NEVER, Message, Session, SubOptions
from broker._store import Account, Store, StoredMessage
from broker._writebehind import (
    FoundedSave,
    QueueAdd,
    QueueClear,
    QueueRemove,
    QueueSent,
    RetainClear,
    RetainSet,
    RosterSave,
    SessionDelete,
    SessionSave,
    WriteBehind,
)
from schemas import mqtt, tracing
from schemas.errors import MalformedPacket
from schemas.roster import Roster
from schemas.topics import Topic, TopicKind, Topics

if TYPE_CHECKING:
    from broker._connection import Connection

__all__ = ["Router", "matches"]


def _merge(
    targets: dict[str, SubOptions],
    extra: dict[str, tuple[int, bool, tuple[int, ...]]],
    client_id: str,
    options: SubOptions,
) -> None:
    """Add one matching subscription of ``client_id`` (see :meth:`Router.route`)."""
    held = targets.get(client_id)
    if held is None:
        targets[client_id] = options
        return
    qos, rap, identifiers = extra.get(client_id) or (
        held.qos,
        held.retain_as_published,
        (held.identifier,) if held.identifier else (),
    )
    if options.identifier:
        identifiers = (*identifiers, options.identifier)
    extra[client_id] = (max(qos, options.qos), rap or options.retain_as_published, identifiers)
    if held.no_local and not options.no_local:  # another subscription wants it back
        targets[client_id] = SubOptions(held.qos, identifier=held.identifier)


log = logging.getLogger("broker")

_PARSE_CACHE_MAX = 65_536
_QOS0_BUFFER_MAX = 1 << 20  # a socket this far behind drops QoS 0 (counted)


def matches(topic: str, topic_filter: str) -> bool:
    """MQTT §4.7 topic filter matching (``$`` topics never match a leading wildcard)."""
    if topic_filter == topic:
        return True
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    t_levels = topic.split("/")
    f_levels = topic_filter.split("/")
    for i, level in enumerate(f_levels):
        if level == "#":
            return True
        if i >= len(t_levels) or (level != "+" and level != t_levels[i]):
            return False
    return len(t_levels) == len(f_levels)


class Router:
    """Routing and session state of one broker."""

    def __init__(
        self, config: BrokerConfig, metrics: Metrics, *, clock: Callable[[], float] = time.time
    ) -> None:
        self.config = config
        self.limits = limits = config.limits
        self.metrics = metrics
        self.clock = clock
        self.topics = Topics(config.prefix)
        self.sessions: dict[str, Session] = {}
        self.connections: set[Connection] = set()
        self.exact: dict[str, dict[str, SubOptions]] = {}
        self.wild: dict[str, dict[str, SubOptions]] = {}
        self.shared: dict[tuple[str, str], dict[str, SubOptions]] = {}
        self._next_in_group: dict[tuple[str, str], int] = {}
        self.retained: dict[str, tuple[bytes, int]] = {}
        self.accounts: dict[str, Account] = {}
        self.membership = Membership()
        self.rules = self._rules()
        self.founding = FoundingQuota(limits.max_founded, limits.founding_window_s)
        self.throttles: dict[str, Throttle] = {}
        self.pending: Pending[Connection] = Pending(
            per_address=limits.max_pending_per_address, total=limits.pending_cap
        )
        self.store: Store | None = None
        self.writer: WriteBehind | None = None
        self._seq = 0
        self._parsed: dict[str, Topic | None] = {}
        self._data_version = -1
        self._drop_logged: dict[str, int] = {}
        self.tracer = tracing.tracer("broker")  # None unless the entry point turned tracing on
        self.fanout = 0  # sessions the last route() reached (a traced route's attribute)
        self._due_wills: dict[str, Callable[[], None]] = {}  # delayed wills, by client id
        metrics.queued.set_function(
            lambda: float(sum(len(s.queue) + len(s.inflight) for s in self.sessions.values()))
        )

    # state ----------------------------------------------------------------------

    def open(self, loop: asyncio.AbstractEventLoop) -> None:
        """Open the store and load accounts, memberships and (if persistent) state.

        Raises:
            ConfigError: the database cannot be opened.
        """
        self.store = Store(self.config.db_path)
        self.accounts = self.store.accounts()
        self.membership = Membership.build(self.store.rosters(), self.store.overrides())
        self.rules = self._rules()
        now = self.clock()
        self.founding.load(self.store.founded(now - self.limits.founding_window_s), now)
        self._data_version = self.store.data_version()
        if not self.config.persistence:
            return
        self.retained = self.store.retained()
        self.writer = WriteBehind(self.config.db_path, loop)
        expired: list[Session] = []
        for client_id, row in self.store.sessions().items():
            account = self.accounts.get(row.username)
            if account is None or row.username != client_id:
                continue
            principal = Principal(row.username, account.role)
            session = Session(client_id, principal, persistent=True, expiry=row.expiry)
            self.sessions[client_id] = session
            for topic_filter, options in row.subscriptions.items():
                self.add_subscription(session, topic_filter, SubOptions.from_json(options))
            if row.expires_at is not None:  # offline when we stopped: its expiry goes on
                if row.expires_at <= now:
                    expired.append(session)
                else:
                    session.expiry_timer = loop.call_later(
                        row.expires_at - now, self.expire, session
                    )
        restored = 0
        for client_id, stored in self.store.queued().items():
            maybe = self.sessions.get(client_id)
            for item in stored:
                self._seq = max(self._seq, item.seq)
                if maybe is not None:
                    restored += self._restore(maybe, item, now)
        for session in expired:
            log.info("session of %s expired while the broker was stopped", session.client_id)
            self.drop_session(session)
        log.info(
            "restored %d sessions, %d queued messages, %d retained messages",
            len(self.sessions),
            restored,
            len(self.retained),
        )

    def _restore(self, session: Session, item: StoredMessage, now: float) -> int:
        """Put a stored message back: in flight under its packet id if it was sent
        (resent with DUP on reconnect, MQTT-3.3.1-1, -4.4.0-1), else queued."""
        if item.expires_at is not None and item.expires_at <= now:
            self._forget(session, item.seq)
            return 0
        properties = mqtt.NO_PROPERTIES
        if item.props:
            try:
                properties = mqtt.decode_properties(item.props, 0, mqtt.PacketType.PUBLISH)[0]
            except MalformedPacket:
                log.warning("stored properties of a message to %s no longer decode", session)
        message = Message(
            item.seq,
            item.topic,
            item.payload,
            retain=item.retain,
            properties=properties,
            expires_at=item.expires_at,
        )
        if item.sent and item.sent not in session.inflight:
            session.inflight[item.sent] = message
        else:
            session.queue.append(message)
            session.queued_bytes += len(item.payload)
        return 1

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.store is not None:
            self.store.close()
            self.store = None

    def _rules(self) -> Rules:
        return Rules(
            self.topics,
            self.membership,
            max_bundle_bytes=self.limits.max_bundle_bytes,
            max_status_bytes=self.limits.max_status_bytes,
        )

    def account(self, username: str) -> Account | None:
        """The account of ``username``, reloading first when it is unknown.

        A device enrolled by another process a moment ago (`fieldchat broker enroll`,
        then a connect at once) must not wait for the accounts poll. A reload is one
        PRAGMA unless the store changed.
        """
        account = self.accounts.get(username)
        if account is None:
            self.reload()
            account = self.accounts.get(username)
        return account

    def reload(self) -> None:
        """Apply account and override changes made by admin commands (any process)."""
        if self.store is None:
            return
        version = self.store.data_version()
        if version == self._data_version:
            return
        self._data_version = version
        accounts = self.store.accounts()
        changed = {
            u for u, a in self.accounts.items() if u not in accounts or accounts[u].hash != a.hash
        }
        self.accounts = accounts
        for username in changed:
            session = self.sessions.get(username)
            if session is None:
                continue
            if session.conn is not None:
                log.info("credential of %s revoked or replaced: disconnecting it", username)
                session.conn.kick("revoked")
            if username not in accounts:
                self.drop_session(session)
        for cid, pids in self.membership.set_overrides(self.store.overrides()).items():
            self.revoke_membership(cid, pids)

    def parse(self, topic: str) -> Topic | None:
        try:
            return self._parsed[topic]
        except KeyError:
            if len(self._parsed) >= _PARSE_CACHE_MAX:
                self._parsed.clear()
            parsed = self._parsed[topic] = self.rules.parse(topic)
            return parsed

    # membership -------------------------------------------------------------------

    def authorize(
        self, who: Principal, topic: str, payload: bytes, *, retain: bool
    ) -> tuple[Deny | None, Roster | None]:
        """:meth:`Rules.publish`, then the founding quota of a new conversation."""
        denial, roster = self.rules.publish(who, topic, payload, retain=retain)
        if (
            roster is not None
            and roster.epoch == 0
            and not self.founding.allows(roster.signer, self.clock())
        ):
            log.warning(
                "%s founded %d conversations in %.0f s: %s refused",
                roster.signer,
                self.limits.max_founded,
                self.limits.founding_window_s,
                roster.cid,
            )
            return Deny.FOUNDING, None
        return denial, roster

    def adopt_roster(self, roster: Roster) -> None:
        lost = self.membership.adopt(roster)
        if roster.epoch == 0:
            now = self.clock()
            self.founding.record(roster.signer, now)
            if self.writer is not None:
                self.writer.put(FoundedSave(roster.cid, roster.signer, now))
            elif self.store is not None:
                self.store.record_founded(roster.cid, roster.signer, now)
        if self.writer is not None:
            self.writer.put(RosterSave(roster.cid, roster.epoch, roster.to_bytes()))
        elif self.store is not None:
            self.store.record_roster(roster)
        log.info("conversation %s: roster epoch %d adopted", roster.cid, roster.epoch)
        self.revoke_membership(roster.cid, lost)

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
        wrote = self.route(topic, payload, 1, Topic(TopicKind.ROSTER, cid=cid))
        return self.retain(topic, payload, 1) or wrote

    def throttle(self, who: Principal) -> Throttle | None:
        """The outbound quota of ``who`` (kept across its connections); none for gateways."""
        limits = self.limits
        if who.is_gateway or not (limits.rate_messages_per_s or limits.rate_bytes_per_s):
            return None
        throttle = self.throttles.get(who.username)
        if throttle is None:
            throttle = self.throttles[who.username] = Throttle(
                time.monotonic(),
                messages_per_s=limits.rate_messages_per_s,
                messages_burst=limits.rate_messages_burst,
                bytes_per_s=limits.rate_bytes_per_s,
                bytes_burst=limits.rate_bytes_burst,
            )
        return throttle

    def revoke_membership(self, cid: str, pids: set[str] | frozenset[str]) -> None:
        """Remove the subscriptions of members who lost access to ``cid``."""
        for pid in pids:
            session = self.sessions.get(pid)
            if session is None or session.principal.is_gateway:
                continue
            for topic_filter in list(session.subscriptions):
                parsed = self.parse(topic_filter)
                if parsed is not None and parsed.cid == cid:
                    self.remove_subscription(session, topic_filter)
            self.persist_session(session)
            log.info("%s is no longer a member of %s: its subscriptions there are gone", pid, cid)

    # sessions and subscriptions ---------------------------------------------------

    def persist_session(self, session: Session, *, expires_at: float | None = None) -> None:
        """Store the session; ``expires_at``: when an offline session ends (None: not
        offline, or never)."""
        if session.persistent and self.writer is not None:
            self.writer.put(
                SessionSave(
                    session.client_id,
                    session.principal.username,
                    json.dumps({f: o.to_json() for f, o in session.subscriptions.items()}),
                    session.expiry,
                    expires_at,
                )
            )

    def offline(self, session: Session) -> None:
        """The session's connection closed: start its Session Expiry Interval (MQTT 5)."""
        if session.expiry == NEVER or not session.persistent:
            return
        loop = asyncio.get_running_loop()
        session.expiry_timer = loop.call_later(session.expiry, self.expire, session)
        self.persist_session(session, expires_at=self.clock() + session.expiry)

    def online(self, session: Session) -> None:
        """A connection took the session: stop its expiry and any delayed will."""
        for timer in (session.expiry_timer, session.will_timer):
            if timer is not None:
                timer.cancel()
        session.expiry_timer = session.will_timer = None

    def expire(self, session: Session) -> None:
        """The Session Expiry Interval passed: the session and its queue go (MQTT-4.1.0-2)."""
        if session.conn is not None or self.sessions.get(session.client_id) is not session:
            return
        if session.will_timer is not None:  # the will goes at the latest now (MQTT-3.1.3-9)
            callback = session.will_timer
            session.will_timer = None
            callback.cancel()
            self._due_wills.pop(session.client_id, lambda: None)()
        log.info("session of %s expired: %d queued messages freed", session, len(session.queue))
        self.drop_session(session)

    def drop_session(self, session: Session) -> None:
        """Forget a session: subscriptions, queue, in-flight, stored state."""
        for topic_filter in list(session.subscriptions):
            self.remove_subscription(session, topic_filter)
        if self.sessions.get(session.client_id) is session:
            del self.sessions[session.client_id]
        if session.persistent and self.writer is not None:
            self.writer.put(SessionDelete(session.client_id))
            self.writer.put(QueueClear(session.client_id))
        session.queue.clear()
        session.inflight.clear()
        self.online(session)  # cancels its timers
        self._due_wills.pop(session.client_id, None)

    def add_subscription(self, session: Session, topic_filter: str, options: SubOptions) -> None:
        key, index = self._index(topic_filter)
        index.setdefault(key, {})[session.client_id] = options
        session.subscriptions[topic_filter] = options

    def delay_will(self, session: Session, delay: float, publish: Callable[[], None]) -> None:
        """Publish a will after its Will Delay Interval unless the session is taken
        again before (MQTT 5 §3.1.3.2.2); at the latest when the session ends."""

        def due() -> None:
            session.will_timer = None
            if self._due_wills.pop(session.client_id, None) is not None:
                publish()

        self._due_wills[session.client_id] = publish
        session.will_timer = asyncio.get_running_loop().call_later(delay, due)

    def remove_subscription(self, session: Session, topic_filter: str) -> bool:
        key, index = self._index(topic_filter)
        subs = index.get(key)
        if subs is not None:
            subs.pop(session.client_id, None)
            if not subs:
                del index[key]
        return session.subscriptions.pop(topic_filter, None) is not None

    def _index(self, topic_filter: str) -> tuple[Any, dict[Any, dict[str, SubOptions]]]:
        if topic_filter.startswith("$share/"):
            _, group, real = topic_filter.split("/", 2)
            return (group, real), self.shared
        if "+" in topic_filter or "#" in topic_filter:
            return topic_filter, self.wild
        return topic_filter, self.exact

    # routing ------------------------------------------------------------------------

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
    ) -> bool:
        """Deliver a message to every subscribed session allowed to receive it.

        ``sender``: the publishing client id, whose No Local subscriptions are skipped
        (MQTT-3.8.3-3); ``retain``: the PUBLISH's RETAIN, forwarded to Retain As
        Published subscriptions (MQTT-3.3.1-12, -13). A session matched by several
        subscriptions gets one copy at the highest QoS with all their Subscription
        Identifiers (MQTT-3.3.4-3, -4).

        Returns whether queued copies were written to the store (the publisher's
        PUBACK then waits for the commit).
        """
        targets: dict[str, SubOptions] = {}
        extra: dict[str, tuple[int, bool, tuple[int, ...]]] = {}
        subs = self.exact.get(topic)
        if subs:
            targets.update(subs)
        for topic_filter, subs in self.wild.items():
            if matches(topic, topic_filter):
                for client_id, options in subs.items():
                    _merge(targets, extra, client_id, options)
        for key, subs in self.shared.items():
            if subs and matches(topic, key[1]):
                client_id = self._pick(key, subs)
                _merge(targets, extra, client_id, subs[client_id])
        wrote = False
        fanout = 0
        sessions = self.sessions
        receive = self.rules.receive
        for client_id, options in targets.items():
            if options.no_local and client_id == sender:
                continue
            session = sessions.get(client_id)
            if session is not None and receive(session.principal, parsed):
                sub_qos, rap = options.qos, options.retain_as_published
                identifiers: tuple[int, ...] = ()
                if options.identifier:
                    identifiers = (options.identifier,)
                merged = extra.get(client_id)
                if merged is not None:
                    sub_qos, rap, identifiers = merged
                wrote |= self.deliver(
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
        self.fanout = fanout
        return wrote

    def _pick(self, key: tuple[str, str], subs: dict[str, SubOptions]) -> str:
        """Round robin over a shared group, preferring connected members."""
        members = sorted(subs)
        start = self._next_in_group.get(key, 0)
        self._next_in_group[key] = start + 1
        for i in range(len(members)):
            candidate = members[(start + i) % len(members)]
            session = self.sessions.get(candidate)
            if session is not None and session.conn is not None:
                return candidate
        return members[start % len(members)]

    def deliver(
        self,
        session: Session,
        topic: str,
        payload: bytes,
        qos: int,
        *,
        retain: bool,
        properties: mqtt.Properties = mqtt.NO_PROPERTIES,
        expires_at: float | None = None,
        identifiers: tuple[int, ...] = (),
    ) -> bool:
        """Send or queue one message for one session; QoS 0 is never queued offline."""
        conn = session.conn
        if qos == 0:
            if conn is not None:
                if conn.transport.buffered() > _QOS0_BUFFER_MAX:
                    self.metrics.queue_drops.labels("slow_consumer").inc()
                else:
                    conn.send_qos0(topic, payload, retain=retain, properties=properties)
            return False
        self._seq += 1
        message = Message(
            self._seq,
            topic,
            payload,
            retain=retain,
            properties=properties,
            expires_at=expires_at,
            identifiers=identifiers,
        )
        sent = 0
        if conn is not None and not session.queue and len(session.inflight) < conn.window:
            sent = conn.send_message(message)
        else:
            session.queue.append(message)
            session.queued_bytes += len(payload)
        wrote = False
        if session.persistent and self.writer is not None:
            props = b""
            if properties is not mqtt.NO_PROPERTIES:
                props = mqtt.encode_properties(properties, mqtt.PacketType.PUBLISH)
            self.writer.put(
                QueueAdd(
                    session.client_id,
                    message.seq,
                    topic,
                    payload,
                    1,
                    int(retain),
                    props,
                    expires_at,
                    sent,
                )
            )
            wrote = True
        if not sent and (
            len(session.queue) > self.limits.max_queued_messages
            or session.queued_bytes > self.limits.max_queued_bytes
        ):
            self._overflow(session)
        return wrote

    def _overflow(self, session: Session) -> None:
        limits = self.limits
        while session.queue and (
            len(session.queue) > limits.max_queued_messages
            or session.queued_bytes > limits.max_queued_bytes
        ):
            old = session.queue.popleft()
            session.queued_bytes -= len(old.payload)
            self._forget(session, old.seq)
            self.metrics.queue_drops.labels("overflow").inc()
            dropped = self._drop_logged.get(session.client_id, 0) + 1
            self._drop_logged[session.client_id] = dropped
            if dropped == 1 or dropped % 1000 == 0:
                log.warning(
                    "queue of %s is full (%d messages, %d bytes): dropped its oldest message "
                    "(%d dropped so far)",
                    session.client_id,
                    len(session.queue),
                    session.queued_bytes,
                    dropped,
                )

    def _forget(self, session: Session, seq: int) -> None:
        if session.persistent and self.writer is not None:
            self.writer.put(QueueRemove(session.client_id, seq))

    def acked(self, session: Session, packet_id: int) -> None:
        message = session.inflight.pop(packet_id, None)
        if message is None:
            log.debug("%s acknowledged unknown packet id %d", session.client_id, packet_id)
            return
        self._forget(session, message.seq)
        self.pump(session)

    def pump(self, session: Session) -> None:
        """Move queued messages into the in-flight window, checking access again."""
        conn = session.conn
        if conn is None:
            return
        window = conn.window
        now = self.clock()
        while session.queue and len(session.inflight) < window:
            message = session.queue.popleft()
            session.queued_bytes -= len(message.payload)
            parsed = self.parse(message.topic)
            expired = message.expires_at is not None and message.expires_at <= now
            if expired or parsed is None or not self.rules.receive(session.principal, parsed):
                if expired:  # MQTT-3.3.2-5: an expired message is not delivered
                    self.metrics.queue_drops.labels("expired").inc()
                self._forget(session, message.seq)
                continue
            packet_id = conn.send_message(message)
            if session.persistent and self.writer is not None:
                self.writer.put(QueueSent(packet_id, session.client_id, message.seq))
        if not session.queue:
            self._drop_logged.pop(session.client_id, None)

    # retained ---------------------------------------------------------------------

    def retain(self, topic: str, payload: bytes, qos: int) -> bool:
        """Store or clear (empty payload, MQTT-3.3.1-10) a retained message."""
        if payload:
            self.retained[topic] = (payload, qos)
        else:
            self.retained.pop(topic, None)
        if self.writer is None:
            return False
        if payload:
            self.writer.put(RetainSet(topic, payload, qos))
        else:
            self.writer.put(RetainClear(topic))
        return True

    def replay_retained(self, session: Session, topic_filter: str, granted: SubOptions) -> None:
        """Send the retained messages matching a new subscription that ``session`` may read."""
        if topic_filter.startswith("$share/"):
            return  # shared subscriptions get no retained messages (MQTT 5 §4.8.2)
        if "+" in topic_filter or "#" in topic_filter:
            found = [(t, v) for t, v in self.retained.items() if matches(t, topic_filter)]
        else:
            value = self.retained.get(topic_filter)
            found = [(topic_filter, value)] if value is not None else []
        for topic, (payload, qos) in found:
            parsed = self.parse(topic)
            if parsed is not None and self.rules.receive(session.principal, parsed):
                identifiers = (granted.identifier,) if granted.identifier else ()
                self.deliver(
                    session,
                    topic,
                    payload,
                    min(qos, granted.qos),
                    retain=True,
                    identifiers=identifiers,
                )

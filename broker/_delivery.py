"""Messages into sessions: the in-flight window, the bounded queue and their stored copies.

One :class:`Delivery` per broker, on the event loop. It sends through a session's
:class:`~broker._outlet.Outlet` (its connection, when it has one) and never reaches
a connection otherwise, so these rules are tested with an outlet that records what
it is given (``tests/broker/test_broker_parts.py``).

QoS 1: a packet id only inside the window (``max_inflight``, or a client's Receive
Maximum), the rest queued; a persistent session's copies are written to the store
(the publisher's PUBACK waits for that commit) and forgotten when acknowledged,
expired or dropped. QoS 0 is never queued: sent, or dropped (counted) when the
client's socket is far behind.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from fieldchat.broker._config import Limits
from fieldchat.broker._metrics import BrokerMetrics, Drop
from fieldchat.broker._session import Message, Session
from fieldchat.broker._store import StoredMessage
from fieldchat.broker._writebehind import QueueAdd, QueueRemove, QueueSent, WriteBehind
from fieldchat.schemas import mqtt
from fieldchat.schemas.errors import MalformedPacket

__all__ = ["Delivery"]

log = logging.getLogger("broker")

_QOS0_BUFFER_MAX = 1 << 20  # a socket this far behind drops QoS 0 (counted)


class Delivery:
    """Send or queue messages for sessions.

    ``may_receive(session, topic)``: whether the session may still read ``topic``
    (checked again when a queued message leaves: membership may have changed since).
    ``writer``: the store, for persistent sessions (None: nothing is stored).
    """

    def __init__(
        self,
        limits: Limits,
        metrics: BrokerMetrics,
        clock: Callable[[], float],
        may_receive: Callable[[Session, str], bool],
    ) -> None:
        self.limits = limits
        self.metrics = metrics
        self.clock = clock
        self.may_receive = may_receive
        self.writer: WriteBehind | None = None
        self.seq = 0  # of queued copies, across sessions and restarts
        self._drop_logged: dict[str, int] = {}

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
        """Send or queue one message for one session; return whether its copy was
        written to the store (the publisher's PUBACK then waits for the commit)."""
        outlet = session.outlet
        if qos == 0:
            if outlet is not None:
                if outlet.buffered() > _QOS0_BUFFER_MAX:
                    self.metrics.queue_drops.labels(Drop.SLOW_CONSUMER).inc()
                else:
                    message = Message(0, topic, payload, retain=retain, properties=properties)
                    outlet.send(message, 0, None, dup=False)
            return False
        self.seq += 1
        message = Message(
            self.seq,
            topic,
            payload,
            retain=retain,
            properties=properties,
            expires_at=expires_at,
            identifiers=identifiers,
        )
        sent = 0
        if outlet is not None and not session.queue and len(session.inflight) < outlet.window:
            sent = self._send(session, message)
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

    def _send(self, session: Session, message: Message) -> int:
        """Send a QoS 1 message under a new packet id and keep it in flight; return
        the id (0: it may not go to this client, and counts as delivered)."""
        assert session.outlet is not None
        packet_id = session.allocate_id()
        if not session.outlet.send(message, 1, packet_id, dup=False):
            return 0
        session.inflight[packet_id] = message
        return packet_id

    def _overflow(self, session: Session) -> None:
        limits = self.limits
        while session.queue and (
            len(session.queue) > limits.max_queued_messages
            or session.queued_bytes > limits.max_queued_bytes
        ):
            old = session.queue.popleft()
            session.queued_bytes -= len(old.payload)
            self.forget(session, old.seq)
            self.metrics.queue_drops.labels(Drop.OVERFLOW).inc()
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

    def forget(self, session: Session, seq: int) -> None:
        """The stored copy ``seq`` is done with (acknowledged, expired, dropped)."""
        if session.persistent and self.writer is not None:
            self.writer.put(QueueRemove(session.client_id, seq))

    def acked(self, session: Session, packet_id: int) -> None:
        """PUBACK of ``packet_id``: the message is delivered; the window moves on."""
        message = session.inflight.pop(packet_id, None)
        if message is None:
            log.debug("%s acknowledged unknown packet id %d", session.client_id, packet_id)
            return
        self.forget(session, message.seq)
        self.pump(session)

    def resume(self, session: Session) -> None:
        """A connection took ``session``: resend what is in flight, DUP set and in
        order (MQTT-4.4.0-1), then fill the window from the queue."""
        outlet = session.outlet
        assert outlet is not None
        for packet_id, message in list(session.inflight.items()):
            if not outlet.send(message, 1, packet_id, dup=True):
                self.acked(session, packet_id)  # expired meanwhile, or too large now
        self.pump(session)

    def pump(self, session: Session) -> None:
        """Move queued messages into the in-flight window, checking access again."""
        outlet = session.outlet
        if outlet is None:
            return
        window = outlet.window
        now = self.clock()
        while session.queue and len(session.inflight) < window:
            message = session.queue.popleft()
            session.queued_bytes -= len(message.payload)
            expired = message.expires_at is not None and message.expires_at <= now
            if expired or not self.may_receive(session, message.topic):
                if expired:  # MQTT-3.3.2-5: an expired message is not delivered
                    self.metrics.queue_drops.labels(Drop.EXPIRED).inc()
                self.forget(session, message.seq)
                continue
            packet_id = self._send(session, message)
            if session.persistent and self.writer is not None:
                self.writer.put(QueueSent(packet_id, session.client_id, message.seq))
        if not session.queue:
            self._drop_logged.pop(session.client_id, None)

    def restore(self, session: Session, item: StoredMessage, now: float) -> int:
        """Put a stored message back: in flight under its packet id if it was sent
        (resent with DUP on reconnect, MQTT-3.3.1-1, -4.4.0-1), else queued. Returns
        how many were restored (0: it expired while the broker was stopped)."""
        if item.expires_at is not None and item.expires_at <= now:
            self.forget(session, item.seq)
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

"""One client connection: CONNECT handling, the read loop, acknowledgements.

Order of a CONNECT, fixing aMQTT 0.12.1 (which touches the session first):

1. the socket waits for its CONNECT among the *pending* connections: at most
   ``max_pending_per_address`` of one address (more are closed at once) and
   ``max_pending`` in all (the oldest is closed to make room), for at most
   ``connect_timeout_s`` (:class:`~broker._quota.Admission`);
2. the credential is checked, and the client id must equal the username; a failure
   gets a CONNACK refusal and touches no session;
3. the will must be one the client may publish (not retained on inbox/msg, never on
   a roster or proposal); it is checked again when it is published, since the
   membership it was checked against may have changed;
4. only then does :meth:`Router.attach` close an existing connection of that client
   id (takeover, without its will: the client is still there) and resume or replace
   the session.

Keep-alive: a client silent for 1.5 times its keep-alive (MQTT-3.1.2-24) is closed and
its will is published, as for any close without DISCONNECT.

The connection moves packets and calls the router, acting on the values it returns
(:class:`~broker._router.Published`, the grants of a SUBSCRIBE); the router reaches
it back only as the session's :class:`~broker._outlet.Outlet` (:meth:`send`,
:meth:`kick`). MQTT 3.1.1 and 5 share this path; what 5 adds (properties, reason
codes, topic aliases, flow control, expiry) is decided in :mod:`fieldchat.broker._v5`.

Rate: after each PUBLISH of a participant, its :class:`~broker._quota.Throttle` may
say to wait; the read loop then reads nothing more from that socket until then.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import NoReturn

from fieldchat.broker import _v5 as v5
from fieldchat.broker._acks import Acks
from fieldchat.broker._acl import Principal
from fieldchat.broker._login import Evicted, LoginRefused, authenticate
from fieldchat.broker._outlet import Close
from fieldchat.broker._quota import Admission, Limit, address_key
from fieldchat.broker._router import Published, Router
from fieldchat.broker._session import Message, Session
from fieldchat.broker._trace import trace_route
from fieldchat.broker._transport import Transport
from fieldchat.schemas import mqtt
from fieldchat.schemas.errors import MalformedPacket, PacketTooLarge, UnsupportedProtocol
from fieldchat.schemas.topics import Topic

__all__ = ["Connection"]

_PINGRESP = mqtt.encode(mqtt.Pingresp())
log = logging.getLogger("broker")

_ACCEPTED = 0


class _Close(Exception):
    """Close the connection for ``reason``."""

    def __init__(self, reason: Close) -> None:
        super().__init__(reason)
        self.reason = reason


class Connection:
    """Drives one transport until it closes; the :class:`~broker._outlet.Outlet` of
    its session while it holds one."""

    def __init__(
        self, router: Router, admission: Admission[Connection], transport: Transport
    ) -> None:
        self.router = router
        self.admission = admission
        self.transport = transport
        self.session: Session | None = None
        self.principal: Principal | None = None
        self.will: mqtt.Will | None = None
        self.level: int = mqtt.ProtocolLevel.V311
        limits = router.limits
        self._metrics = router.metrics
        self._decoder = mqtt.Decoder(max_packet_size=limits.max_packet_bytes)
        # MQTT 5 flow control: what the client accepts from us (its CONNECT) …
        self.window = limits.max_inflight
        self._max_out: int | None = None
        self._aliases_out = mqtt.OutboundAliases(0)
        # … and what we accept from it (our CONNACK).
        self._aliases_in = mqtt.InboundAliases(limits.topic_alias_maximum)
        self.send_will = True
        self._keep_alive = 0.0
        self._last_rx = 0.0
        self._watchdog: asyncio.TimerHandle | None = None
        self._acks = Acks(transport.write, self._store_failed)
        self._throttle_logged = False
        self._closed = False
        self._loop = asyncio.get_running_loop()

    # lifecycle ------------------------------------------------------------------------

    async def run(self) -> None:
        reason = Close.CLOSED
        try:
            await self._serve()
        except _Close as close:
            reason = close.reason
        except PacketTooLarge as exc:
            self._disconnect(exc.code)
            reason = Close.TOO_LARGE
        except MalformedPacket as exc:
            log.info("%s: malformed packet (%s); closing", self._who(), exc)
            self._disconnect(exc.code)  # MQTT 5 §4.13.1: say why before closing
            reason = Close.MALFORMED
        except (ConnectionError, OSError):
            reason = Close.NETWORK
        except asyncio.CancelledError:
            reason = Close.SHUTDOWN
            raise
        finally:
            self._finish(reason)

    async def _serve(self) -> None:
        limits = self.router.limits
        refusal, evicted = self.admission.admit(self, address_key(self.transport.host))
        if refusal is Close.PENDING_PER_ADDRESS:
            log.info("%s: too many connections waiting for CONNECT from there", self._who())
        if refusal is not None:
            raise _Close(refusal)
        if evicted is not None:
            log.info("too many connections waiting for CONNECT: closing the oldest")
            evicted.kick(Close.PENDING_EVICTED)
        self._metrics.connections.inc()
        try:
            try:
                async with asyncio.timeout(limits.connect_timeout_s):
                    packets = await self._receive()
            except TimeoutError:
                raise _Close(Close.CONNECT_TIMEOUT) from None
            except UnsupportedProtocol:  # MQTT-3.1.2-2: CONNACK 0x01 (3.1.1 form), close
                self._refuse(v5.Refusal.PROTOCOL)
            connect = packets[0]
            if not isinstance(connect, mqtt.Connect):  # MQTT-3.1.0-1
                raise _Close(Close.NOT_CONNECT)
            await self._connect(connect)
        finally:
            self.admission.connected(self)
        await self._read_loop(packets[1:])

    async def _receive(self) -> list[mqtt.Packet]:
        """The next packets from the socket: at least one, every complete one read.

        Raises:
            ConnectionError: the peer closed the connection.
            MalformedPacket: not MQTT (PacketTooLarge: above the maximum, before the
                body is read).
        """
        while True:
            data = await self.transport.read()
            if not data:
                raise ConnectionError("closed by the peer")
            packets = self._decoder.feed(data)
            if packets:
                return packets

    def _finish(self, reason: Close) -> None:
        if self._closed:
            return
        self._closed = True
        self._acks.close()
        self.admission.leave(self)
        if self._watchdog is not None:
            self._watchdog.cancel()
        if reason.counted:
            self._metrics.disconnects.labels(reason).inc()
        session = self.session
        code = v5.DISCONNECT_REASONS.get(reason)
        graceful = reason.graceful
        if code is not None and session is not None and self.level == mqtt.ProtocolLevel.V5:
            self._disconnect(code)
            graceful = True  # let the DISCONNECT out before closing
        if session is not None:
            will = self.will if self.send_will and reason is not Close.DISCONNECT else None
            self.router.detach(session, self, will)
        if graceful:
            self.transport.close()
        else:
            self.transport.abort()

    def _disconnect(self, code: int) -> None:
        """A server DISCONNECT with ``code`` (MQTT 5 only; 3.1.1 just closes)."""
        if self.level == mqtt.ProtocolLevel.V5 and self.session is not None:
            self.transport.write(mqtt.encode(mqtt.Disconnect(code), self.level))

    def kick(self, reason: Close) -> None:
        """Close from the broker side without the will (takeover, revocation, shutdown)."""
        self.send_will = False
        self._finish(reason)

    def _who(self) -> str:
        return self.principal.username if self.principal else self.transport.peer

    # CONNECT ------------------------------------------------------------------------

    async def _connect(self, connect: mqtt.Connect) -> None:
        router = self.router
        self.level = connect.protocol_level
        try:
            principal = await authenticate(
                router, connect, peer=self.transport.peer, closed=lambda: self._closed
            )
        except LoginRefused as refused:
            self._refuse(refused.refusal)
        except Evicted:
            raise _Close(Close.PENDING_EVICTED) from None
        self.principal = principal
        self.will = connect.will
        # Authenticated: now, and only now, touch the session (takeover).
        session, present = router.attach(principal, self, connect)
        self.session = session
        keep_alive = connect.keep_alive
        properties = mqtt.NO_PROPERTIES
        if self.level == mqtt.ProtocolLevel.V5:
            self._limits_of(connect.properties)
            properties = v5.connack_properties(
                router.limits,
                connect,
                assigned=None if connect.client_id else principal.username,
                inbox=None if principal.is_gateway else router.topics.inbox(principal.username),
            )
            keep_alive = properties.server_keep_alive or keep_alive
        connack = mqtt.Connack(present, _ACCEPTED, properties)
        self.transport.write(mqtt.encode(connack, self.level))
        self._keep_alive = keep_alive * router.limits.keepalive_factor
        self._last_rx = self._loop.time()
        if self._keep_alive:
            self._watchdog = self._loop.call_later(self._keep_alive, self._check_keep_alive)
        router.resume(session)  # MQTT-4.4.0-1: unacknowledged PUBLISH again, DUP set

    def _limits_of(self, properties: mqtt.Properties) -> None:
        """What an MQTT 5 client's CONNECT allows us to send it (§3.1.2.11)."""
        if properties.receive_maximum is not None:  # MQTT-3.3.4-9
            self.window = min(self.window, properties.receive_maximum)
        self._max_out = properties.maximum_packet_size  # MQTT-3.1.2-24
        aliases = min(properties.topic_alias_maximum or 0, self.router.limits.topic_alias_maximum)
        self._aliases_out = mqtt.OutboundAliases(aliases)

    def _refuse(self, refusal: v5.Refusal) -> NoReturn:
        """A CONNACK refusal, counted; then close."""
        self._metrics.denials.labels(refusal.label).inc()
        connack = mqtt.Connack(False, refusal.code(self.level))
        self.transport.write(mqtt.encode(connack, self.level))
        self.transport.close()
        raise _Close(Close.REFUSED)

    def _check_keep_alive(self) -> None:
        idle = self._loop.time() - self._last_rx
        if idle >= self._keep_alive:
            log.info("%s silent for %.1f s (keep-alive): closing", self._who(), idle)
            self._finish(Close.KEEPALIVE)
            return
        self._watchdog = self._loop.call_later(self._keep_alive - idle, self._check_keep_alive)

    # read loop ---------------------------------------------------------------------

    async def _read_loop(self, packets: list[mqtt.Packet]) -> None:  # noqa: PLR0912 - per type
        router = self.router
        transport = self.transport
        session = self.session
        assert session is not None
        assert self.principal is not None
        throttle = router.access.throttle(self.principal)
        loop = self._loop
        while True:
            for packet in packets:
                if self._closed:
                    return
                if type(packet) is mqtt.Publish:
                    received = packet
                    if self.level == mqtt.ProtocolLevel.V5:
                        received = self._v5_publish(packet)
                    self._on_publish(received)
                    if throttle is not None:
                        size = len(packet.payload) + len(packet.topic)
                        wait, limit = throttle.take(size, loop.time())
                        if wait > 0:
                            self._throttled(wait, limit)
                            await asyncio.sleep(wait)  # TCP pushback: the client's sends block
                elif isinstance(packet, mqtt.Puback):
                    if session.outlet is self:
                        router.acked(session, packet.packet_id)
                elif isinstance(packet, mqtt.Pingreq):
                    transport.write(_PINGRESP)
                elif isinstance(packet, mqtt.Subscribe):
                    self._on_subscribe(packet)
                elif isinstance(packet, mqtt.Unsubscribe):
                    self._on_unsubscribe(packet)
                elif isinstance(packet, mqtt.Pubrel):
                    session.qos2_received.discard(packet.packet_id)
                    self._acks.send(mqtt.encode(mqtt.Pubcomp(packet.packet_id), self.level), None)
                elif isinstance(packet, mqtt.Disconnect):
                    if packet.reason_code == mqtt.ReasonCode.DISCONNECT_WITH_WILL:
                        raise _Close(Close.CLOSED)  # MQTT 5 §3.14.2.1: the will is sent
                    self.send_will = False
                    raise _Close(Close.DISCONNECT)
                elif isinstance(packet, mqtt.Auth):  # enhanced authentication: not offered
                    raise _Close(Close.AUTH_METHOD)
                else:  # a second CONNECT (MQTT-3.1.0-2), or what a server never receives
                    raise MalformedPacket(f"unexpected {packet.type.name} from a client")
            if self._closed:
                return
            packets = await self._receive()
            self._last_rx = loop.time()

    def _throttled(self, wait: float, limit: Limit) -> None:
        self._metrics.throttled.labels(limit).inc()
        if not self._throttle_logged:
            self._throttle_logged = True
            log.info(
                "%s publishes faster than its quota (%s): reading it %.3f s later",
                self._who(),
                limit,
                wait,
            )

    def _v5_publish(self, packet: mqtt.Publish) -> mqtt.Publish:
        """Resolve a topic alias (MQTT 5 §3.3.2.3.4) and check the Receive Maximum.

        Raises:
            MalformedPacket: a bad alias (0x94 / 0x82).
            _Close: more unacknowledged QoS 1/2 PUBLISH than we allow (0x93).
        """
        if packet.qos and len(self._acks) >= self.router.limits.receive_maximum:
            raise _Close(Close.RECEIVE_MAXIMUM)  # MQTT-3.3.4-8
        return v5.resolve_alias(packet, self._aliases_in)

    def _on_publish(self, packet: mqtt.Publish) -> None:
        session = self.session
        assert session is not None
        assert self.principal is not None
        start = time.time_ns() if self.router.tracer is not None else 0
        packet_id = packet.packet_id
        if packet.qos == 2 and packet_id in session.qos2_received:
            # Received before (maybe on an earlier connection): PUBREC again, deliver
            # nothing (MQTT-4.3.3-10).
            self._acks.send(mqtt.encode(mqtt.Pubrec(packet_id), self.level), None)
            return
        published = self.router.publish(self.principal, session, packet)
        if start:
            self._trace_route(packet, published, start)
        if published.denial is not None:
            self._denied(packet, published)
        elif packet.qos == 1 and packet_id is not None:
            self._acks.send(mqtt.encode(mqtt.Puback(packet_id), self.level), published.pending)
        elif packet.qos == 2 and packet_id is not None:
            session.qos2_received.add(packet_id)
            self._acks.send(mqtt.encode(mqtt.Pubrec(packet_id), self.level), published.pending)

    def _trace_route(self, packet: mqtt.Publish, published: Published, start: int) -> None:
        tracer = self.router.tracer
        if tracer is not None:
            denied = published.denial.value if published.denial is not None else None
            parsed: Topic | None = published.parsed
            trace_route(tracer, packet, parsed, start, published.pending, denied, published.fanout)

    def _denied(self, packet: mqtt.Publish, published: Published) -> None:
        """Tell the client (MQTT 5: a negative PUBACK or PUBREC, or DISCONNECT, with the
        reason code; 3.1.1: an acknowledgement, or the close)."""
        assert published.denial is not None
        code = v5.denial_code(published.denial) if self.level == mqtt.ProtocolLevel.V5 else 0
        if published.disconnect:
            self._disconnect(code)
            raise _Close(Close.DENIED_PUBLISH)
        session = self.session
        assert session is not None
        if packet.qos == 1 and packet.packet_id is not None:
            self._acks.send(mqtt.encode(mqtt.Puback(packet.packet_id, code), self.level), None)
        elif packet.qos == 2 and packet.packet_id is not None:
            if not code:  # refused QoS 2 ends at the PUBREC (MQTT-4.3.3-4 note)
                session.qos2_received.add(packet.packet_id)
            self._acks.send(mqtt.encode(mqtt.Pubrec(packet.packet_id, code), self.level), None)

    def _store_failed(self) -> None:
        log.error("store write failed: closing %s without acknowledging", self._who())
        self._finish(Close.STORE_ERROR)

    def _on_subscribe(self, packet: mqtt.Subscribe) -> None:
        session = self.session
        assert session is not None
        results, replay = self.router.subscribe(session, packet)
        v5_level = self.level == mqtt.ProtocolLevel.V5
        codes = [
            v5.suback_code(s.topic_filter, r, v5_level=v5_level)
            for s, r in zip(packet.subscriptions, results, strict=True)
        ]
        self.transport.write(mqtt.encode(mqtt.Suback(packet.packet_id, tuple(codes)), self.level))
        for topic_filter, options in replay:  # MQTT-3.3.1-6, after the SUBACK
            self.router.replay_retained(session, topic_filter, options)

    def _on_unsubscribe(self, packet: mqtt.Unsubscribe) -> None:
        session = self.session
        assert session is not None
        existed = self.router.unsubscribe(session, packet.topic_filters)
        codes: tuple[int, ...] = ()
        if self.level == mqtt.ProtocolLevel.V5:
            codes = tuple(0 if e else mqtt.ReasonCode.NO_SUBSCRIPTION_EXISTED for e in existed)
        self.transport.write(mqtt.encode(mqtt.Unsuback(packet.packet_id, codes), self.level))

    # the session's outlet --------------------------------------------------------------

    def buffered(self) -> int:
        return self.transport.buffered()

    def send(self, message: Message, qos: int, packet_id: int | None, *, dup: bool) -> bool:
        """Write a PUBLISH of ``message``; False (counted) when it may not go to this
        client: expired, or above its Maximum Packet Size (MQTT 5)."""
        if self.level == mqtt.ProtocolLevel.V5:
            data, dropped = v5.publish_bytes(
                message,
                qos,
                packet_id,
                dup=dup,
                aliases=self._aliases_out,
                max_size=self._max_out,
                now=self.router.clock(),
            )
            if data is None:
                self._metrics.queue_drops.labels(dropped).inc()
                return False
        else:
            data = mqtt.encode_publish(
                message.topic_bytes, message.payload, qos, packet_id, retain=message.retain, dup=dup
            )
        self.transport.write(data)
        self._metrics.messages_out.inc()
        return True

"""One client connection: CONNECT handling, the read loop, acknowledgements.

Order of a CONNECT, fixing aMQTT 0.12.1 (which touches the session first):

1. the socket waits for its CONNECT among the *pending* connections: at most
   ``max_pending_per_address`` of one address (more are closed at once) and
   ``max_pending`` in all (the oldest is closed to make room), for at most
   ``connect_timeout_s``;
2. the credential is checked, and the client id must equal the username; a failure
   gets a CONNACK refusal and touches no session;
3. the will must be one the client may publish (not retained on inbox/msg, never on
   a roster or proposal); it is checked again when it is published, since the
   membership it was checked against may have changed;
4. only then is an existing connection of that client id closed (takeover, without
   its will: the client is still there) and the session resumed or replaced.

Keep-alive: a client silent for 1.5 times its keep-alive (MQTT-3.1.2-24) is closed and
its will is published, as for any close without DISCONNECT.

MQTT 3.1.1 and 5 share this path; what 5 adds (properties, reason codes, topic
aliases, flow control, expiry) is decided in :mod:`broker._v5`.

Rate: after each PUBLISH of a participant, its :class:`~broker._quota.Throttle` may
say to wait; the read loop then reads nothing more from that socket until then.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque

from broker import _v5 as v5
from broker._acl import Deny, Principal
from broker._credentials import verify_credential
from broker._quota import address_key
from broker._router import Router
from broker._session import Message, Session, SubOptions
from broker._trace import trace_route
from broker._transport import Transport
from schemas import mqtt
from schemas.errors import MalformedPacket, PacketTooLarge, UnsupportedProtocol
from schemas.topics import Topic, TopicKind

__all__ = ["Connection"]

_PINGRESP = mqtt.encode(mqtt.Pingresp())
log = logging.getLogger("broker")

_ACCEPTED = 0
_BAD_PROTOCOL = 1  # 3.1.1; MQTT 5 says 0x84 Unsupported Protocol Version
_ID_REJECTED = 2
_BAD_CREDENTIALS = 4
_NOT_AUTHORIZED = 5
_SUBACK_FAILURE = 0x80
_V5_REFUSALS = {  # the MQTT 5 reason code of each 3.1.1 CONNACK return code (§3.2.2.2)
    _BAD_PROTOCOL: mqtt.ReasonCode.UNSUPPORTED_PROTOCOL_VERSION,
    _ID_REJECTED: mqtt.ReasonCode.CLIENT_IDENTIFIER_NOT_VALID,
    _BAD_CREDENTIALS: mqtt.ReasonCode.BAD_USER_NAME_OR_PASSWORD,
    _NOT_AUTHORIZED: mqtt.ReasonCode.NOT_AUTHORIZED,
}


class _Close(Exception):
    """Close the connection; ``reason`` labels the metric."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Connection:
    """Drives one transport until it closes."""

    def __init__(self, router: Router, transport: Transport) -> None:
        self.router = router
        self.transport = transport
        self.session: Session | None = None
        self.principal: Principal | None = None
        self.will: mqtt.Will | None = None
        self.level: int = mqtt.ProtocolLevel.V311
        limits = router.limits
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
        self._acks: deque[tuple[bytes, asyncio.Future[None] | None]] = deque()
        self._throttle_logged = False
        self._closed = False
        self._loop = asyncio.get_running_loop()

    # lifecycle ------------------------------------------------------------------------

    async def run(self) -> None:
        reason = "closed"
        try:
            await self._serve()
        except _Close as close:
            reason = close.reason
        except PacketTooLarge as exc:
            self._disconnect(exc.code)
            reason = "too_large"
        except MalformedPacket as exc:
            log.info("%s: malformed packet (%s); closing", self._who(), exc)
            self._disconnect(exc.code)  # MQTT 5 §4.13.1: say why before closing
            reason = "malformed"
        except (ConnectionError, OSError):
            reason = "network"
        except asyncio.CancelledError:
            reason = "shutdown"
            raise
        finally:
            self._finish(reason)

    async def _serve(self) -> None:
        router = self.router
        pending = router.pending
        # Full: logged-in clients hold the rest. With the pending ones at their cap too,
        # the oldest pending one makes room (below), so a flood cannot refuse a login.
        if len(router.connections) >= router.limits.max_connections and len(pending) < (
            pending.total
        ):
            raise _Close("max_connections")
        admitted, evicted = pending.admit(self, address_key(self.transport.host))
        if not admitted:
            log.info("%s: too many connections waiting for CONNECT from there", self._who())
            raise _Close("pending_per_address")
        if evicted is not None:
            log.info("too many connections waiting for CONNECT: closing the oldest")
            evicted.kick("pending_evicted")
        router.connections.add(self)
        router.metrics.connections.inc()
        try:
            try:
                async with asyncio.timeout(router.limits.connect_timeout_s):
                    packets = await self._receive()
            except TimeoutError:
                raise _Close("connect_timeout") from None
            except UnsupportedProtocol:  # MQTT-3.1.2-2: CONNACK 0x01 (3.1.1 form), close
                self._refuse(_BAD_PROTOCOL, "protocol")
            connect = packets[0]
            if not isinstance(connect, mqtt.Connect):  # MQTT-3.1.0-1
                raise _Close("not_connect")
            await self._connect(connect)
        finally:
            pending.discard(self)
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

    def _finish(self, reason: str) -> None:
        if self._closed:
            return
        self._closed = True
        router = self.router
        router.connections.discard(self)
        router.pending.discard(self)
        if self._watchdog is not None:
            self._watchdog.cancel()
        if reason not in ("closed", "disconnect", "network"):
            router.metrics.disconnects.labels(reason).inc()
        session = self.session
        code = v5.DISCONNECT_REASONS.get(reason)
        graceful = reason in ("disconnect", "refused")
        if code is not None and session is not None and self.level == mqtt.ProtocolLevel.V5:
            self._disconnect(code)
            graceful = True  # let the DISCONNECT out before closing
        if session is not None and session.conn is self:
            router.metrics.connected.dec()
            session.conn = None
            if self.will is not None and self.send_will and reason != "disconnect":
                self._will_due(session, self.will)
            if not session.persistent:
                router.drop_session(session)
            else:
                router.offline(session)
        if graceful:
            self.transport.close()
        else:
            self.transport.abort()

    def _will_due(self, session: Session, will: mqtt.Will) -> None:
        """Publish the will now, or after its Will Delay Interval (MQTT 5 §3.1.3.2.2)
        if the session outlives the connection."""
        delay = will.properties.will_delay_interval or 0
        if delay and session.persistent:
            self.router.delay_will(
                session, min(delay, session.expiry), lambda: self._publish_will(will)
            )
        else:
            self._publish_will(will)

    def _disconnect(self, code: int) -> None:
        """A server DISCONNECT with ``code`` (MQTT 5 only; 3.1.1 just closes)."""
        if self.level == mqtt.ProtocolLevel.V5 and self.session is not None:
            self.transport.write(mqtt.encode(mqtt.Disconnect(code), self.level))

    def kick(self, reason: str) -> None:
        """Close from the broker side without the will (takeover, revocation, shutdown)."""
        self.send_will = False
        self._finish(reason)

    def _who(self) -> str:
        return self.principal.username if self.principal else self.transport.peer

    # CONNECT ------------------------------------------------------------------------

    async def _authenticate(self, connect: mqtt.Connect) -> Principal:
        """Steps 2 and 3 of the module docstring; a refusal raises :class:`_Close`."""
        router = self.router
        self.level = connect.protocol_level
        if connect.properties.authentication_method is not None:  # no enhanced auth
            self._refuse(mqtt.ReasonCode.BAD_AUTHENTICATION_METHOD, "auth")
        account = router.account(connect.username or "")
        ok = False
        if account is not None and connect.password is not None:
            ok = await asyncio.to_thread(verify_credential, connect.password, account.hash)
            # The account may have been revoked while we were hashing.
            ok = ok and router.accounts.get(account.username) is account
        if self._closed:  # evicted from the pending connections while we were hashing
            raise _Close("pending_evicted")
        if not ok:
            log.info(
                "login refused for %r from %s", (connect.username or "")[:64], self.transport.peer
            )
            await asyncio.sleep(router.limits.auth_failure_delay_s)
            self._refuse(_BAD_CREDENTIALS, "auth")
        assert account is not None
        client_id = connect.client_id or self._assigned(account.username)
        if client_id != account.username:
            self._refuse(_ID_REJECTED, "client_id")
        principal = Principal(account.username, account.role)
        will = connect.will
        if will is not None:
            denial = router.rules.will(principal, will.topic, will.payload, retain=will.retain)
            if denial is not None:
                log.info(
                    "%s: will on %r refused (%s)", principal.username, will.topic[:120], denial
                )
                self._refuse(_NOT_AUTHORIZED, "will")
        return principal

    def _assigned(self, username: str) -> str:
        """MQTT 5 lets a client send an empty client id and take the one the server
        assigns (MQTT-3.1.3-6, -7): ours is always the username. 3.1.1 refuses it."""
        return username if self.level == mqtt.ProtocolLevel.V5 else ""

    async def _connect(self, connect: mqtt.Connect) -> None:
        router = self.router
        metrics = router.metrics
        principal = await self._authenticate(connect)
        self.principal = principal
        self.will = connect.will
        persistent, expiry = v5.session_expiry(connect)
        # Authenticated: now, and only now, touch the session (takeover).
        session = router.sessions.get(principal.username)
        if session is not None and session.conn is not None:
            log.info("%s connected again: closing its previous connection", principal.username)
            session.conn.kick("takeover")
        present = False
        if session is not None and (connect.clean_start or not session.persistent):
            router.drop_session(session)
            session = None
        if session is None:
            session = Session(principal.username, principal, persistent=persistent, expiry=expiry)
            router.sessions[session.client_id] = session
        else:
            present = True
            session.principal = principal
            session.expiry = expiry  # the new CONNECT's interval applies (MQTT-3.1.2-23)
        router.online(session)
        router.persist_session(session)
        self.session = session
        session.conn = self
        metrics.connected.inc()
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
        # MQTT-4.4.0-1: resend unacknowledged PUBLISH packets (DUP set), in order.
        for packet_id, message in list(session.inflight.items()):
            if not self._write_publish(message, packet_id, dup=True):
                router.acked(session, packet_id)  # expired meanwhile, or too large now
        router.pump(session)

    def _limits_of(self, properties: mqtt.Properties) -> None:
        """What an MQTT 5 client's CONNECT allows us to send it (§3.1.2.11)."""
        if properties.receive_maximum is not None:  # MQTT-3.3.4-9
            self.window = min(self.window, properties.receive_maximum)
        self._max_out = properties.maximum_packet_size  # MQTT-3.1.2-24
        aliases = min(properties.topic_alias_maximum or 0, self.router.limits.topic_alias_maximum)
        self._aliases_out = mqtt.OutboundAliases(aliases)

    def _refuse(self, code: int, reason: str) -> None:
        self.router.metrics.denials.labels(reason).inc()
        if self.level == mqtt.ProtocolLevel.V5:
            code = _V5_REFUSALS.get(code, code)
        self.transport.write(mqtt.encode(mqtt.Connack(False, code), self.level))
        self.transport.close()
        raise _Close("refused")

    def _check_keep_alive(self) -> None:
        idle = self._loop.time() - self._last_rx
        if idle >= self._keep_alive:
            log.info("%s silent for %.1f s (keep-alive): closing", self._who(), idle)
            self._finish("keepalive")
            return
        self._watchdog = self._loop.call_later(self._keep_alive - idle, self._check_keep_alive)

    def _publish_will(self, will: mqtt.Will) -> None:
        router = self.router
        assert self.principal is not None
        # Checked again now: the membership the CONNECT was checked against may be gone.
        denial = router.rules.will(self.principal, will.topic, will.payload, retain=will.retain)
        parsed = router.parse(will.topic)
        if denial is not None or parsed is None:
            router.metrics.denials.labels("will").inc()
            log.info(
                "%s: will on %r not published (%s)",
                self.principal.username,
                will.topic[:120],
                denial.value if denial else "topic",
            )
            return
        router.metrics.messages_in.inc()
        properties = will.properties
        expires_at = None
        if properties.message_expiry_interval is not None:
            expires_at = router.clock() + properties.message_expiry_interval
        router.route(
            will.topic,
            will.payload,
            will.qos,
            parsed,
            retain=will.retain,
            properties=v5.forwarded(properties),
            expires_at=expires_at,
        )
        if will.retain:
            router.retain(will.topic, will.payload, will.qos)

    # read loop ---------------------------------------------------------------------

    async def _read_loop(self, packets: list[mqtt.Packet]) -> None:  # noqa: PLR0912 - per type
        router = self.router
        transport = self.transport
        session = self.session
        assert session is not None
        assert self.principal is not None
        throttle = router.throttle(self.principal)
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
                        wait, limit_name = throttle.take(size, loop.time())
                        if wait > 0:
                            self._throttled(wait, limit_name)
                            await asyncio.sleep(wait)  # TCP pushback: the client's sends block
                elif isinstance(packet, mqtt.Puback):
                    if session.conn is self:
                        router.acked(session, packet.packet_id)
                elif isinstance(packet, mqtt.Pingreq):
                    transport.write(_PINGRESP)
                elif isinstance(packet, mqtt.Subscribe):
                    self._on_subscribe(packet)
                elif isinstance(packet, mqtt.Unsubscribe):
                    self._on_unsubscribe(packet)
                elif isinstance(packet, mqtt.Pubrel):
                    session.qos2_received.discard(packet.packet_id)
                    self._ack(mqtt.encode(mqtt.Pubcomp(packet.packet_id), self.level), None)
                elif isinstance(packet, mqtt.Disconnect):
                    if packet.reason_code == mqtt.ReasonCode.DISCONNECT_WITH_WILL:
                        raise _Close("closed")  # MQTT 5 §3.14.2.1: the will is sent
                    self.send_will = False
                    raise _Close("disconnect")
                elif isinstance(packet, mqtt.Auth):  # enhanced authentication: not offered
                    raise _Close("auth_method")
                else:  # a second CONNECT (MQTT-3.1.0-2), or what a server never receives
                    raise MalformedPacket(f"unexpected {packet.type.name} from a client")
            if self._closed:
                return
            packets = await self._receive()
            self._last_rx = loop.time()

    def _throttled(self, wait: float, limit_name: str) -> None:
        self.router.metrics.throttled.labels(limit_name).inc()
        if not self._throttle_logged:
            self._throttle_logged = True
            log.info(
                "%s publishes faster than its quota (%s): reading it %.3f s later",
                self._who(),
                limit_name,
                wait,
            )

    def _v5_publish(self, packet: mqtt.Publish) -> mqtt.Publish:
        """Resolve a topic alias (MQTT 5 §3.3.2.3.4) and check the Receive Maximum.

        Raises:
            MalformedPacket: a bad alias (0x94 / 0x82).
            _Close: more unacknowledged QoS 1/2 PUBLISH than we allow (0x93).
        """
        if packet.qos and len(self._acks) >= self.router.limits.receive_maximum:
            raise _Close("receive_maximum")  # MQTT-3.3.4-8
        if packet.properties.topic_alias is None:
            return packet
        topic = self._aliases_in.resolve(packet)
        if topic is packet.topic:
            return packet
        return mqtt.Publish(  # not dataclasses.replace: this runs per aliased message
            topic,
            packet.payload,
            packet.qos,
            packet.retain,
            packet.dup,
            packet.packet_id,
            packet.properties,
        )

    def _on_publish(self, packet: mqtt.Publish) -> None:  # noqa: PLR0912 - the publish path
        router = self.router
        principal = self.principal
        session = self.session
        assert principal is not None
        assert session is not None
        start = time.time_ns() if router.tracer is not None else 0
        if packet.qos == 2 and packet.packet_id in session.qos2_received:
            # Received before (maybe on an earlier connection): PUBREC again, deliver
            # nothing (MQTT-4.3.3-10).
            self._ack(mqtt.encode(mqtt.Pubrec(packet.packet_id), self.level), None)
            return
        denial, roster = router.authorize(
            principal, packet.topic, packet.payload, retain=packet.retain
        )
        if denial is not None:
            if start:
                self._trace_route(packet, router.parse(packet.topic), start, None, denial.value)
            self._denied(packet, denial)
            return
        if roster is not None:
            router.adopt_roster(roster)
        parsed = router.parse(packet.topic)
        assert parsed is not None
        router.metrics.messages_in.inc()
        properties, expires_at = packet.properties, None
        if properties is not mqtt.NO_PROPERTIES:
            if properties.message_expiry_interval is not None:
                expires_at = router.clock() + properties.message_expiry_interval
            properties = v5.forwarded(properties)
        wrote = router.route(
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
            wrote = router.retain_roster(parsed.cid, packet.payload) or wrote
        elif packet.retain:
            wrote = router.retain(packet.topic, packet.payload, packet.qos) or wrote
        if packet.qos == 0 or packet.packet_id is None:
            if start:
                self._trace_route(packet, parsed, start, None, None)
            return
        pending = router.writer.committed() if wrote and router.writer is not None else None
        if start:
            self._trace_route(packet, parsed, start, pending, None)
        if packet.qos == 1:
            self._ack(mqtt.encode(mqtt.Puback(packet.packet_id), self.level), pending)
        else:
            session.qos2_received.add(packet.packet_id)
            self._ack(mqtt.encode(mqtt.Pubrec(packet.packet_id), self.level), pending)

    def _trace_route(
        self,
        packet: mqtt.Publish,
        parsed: Topic | None,
        start: int,
        pending: asyncio.Future[None] | None,
        denied: str | None,
    ) -> None:
        tracer = self.router.tracer
        if tracer is not None:
            fanout = 0 if denied else self.router.fanout
            trace_route(tracer, packet, parsed, start, pending, denied, fanout)

    def _denied(self, packet: mqtt.Publish, denial: Deny) -> None:
        router = self.router
        router.metrics.denials.labels(denial.value).inc()
        log.info("%s may not publish to %r (%s)", self._who(), packet.topic[:120], denial.value)
        # MQTT 5 says why: a negative PUBACK (or DISCONNECT) with the reason code.
        code = v5.denial_code(denial) if self.level == mqtt.ProtocolLevel.V5 else 0
        if denial.disconnects or (denial.is_race and router.config.on_not_member == "disconnect"):
            self._disconnect(code)
            raise _Close("denied_publish")
        session = self.session
        assert session is not None
        if packet.qos == 1 and packet.packet_id is not None:
            self._ack(mqtt.encode(mqtt.Puback(packet.packet_id, code), self.level), None)
        elif packet.qos == 2 and packet.packet_id is not None:
            if not code:  # refused QoS 2 ends at the PUBREC (MQTT-4.3.3-4 note)
                session.qos2_received.add(packet.packet_id)
            self._ack(mqtt.encode(mqtt.Pubrec(packet.packet_id, code), self.level), None)

    def _ack(self, data: bytes, pending: asyncio.Future[None] | None) -> None:
        """Acknowledge in PUBLISH order (MQTT-4.6.0-2), after ``pending`` commits."""
        if pending is None and not self._acks:
            self.transport.write(data)
            return
        self._acks.append((data, pending))
        if pending is not None and not pending.done():
            pending.add_done_callback(self._flush_acks)
        else:
            self._flush_acks()

    def _flush_acks(self, _: object = None) -> None:
        acks = self._acks
        while acks and not self._closed:
            data, pending = acks[0]
            if pending is not None:
                if not pending.done():
                    return
                if pending.cancelled() or pending.exception() is not None:
                    log.error("store write failed: closing %s without acknowledging", self._who())
                    self._finish("store_error")
                    return
            acks.popleft()
            self.transport.write(data)

    def _on_subscribe(self, packet: mqtt.Subscribe) -> None:
        router = self.router
        session = self.session
        principal = self.principal
        assert session is not None
        assert principal is not None
        v5_level = self.level == mqtt.ProtocolLevel.V5
        identifiers = packet.properties.subscription_identifiers
        identifier = identifiers[0] if identifiers else None
        codes: list[int] = []
        replay: list[tuple[str, SubOptions]] = []
        for subscription in packet.subscriptions:
            topic_filter = subscription.topic_filter
            shared = topic_filter.startswith("$share/")
            if shared and subscription.no_local:  # MQTT-3.8.3-4
                raise MalformedPacket("No Local on a shared subscription", code=0x82)
            denial = None if _valid_filter(topic_filter) else Deny.FORBIDDEN
            denial = denial or router.rules.subscribe(principal, topic_filter)
            new = topic_filter not in session.subscriptions
            if (
                denial is None
                and new
                and len(session.subscriptions) >= router.limits.max_subscriptions
            ):
                denial = Deny.TOO_MANY
            if denial is not None:
                router.metrics.denials.labels(denial.value).inc()
                log.info("%s may not subscribe to %r (%s)", self._who(), topic_filter[:120], denial)
                if not v5_level:
                    codes.append(_SUBACK_FAILURE)
                elif not _valid_filter(topic_filter):
                    codes.append(mqtt.ReasonCode.TOPIC_FILTER_INVALID)
                elif denial is Deny.TOO_MANY:
                    codes.append(mqtt.ReasonCode.QUOTA_EXCEEDED)
                else:  # SUBACK's codes (§3.9.3): the ACL's refusals are 0x87
                    codes.append(mqtt.ReasonCode.NOT_AUTHORIZED)
                continue
            grant = min(subscription.qos, 1)  # QoS 2 is granted as 1 (MQTT-3.9.3)
            options = SubOptions(
                grant, subscription.no_local, subscription.retain_as_published, identifier
            )
            router.add_subscription(session, topic_filter, options)
            codes.append(grant)
            handling = subscription.retain_handling  # MQTT-3.3.1-9, -10, -11
            if handling == mqtt.RetainHandling.SEND_ON_SUBSCRIBE or (
                handling == mqtt.RetainHandling.SEND_IF_NEW and new
            ):
                replay.append((topic_filter, options))
        router.persist_session(session)
        self.transport.write(mqtt.encode(mqtt.Suback(packet.packet_id, tuple(codes)), self.level))
        for topic_filter, options in replay:  # MQTT-3.3.1-6, after the SUBACK
            router.replay_retained(session, topic_filter, options)

    def _on_unsubscribe(self, packet: mqtt.Unsubscribe) -> None:
        session = self.session
        assert session is not None
        codes = []
        for topic_filter in packet.topic_filters:
            existed = self.router.remove_subscription(session, topic_filter)
            codes.append(0 if existed else mqtt.ReasonCode.NO_SUBSCRIPTION_EXISTED)
        self.router.persist_session(session)
        if self.level != mqtt.ProtocolLevel.V5:
            codes = []
        self.transport.write(mqtt.encode(mqtt.Unsuback(packet.packet_id, tuple(codes)), self.level))

    # sending -------------------------------------------------------------------------

    def send_message(self, message: Message) -> int:
        """Send a QoS 1 message in a new packet id; return the id (0: not sent, it
        exceeds the client's Maximum Packet Size or expired, and counts as delivered,
        MQTT-3.1.2-25)."""
        session = self.session
        assert session is not None
        packet_id = session.allocate_id()
        if not self._write_publish(message, packet_id, dup=False):
            return 0
        session.inflight[packet_id] = message
        return packet_id

    def _write_publish(self, message: Message, packet_id: int, *, dup: bool) -> bool:
        if self.level == mqtt.ProtocolLevel.V5:
            data = self._v5_bytes(message, 1, packet_id, dup=dup)
            if data is None:
                return False
        else:
            data = mqtt.encode_publish(
                message.topic_bytes, message.payload, 1, packet_id, retain=message.retain, dup=dup
            )
        self.transport.write(data)
        self.router.metrics.messages_out.inc()
        return True

    def _v5_bytes(
        self, message: Message, qos: int, packet_id: int | None, *, dup: bool
    ) -> bytes | None:
        """:func:`broker._v5.publish_bytes` for this client; what may not be sent is
        counted (``queue_drops``) and ``None``."""
        data, dropped = v5.publish_bytes(
            message,
            qos,
            packet_id,
            dup=dup,
            aliases=self._aliases_out,
            max_size=self._max_out,
            now=self.router.clock(),
        )
        if dropped:
            self.router.metrics.queue_drops.labels(dropped).inc()
        return data

    def send_qos0(
        self, topic: str, payload: bytes, *, retain: bool, properties: mqtt.Properties
    ) -> None:
        if self.level == mqtt.ProtocolLevel.V5:
            message = Message(0, topic, payload, retain=retain, properties=properties)
            data = self._v5_bytes(message, 0, None, dup=False)
            if data is None:
                return
        else:
            data = mqtt.encode_publish(topic.encode(), payload, 0, None, retain=retain)
        self.transport.write(data)
        self.router.metrics.messages_out.inc()


def _valid_filter(topic_filter: str) -> bool:
    """MQTT §4.7.1: non-empty; ``#`` only alone as the last level; ``+`` only alone."""
    if not topic_filter:
        return False
    levels = topic_filter.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            return False
        if "+" in level and level != "+":
            return False
    return True

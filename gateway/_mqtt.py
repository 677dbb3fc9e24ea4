"""A small asyncio MQTT client for the archiver: MQTT 3.1.1 and 5, QoS 0 and 1.

Why not aiomqtt here: aiomqtt runs paho on the event loop, and paho reads one packet
per readable event, a few bytes per ``recv()`` (command byte, each length byte, then
the body), then builds an ``MQTTMessage`` (and for v5 a ``Properties``), which
aiomqtt wraps again in its own ``Message``. Profiled in the archive benchmark, that
receive path was 85 % of the archiver's event loop (≈ 150 µs a message). Here one
``data_received`` parses every complete packet in the buffer, a PUBLISH becomes one
small object, and the PUBACKs of a committed batch leave in one write.

What the archiver needs, and nothing more:

* CONNECT with a persistent session (3.1.1 ``clean_session=0``; 5 ``clean_start=0``,
  Session Expiry Interval, Receive Maximum, Maximum Packet Size), user name and
  password, TLS.
* The broker's CONNACK limits (MQTT 5 §3.2.2.3), honoured: Receive Maximum bounds
  our unacknowledged QoS 1 publishes; Maximum Packet Size refuses a publish the
  broker would drop (``PacketTooLarge``, before it is sent); Server Keep Alive
  replaces ours; Topic Alias Maximum lets our publishes name a topic by a two-byte
  alias after its first use (:class:`schemas.mqtt.OutboundAliases`).
* SUBSCRIBE (QoS 1) and receiving PUBLISH at QoS 0 or 1. We never send Topic Alias
  Maximum, so the broker may not use topic aliases towards us (MQTT 5 §3.1.2.11.8).
* **Acknowledging when told**, not on receipt (:meth:`MqttClient.ack`): PUBACK after
  commit. PUBACKs go in receive order (MQTT 5 §4.6) because the caller acks batches in
  the order :meth:`MqttClient.take` returned them.
* PUBLISH at QoS 1 waiting for the PUBACK (browsers' envelopes), PINGREQ keep-alive.

Every packet is made and parsed by the one MQTT codec, :mod:`fieldchat.schemas.mqtt`; this
module holds the client's logic only. No QoS 2 (we subscribe at QoS 1, so the
broker never sends it), no will message.
Flow control: beyond ``inbox_max`` unread messages the socket stops being read, so
TCP pushes back on the broker; MQTT 5's Receive Maximum bounds it from the broker's
side as well.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections import deque
from dataclasses import dataclass
from typing import Literal, cast

from fieldchat.schemas import mqtt
from fieldchat.schemas.errors import ConnectFailed, MalformedPacket, NotAuthorized, TransportError

__all__ = ["Delivered", "MqttClient"]

log = logging.getLogger("fieldchat.gateway.mqtt")

_MAX_PACKET = 1 << 20  # far above any fieldchat object (PROTOCOL.md §8); larger is an error
_NOT_AUTHORIZED = frozenset({4, 5, 0x86, 0x87})  # bad credentials / not authorised (3.1.1, 5)
_PINGREQ = mqtt.encode(mqtt.Pingreq())
_CONNACK_KEY = (mqtt.PacketType.CONNACK, 0)
_REFUSED_LEVEL = frozenset({0x01, mqtt.ReasonCode.UNSUPPORTED_PROTOCOL_VERSION})


@dataclass(frozen=True, slots=True)
class Delivered:
    """One received PUBLISH. ``mid`` is the packet id (0 at QoS 0)."""

    topic: str
    payload: bytes
    qos: int
    mid: int
    retain: bool


class _Protocol(asyncio.Protocol):
    """Feeds the byte stream to the codec and hands the packets to the client."""

    def __init__(self, client: MqttClient) -> None:
        self.client = client
        self.decoder = mqtt.Decoder(level=client.level, max_packet_size=_MAX_PACKET)
        self.broken = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it
        self.transport = self.client._transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        # a connection given up for another one (the 3.1.1 fallback) fails nothing
        if self.client._transport is self.transport:
            self.client._lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.broken:
            return
        client = self.client
        inbox = client._inbox
        queued = len(inbox)
        try:  # the hot path: one object per message, straight into the inbox
            packets = self.decoder.feed(data, Delivered, inbox)
        except MalformedPacket as exc:
            self.broken = True
            client._abort(f"malformed packet from the broker ({exc})")
            return
        for packet in packets:
            client._packet(packet)
        client._received_at = time.monotonic()
        if len(inbox) > queued:
            client._arrived()


class MqttClient:
    """One connection to the broker (see the module docstring).

    Args:
        host, port: the broker.
        client_id: the session's identifier (stable across restarts: the session
            persists and the broker queues for it while we are away).
        protocol: ``"5"`` or ``"3.1.1"``.
        username, password: credentials, when the broker asks for them.
        tls: an SSL context for ``mqtts``; ``None`` for plain TCP.
        keepalive: seconds; a PINGREQ goes out at half of it (MQTT 5: at half of the
            broker's Server Keep Alive, when it sends one).
        session_expiry_s, receive_maximum: MQTT 5 CONNECT properties.
        inbox_max: unread messages beyond which the socket is not read.
        fallback_311: with ``protocol="5"``, connect again with 3.1.1 when the broker
            refuses MQTT 5 (CONNACK 0x84 or 0x01, or a close before any CONNACK, as
            3.1.1-only brokers answer it); :attr:`v5` then says which was agreed.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        client_id: str,
        protocol: Literal["5", "3.1.1"] = "5",
        username: str | None = None,
        password: str | None = None,
        tls: ssl.SSLContext | None = None,
        keepalive: int = 30,
        session_expiry_s: int = 0,
        receive_maximum: int = 65535,
        inbox_max: int = 65535,
        fallback_311: bool = False,
    ) -> None:
        self.host, self.port = host, port
        self.fallback_311 = fallback_311
        self.client_id = client_id
        self.v5 = protocol == "5"
        self.level = mqtt.ProtocolLevel.V5 if self.v5 else mqtt.ProtocolLevel.V311
        self.username, self.password, self.tls = username, password, tls
        self.keepalive = keepalive
        self.session_expiry_s = session_expiry_s
        self.receive_maximum = receive_maximum
        self.inbox_max = inbox_max
        self._transport: asyncio.Transport | None = None
        self._inbox: deque[Delivered] = deque()
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._replies: dict[tuple[int, int], asyncio.Future[mqtt.Packet]] = {}
        self._next_mid = 0
        self._error: TransportError | None = None
        self._received_at = time.monotonic()
        self._pinger: asyncio.Task[None] | None = None
        self.session_present = False
        # What the broker's CONNACK allows us (MQTT 5 §3.2.2.3); 3.1.1 states no limits.
        self.broker_receive_maximum = 65535
        self.broker_max_packet_size: int | None = None
        self._aliases = mqtt.OutboundAliases(0)
        self._in_flight: asyncio.Semaphore | None = None

    # -- connection --------------------------------------------------------------------

    async def connect(self, timeout: float = 10.0) -> None:
        """Open the connection and the session.

        Raises:
            ConnectFailed: the broker is unreachable or refused the connection.
            NotAuthorized: the broker refused the credentials.
        """
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(
                loop.create_connection(
                    lambda: _Protocol(self),
                    self.host,
                    self.port,
                    ssl=self.tls,
                    server_hostname=self.host if self.tls else None,
                ),
                timeout,
            )
        except (OSError, TimeoutError) as exc:
            raise ConnectFailed(f"cannot reach the broker at {self.host}:{self.port}") from exc
        try:
            reply = await self._request(_CONNACK_KEY, mqtt.encode(self._connect_packet()), timeout)
        except ConnectFailed:
            if not (self.v5 and self.fallback_311):
                raise
            reply = mqtt.Connack(False, mqtt.ReasonCode.UNSUPPORTED_PROTOCOL_VERSION)
        assert isinstance(reply, mqtt.Connack)
        code = reply.reason_code
        if code in _REFUSED_LEVEL and self.v5 and self.fallback_311:
            log.info("the broker refused MQTT 5 (code %d): connecting with MQTT 3.1.1", code)
            self._close_transport()
            self._transport, self._error = None, None
            self.v5, self.level = False, mqtt.ProtocolLevel.V311
            await self.connect(timeout)
            return
        if code != 0:
            self._close_transport()
            if code in _NOT_AUTHORIZED:
                raise NotAuthorized(f"the broker refused our credentials (code {code})")
            raise ConnectFailed(f"the broker refused the connection (code {code})")
        self.session_present = reply.session_present
        self._honour(reply.properties)
        self._pinger = asyncio.create_task(self._ping_loop())

    def _connect_packet(self) -> mqtt.Connect:
        properties = mqtt.NO_PROPERTIES
        if self.v5:
            properties = mqtt.Properties(
                session_expiry_interval=self.session_expiry_s,
                receive_maximum=self.receive_maximum,
                maximum_packet_size=_MAX_PACKET,
            )
        return mqtt.Connect(
            self.client_id,
            clean_start=False,  # a persistent session
            keep_alive=self.keepalive,
            username=self.username,
            password=None if self.password is None else self.password.encode(),
            protocol_level=self.level,
            properties=properties,
        )

    def _honour(self, properties: mqtt.Properties) -> None:
        """Apply the limits of the broker's CONNACK (MQTT 5 §3.2.2.3)."""
        if properties.receive_maximum is not None:
            self.broker_receive_maximum = properties.receive_maximum
        self._in_flight = asyncio.Semaphore(self.broker_receive_maximum)
        self.broker_max_packet_size = properties.maximum_packet_size
        if properties.server_keep_alive is not None:  # MQTT-3.2.2-21: use the broker's
            self.keepalive = properties.server_keep_alive
        self._aliases = mqtt.OutboundAliases(properties.topic_alias_maximum or 0)

    async def subscribe(self, subscriptions: list[tuple[str, int]], timeout: float = 10.0) -> None:
        """Subscribe and wait for the SUBACK; refused filters are logged.

        Raises:
            TransportError: the connection failed meanwhile.
        """
        mid = self._mid()
        packet = mqtt.Subscribe(
            mid, tuple(mqtt.Subscription(topic, qos) for topic, qos in subscriptions)
        )
        reply = await self._request(
            (mqtt.PacketType.SUBACK, mid), mqtt.encode(packet, self.level), timeout
        )
        assert isinstance(reply, mqtt.Suback)
        for (topic, _), code in zip(subscriptions, reply.reason_codes, strict=False):
            if code >= 0x80:
                log.warning("the broker refused our subscription to %s (code %d)", topic, code)

    async def close(self) -> None:
        """Send DISCONNECT (the session stays on the broker) and close."""
        if self._pinger is not None:
            self._pinger.cancel()
            await asyncio.gather(self._pinger, return_exceptions=True)
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(mqtt.encode(mqtt.Disconnect(), self.level))
        self._close_transport()
        self._lost(None)

    # -- receiving ---------------------------------------------------------------------

    async def wait(self, timeout: float) -> bool:
        """True once a message is waiting, False after ``timeout`` seconds.

        Raises:
            TransportError: the connection is lost (nothing unacknowledged is lost:
                the broker redelivers it to the persistent session).
        """
        if self._inbox:
            return True
        if self._error is not None:
            raise self._error
        waiter = self._waiter = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout(timeout):
                await waiter
        except TimeoutError:
            return bool(self._inbox)
        finally:
            self._waiter = None
        if self._error is not None and not self._inbox:
            raise self._error
        return True

    def take(self, limit: int) -> list[Delivered]:
        """Up to ``limit`` received messages, in receive order (not yet acknowledged)."""
        inbox = self._inbox
        count = min(limit, len(inbox))
        out = [inbox.popleft() for _ in range(count)]
        if self._paused and len(inbox) <= self.inbox_max // 2 and self._transport is not None:
            self._paused = False
            self._transport.resume_reading()
        return out

    def ack(self, messages: list[Delivered]) -> None:
        """PUBACK every QoS 1 message of ``messages``, in their order, in one write."""
        if self._transport is None or self._transport.is_closing():
            return  # not acknowledged: the broker redelivers after we reconnect
        acks = mqtt.encode_pubacks([m.mid for m in messages if m.qos])
        if acks:
            self._transport.write(acks)

    # -- publishing --------------------------------------------------------------------

    async def publish(
        self, topic: str, payload: bytes, *, retain: bool = False, timeout: float = 10.0
    ) -> None:
        """Publish at QoS 1 and wait for the broker's PUBACK.

        At most the broker's Receive Maximum wait at once (MQTT-3.3.4-7); a topic
        published before goes as its alias when the broker allows aliases.

        Raises:
            ConnectFailed: not connected, no PUBACK within ``timeout``, or a packet
                above the broker's Maximum Packet Size (MQTT-3.1.2-24: never sent).
            NotAuthorized: the broker refused it (MQTT 5 reason code 0x87).
        """
        in_flight = self._in_flight
        if in_flight is None:
            raise ConnectFailed("not connected to the broker")
        async with in_flight:
            await self._publish(topic, payload, retain=retain, timeout=timeout)

    async def _publish(self, topic: str, payload: bytes, *, retain: bool, timeout: float) -> None:
        mid = self._mid()
        properties = mqtt.NO_PROPERTIES
        name = topic
        if self.v5:
            alias, known = self._aliases.alias(topic)
            if alias is not None:
                properties = mqtt.Properties(topic_alias=alias)
                name = "" if known else topic
        packet = mqtt.encode(
            mqtt.Publish(name, payload, 1, retain, False, mid, properties), self.level
        )
        limit = self.broker_max_packet_size
        if limit is not None and len(packet) > limit:
            raise ConnectFailed(
                f"a publish of {len(packet)} bytes exceeds the broker's maximum of {limit}"
            )
        reply = await self._request((mqtt.PacketType.PUBACK, mid), packet, timeout)
        assert isinstance(reply, mqtt.Puback)
        if reply.reason_code >= 0x80:
            if reply.reason_code == mqtt.ReasonCode.NOT_AUTHORIZED:
                raise NotAuthorized(f"the broker refused our publish to {topic}")
            raise ConnectFailed(f"the broker refused our publish (code {reply.reason_code})")

    # -- internals ---------------------------------------------------------------------

    def _mid(self) -> int:
        replies = self._replies
        for _ in range(65535):
            self._next_mid = self._next_mid % 65535 + 1
            if (mqtt.PacketType.PUBACK, self._next_mid) not in replies and (
                mqtt.PacketType.SUBACK,
                self._next_mid,
            ) not in replies:
                return self._next_mid
        raise ConnectFailed("no free MQTT packet identifier")

    async def _request(self, key: tuple[int, int], packet: bytes, timeout: float) -> mqtt.Packet:
        if self._error is not None:
            raise self._error
        if self._transport is None or self._transport.is_closing():
            raise ConnectFailed("not connected to the broker")
        future: asyncio.Future[mqtt.Packet] = asyncio.get_running_loop().create_future()
        self._replies[key] = future
        try:
            self._transport.write(packet)
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            raise ConnectFailed("the broker did not answer in time") from None
        finally:
            self._replies.pop(key, None)

    def _packet(self, packet: mqtt.Packet) -> None:
        if isinstance(packet, mqtt.Puback | mqtt.Suback):
            key = (packet.type, packet.packet_id)
        elif isinstance(packet, mqtt.Connack):
            key = _CONNACK_KEY
        elif isinstance(packet, mqtt.Disconnect):
            log.warning("the broker disconnected us (reason code %d)", packet.reason_code)
            return
        else:
            if not isinstance(packet, mqtt.Pingresp):
                log.warning("unexpected MQTT packet %s from the broker", packet.type.name)
            return
        future = self._replies.get(key)
        if future is not None and not future.done():
            future.set_result(packet)

    def _arrived(self) -> None:
        """New messages are in the inbox: wake the reader; stop reading when it is full."""
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
        if not self._paused and len(self._inbox) >= self.inbox_max:
            self._paused = True
            assert self._transport is not None
            self._transport.pause_reading()

    async def _ping_loop(self) -> None:
        while self._transport is not None and not self._transport.is_closing():
            await asyncio.sleep(max(1.0, self.keepalive / 2))
            if self.keepalive and time.monotonic() - self._received_at > self.keepalive * 1.5:
                self._abort("the broker stopped answering")
                return
            if self._transport is not None and not self._transport.is_closing():
                self._transport.write(_PINGREQ)

    def _abort(self, why: str) -> None:
        self._error = ConnectFailed(why)
        if self._transport is not None:
            self._transport.abort()

    def _close_transport(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()

    def _lost(self, exc: Exception | None) -> None:
        if self._error is None:
            detail = f": {exc}" if exc else ""
            self._error = ConnectFailed(f"the connection to the broker closed{detail}")
        for future in self._replies.values():
            if not future.done():
                future.set_exception(self._error)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
        if self._pinger is not None and asyncio.current_task() is not self._pinger:
            with contextlib.suppress(RuntimeError):
                self._pinger.cancel()

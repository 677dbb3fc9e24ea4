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
  Session Expiry Interval, Receive Maximum), user name and password, TLS.
* SUBSCRIBE (QoS 1) and receiving PUBLISH at QoS 0 or 1. We never send Topic Alias
  Maximum, so the broker may not use topic aliases towards us (MQTT 5 §3.1.2.11.8).
* **Acknowledging when told**, not on receipt (:meth:`MqttClient.ack`): PUBACK after
  commit. PUBACKs go in receive order (MQTT 5 §4.6) because the caller acks batches in
  the order :meth:`MqttClient.take` returned them.
* PUBLISH at QoS 1 waiting for the PUBACK (browsers' envelopes), PINGREQ keep-alive.

No QoS 2 (we subscribe at QoS 1, so the broker never sends it), no will message.
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

from schemas.errors import ConnectFailed, NotAuthorized, TransportError

__all__ = ["MqttClient", "Publish"]

log = logging.getLogger("fieldchat.gateway.mqtt")

_CONNECT, _CONNACK, _PUBLISH, _PUBACK = 0x10, 0x20, 0x30, 0x40
_SUBSCRIBE, _SUBACK, _PINGREQ, _PINGRESP, _DISCONNECT = 0x82, 0x90, 0xC0, 0xD0, 0xE0
_PROP_SESSION_EXPIRY, _PROP_RECEIVE_MAXIMUM = 0x11, 0x21
_MAX_PACKET = 1 << 20  # far above any fieldchat object (PROTOCOL.md §8); larger is an error
_NOT_AUTHORIZED = frozenset({4, 5, 0x86, 0x87})  # bad credentials / not authorised (3.1.1, 5)


@dataclass(frozen=True, slots=True)
class Publish:
    """One received PUBLISH. ``mid`` is the packet id (0 at QoS 0)."""

    topic: str
    payload: bytes
    qos: int
    mid: int
    retain: bool


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _string(data: bytes) -> bytes:
    return len(data).to_bytes(2, "big") + data


def _packet(first: int, body: bytes) -> bytes:
    return bytes([first]) + _varint(len(body)) + body


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 21:
            raise ValueError("malformed variable byte integer")
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos += 1
        if byte < 0x80:
            return value, pos
        shift += 7


def _publish(first: int, body: bytes, v5: bool) -> Publish:
    """Decode a PUBLISH body (MQTT 5 §3.3). Raises IndexError or ValueError if malformed."""
    qos = (first >> 1) & 3
    at = 2 + ((body[0] << 8) | body[1])
    topic = body[2:at].decode()
    mid = 0
    if qos:
        mid = (body[at] << 8) | body[at + 1]
        at += 2
    if v5:  # skip the properties: we never enable topic aliases (§3.1.2.11.8)
        if body[at] < 0x80:
            at += 1 + body[at]
        else:
            props, at = _read_varint(body, at)
            at += props
    if at > len(body):
        raise ValueError("PUBLISH shorter than its fields")
    return Publish(topic, body[at:], qos, mid, bool(first & 1))


class _Protocol(asyncio.Protocol):
    """Frames the byte stream into packets and hands them to the client."""

    def __init__(self, client: MqttClient) -> None:
        self.client = client
        self.buffer = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it
        self.client._transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.client._lost(exc)

    def data_received(self, data: bytes) -> None:
        buf = self.buffer
        buf += data
        pos, end = 0, len(buf)
        client = self.client
        inbox, v5 = client._inbox, client.v5
        queued = len(inbox)
        while end - pos >= 2:
            # remaining length: up to 4 bytes, 7 bits each (MQTT 5 §1.5.5)
            size = shift = 0
            at = pos + 1
            while True:
                if at >= end:
                    size = -1
                    break
                byte = buf[at]
                size |= (byte & 0x7F) << shift
                at += 1
                if byte < 0x80:
                    break
                shift += 7
                if shift > 21:
                    client._abort("malformed remaining length")
                    return
            if size < 0 or end - at < size:
                if size > _MAX_PACKET:
                    client._abort("packet too large")
                    return
                break
            first, body = buf[pos], bytes(buf[at : at + size])
            pos = at + size
            if first & 0xF0 == _PUBLISH:  # the hot path: one object per message
                try:
                    inbox.append(_publish(first, body, v5))
                except (IndexError, ValueError):
                    client._abort("malformed PUBLISH from the broker")
                    return
            else:
                client._packet(first, body)
        del buf[:pos]
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
        keepalive: seconds; a PINGREQ goes out at half of it.
        session_expiry_s, receive_maximum: MQTT 5 CONNECT properties.
        inbox_max: unread messages beyond which the socket is not read.
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
    ) -> None:
        self.host, self.port = host, port
        self.client_id = client_id
        self.v5 = protocol == "5"
        self.username, self.password, self.tls = username, password, tls
        self.keepalive = keepalive
        self.session_expiry_s = session_expiry_s
        self.receive_maximum = receive_maximum
        self.inbox_max = inbox_max
        self._transport: asyncio.Transport | None = None
        self._inbox: deque[Publish] = deque()
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._replies: dict[tuple[int, int], asyncio.Future[bytes]] = {}
        self._next_mid = 0
        self._error: TransportError | None = None
        self._received_at = time.monotonic()
        self._pinger: asyncio.Task[None] | None = None
        self.session_present = False

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
        reply = await self._request((_CONNACK, 0), self._connect_packet(), timeout)
        code = reply[1] if len(reply) > 1 else 0xFF
        if code != 0:
            self._close_transport()
            if code in _NOT_AUTHORIZED:
                raise NotAuthorized(f"the broker refused our credentials (code {code})")
            raise ConnectFailed(f"the broker refused the connection (code {code})")
        self.session_present = bool(reply[0] & 1)
        self._pinger = asyncio.create_task(self._ping_loop())

    def _connect_packet(self) -> bytes:
        flags = 0  # clean session / clean start off: a persistent session
        payload = _string(self.client_id.encode())
        if self.username is not None:
            flags |= 0x80
            payload += _string(self.username.encode())
        if self.password is not None:
            flags |= 0x40
            payload += _string(self.password.encode())
        head = _string(b"MQTT") + bytes([5 if self.v5 else 4, flags])
        head += self.keepalive.to_bytes(2, "big")
        if self.v5:
            props = bytes([_PROP_SESSION_EXPIRY]) + self.session_expiry_s.to_bytes(4, "big")
            props += bytes([_PROP_RECEIVE_MAXIMUM]) + self.receive_maximum.to_bytes(2, "big")
            head += _varint(len(props)) + props
        return _packet(_CONNECT, head + payload)

    async def subscribe(self, subscriptions: list[tuple[str, int]], timeout: float = 10.0) -> None:
        """Subscribe and wait for the SUBACK; refused filters are logged.

        Raises:
            TransportError: the connection failed meanwhile.
        """
        mid = self._mid()
        body = mid.to_bytes(2, "big") + (b"\x00" if self.v5 else b"")
        for topic, qos in subscriptions:
            body += _string(topic.encode()) + bytes([qos])
        reply = await self._request((_SUBACK, mid), _packet(_SUBSCRIBE, body), timeout)
        pos = 2
        if self.v5:
            try:
                size, pos = _read_varint(reply, 2)
            except ValueError:
                raise ConnectFailed("malformed SUBACK from the broker") from None
            pos += size
        for (topic, _), code in zip(subscriptions, reply[pos:], strict=False):
            if code >= 0x80:
                log.warning("the broker refused our subscription to %s (code %d)", topic, code)

    async def close(self) -> None:
        """Send DISCONNECT (the session stays on the broker) and close."""
        if self._pinger is not None:
            self._pinger.cancel()
            await asyncio.gather(self._pinger, return_exceptions=True)
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(bytes([_DISCONNECT, 0]))
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

    def take(self, limit: int) -> list[Publish]:
        """Up to ``limit`` received messages, in receive order (not yet acknowledged)."""
        inbox = self._inbox
        count = min(limit, len(inbox))
        out = [inbox.popleft() for _ in range(count)]
        if self._paused and len(inbox) <= self.inbox_max // 2 and self._transport is not None:
            self._paused = False
            self._transport.resume_reading()
        return out

    def ack(self, messages: list[Publish]) -> None:
        """PUBACK every QoS 1 message of ``messages``, in their order, in one write."""
        if self._transport is None or self._transport.is_closing():
            return  # not acknowledged: the broker redelivers after we reconnect
        acks = b"".join(b"\x40\x02" + m.mid.to_bytes(2, "big") for m in messages if m.qos)
        if acks:
            self._transport.write(acks)

    # -- publishing --------------------------------------------------------------------

    async def publish(
        self, topic: str, payload: bytes, *, retain: bool = False, timeout: float = 10.0
    ) -> None:
        """Publish at QoS 1 and wait for the broker's PUBACK.

        Raises:
            ConnectFailed: not connected, or no PUBACK within ``timeout``.
            NotAuthorized: the broker refused it (MQTT 5 reason code 0x87).
        """
        mid = self._mid()
        body = _string(topic.encode()) + mid.to_bytes(2, "big")
        if self.v5:
            body += b"\x00"
        first = _PUBLISH | 0x02 | (0x01 if retain else 0)
        reply = await self._request((_PUBACK, mid), _packet(first, body + payload), timeout)
        if len(reply) > 2 and reply[2] >= 0x80:
            if reply[2] == 0x87:
                raise NotAuthorized(f"the broker refused our publish to {topic}")
            raise ConnectFailed(f"the broker refused our publish (code {reply[2]})")

    # -- internals ---------------------------------------------------------------------

    def _mid(self) -> int:
        for _ in range(65535):
            self._next_mid = self._next_mid % 65535 + 1
            if (_PUBACK, self._next_mid) not in self._replies and (
                _SUBACK,
                self._next_mid,
            ) not in self._replies:
                return self._next_mid
        raise ConnectFailed("no free MQTT packet identifier")

    async def _request(self, key: tuple[int, int], packet: bytes, timeout: float) -> bytes:
        if self._error is not None:
            raise self._error
        if self._transport is None or self._transport.is_closing():
            raise ConnectFailed("not connected to the broker")
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._replies[key] = future
        try:
            self._transport.write(packet)
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            raise ConnectFailed("the broker did not answer in time") from None
        finally:
            self._replies.pop(key, None)

    def _packet(self, first: int, body: bytes) -> None:
        kind = first & 0xF0
        if kind in (_PUBACK, _SUBACK):
            if len(body) >= 2:
                future = self._replies.get((kind, (body[0] << 8) | body[1]))
                if future is not None and not future.done():
                    future.set_result(body)
        elif kind == _CONNACK:
            future = self._replies.get((_CONNACK, 0))
            if future is not None and not future.done():
                future.set_result(body)
        elif kind == _DISCONNECT:
            code = body[0] if body else 0
            log.warning("the broker disconnected us (reason code %d)", code)
        elif kind != _PINGRESP:
            log.warning("unexpected MQTT packet type %#x from the broker", kind)

    def _arrived(self) -> None:
        """New messages are in the inbox: wake the reader; stop reading when it is full."""
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
        if not self._paused and len(self._inbox) >= self.inbox_max:
            self._paused = True
            assert self._transport is not None
            self._transport.pause_reading()

    async def _ping_loop(self) -> None:
        interval = max(1.0, self.keepalive / 2)
        while self._transport is not None and not self._transport.is_closing():
            await asyncio.sleep(interval)
            if time.monotonic() - self._received_at > self.keepalive * 1.5:
                self._abort("the broker stopped answering")
                return
            if self._transport is not None and not self._transport.is_closing():
                self._transport.write(bytes([_PINGREQ, 0]))

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

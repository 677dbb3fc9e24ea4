"""A raw-socket MQTT 3.1.1 client for tests that need control paho does not give
(no automatic PUBACK or PINGREQ, hand-made malformed packets).

``RawClient(port, level=5)`` speaks MQTT 5 under the same 3.1.1 test code: what the
test sends is re-encoded as MQTT 5 by the codec (a persistent CONNECT gets a Session
Expiry Interval of an hour), and what the broker sends is shown in 3.1.1 form
(properties and MQTT 5 reason codes of acknowledgements left out)."""

from __future__ import annotations

import dataclasses
import socket
import struct
from dataclasses import dataclass

from fieldchat.schemas import mqtt


def remaining(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def string(s: str | bytes) -> bytes:
    raw = s.encode() if isinstance(s, str) else s
    return struct.pack("!H", len(raw)) + raw


def connect_packet(
    client_id: str,
    username: str | None = None,
    password: str | None = None,
    *,
    clean: bool = True,
    keepalive: int = 60,
    will: tuple[str, bytes, int, bool] | None = None,
) -> bytes:
    flags = 0x02 if clean else 0
    payload = string(client_id)
    if will is not None:
        topic, message, qos, retain = will
        flags |= 0x04 | (qos << 3) | (0x20 if retain else 0)
        payload += string(topic) + string(message)
    if username is not None:
        flags |= 0x80
        payload += string(username)
    if password is not None:
        flags |= 0x40
        payload += string(password)
    body = string("MQTT") + bytes((4, flags)) + struct.pack("!H", keepalive) + payload
    return b"\x10" + remaining(len(body)) + body


def subscribe_packet(packet_id: int, topic_filter: str, qos: int = 1) -> bytes:
    body = struct.pack("!H", packet_id) + string(topic_filter) + bytes((qos,))
    return b"\x82" + remaining(len(body)) + body


def publish_packet(topic: str, payload: bytes, qos: int = 1, packet_id: int = 1) -> bytes:
    body = string(topic) + (struct.pack("!H", packet_id) if qos else b"") + payload
    return bytes((0x30 | (qos << 1),)) + remaining(len(body)) + body


def puback_packet(packet_id: int) -> bytes:
    return b"\x40\x02" + struct.pack("!H", packet_id)


@dataclass(frozen=True)
class Packet:
    type: int
    flags: int
    body: bytes

    @property
    def publish(self) -> tuple[str, int | None, bytes, bool, bool]:
        """``(topic, packet id, payload, dup, retain)`` of a PUBLISH."""
        (size,) = struct.unpack_from("!H", self.body)
        topic = self.body[2 : 2 + size].decode()
        pos = 2 + size
        packet_id = None
        if self.flags & 0x06:
            (packet_id,) = struct.unpack_from("!H", self.body, pos)
            pos += 2
        return topic, packet_id, self.body[pos:], bool(self.flags & 8), bool(self.flags & 1)


class RawClient:
    def __init__(self, port: int, timeout: float = 5.0, *, bind: str = "", level: int = 4) -> None:
        self.sock = socket.create_connection(
            ("127.0.0.1", port), timeout=timeout, source_address=(bind, 0) if bind else None
        )
        self._buf = b""
        self.level = level

    def send(self, data: bytes) -> None:
        if self.level == 5:
            data = b"".join(_to_v5(p) for p in mqtt.Decoder(level=4).feed(data))
        self.sock.sendall(data)

    def _read(self, n: int) -> bytes:
        while len(self._buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed by the broker")
            self._buf += chunk
        out, self._buf = self._buf[:n], self._buf[n:]
        return out

    def read(self) -> Packet:
        first = self._read(1)[0]
        length, shift = 0, 0
        header = bytearray((first,))
        while True:
            byte = self._read(1)[0]
            header.append(byte)
            length |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        body = self._read(length)
        if self.level == 5:  # shown as 3.1.1
            [packet] = mqtt.Decoder(level=5).feed(bytes(header) + body)
            data = mqtt.encode(_to_v311(packet), 4)
            [first, *_], body = data, data[len(data) - len(mqtt.encode(_to_v311(packet), 4)) :]
            body = data[2:] if data[1] < 0x80 else data[3:]
        return Packet(first >> 4, first & 0x0F, body)

    def login(self, client_id: str, username: str, password: str, **kw) -> bytes:
        """CONNECT and return the CONNACK body (``session present``, return code)."""
        self.send(connect_packet(client_id, username, password, **kw))
        packet = self.read()
        assert packet.type == 2, packet
        return packet.body[:2]

    def closed_by_peer(self, timeout: float) -> bool:
        """True when the broker closes the socket within ``timeout`` seconds."""
        self.sock.settimeout(timeout)
        try:
            while True:
                if not self.sock.recv(65536):
                    return True
        except TimeoutError:
            return False
        except OSError:
            return True

    def close(self) -> None:
        self.sock.close()


def _to_v5(packet: mqtt.Packet) -> bytes:
    if isinstance(packet, mqtt.Connect):
        properties = mqtt.NO_PROPERTIES
        if not packet.clean_start:
            properties = mqtt.Properties(session_expiry_interval=3600)
        packet = dataclasses.replace(packet, protocol_level=5, properties=properties)
    return mqtt.encode(packet, 5)


def _to_v311(packet: mqtt.Packet) -> mqtt.Packet:
    if isinstance(packet, mqtt.Connack):
        return mqtt.Connack(packet.session_present, packet.reason_code)
    if isinstance(packet, mqtt.Unsuback):
        return mqtt.Unsuback(packet.packet_id)
    if isinstance(packet, mqtt.Disconnect):
        return mqtt.Disconnect()
    if not isinstance(packet, mqtt.Pingreq | mqtt.Pingresp):  # the others carry properties
        packet = dataclasses.replace(packet, properties=mqtt.NO_PROPERTIES)
    if isinstance(packet, mqtt.Puback | mqtt.Pubrec | mqtt.Pubrel | mqtt.Pubcomp):
        packet = dataclasses.replace(packet, reason_code=0)
    return packet

"""MQTT 3.1.1 framing for the broker's hot path (OASIS MQTT 3.1.1, §2 and §3).

aMQTT's packet classes decode field by field with an ``await`` per read and accept
some malformed input (zero code points, reserved flags on SUBSCRIBE); this module
reads one whole packet (after checking its remaining length against the limit) and
decodes it from memory, strictly. Only the packets a broker receives are decoded;
only the packets a broker sends are encoded.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Protocol

from broker._errors import MalformedPacket, PacketTooLarge

__all__ = [
    "CONNECT",
    "DISCONNECT",
    "PINGREQ",
    "PUBACK",
    "PUBCOMP",
    "PUBLISH",
    "PUBREC",
    "PUBREL",
    "SUBSCRIBE",
    "UNSUBSCRIBE",
    "Connect",
    "Publish",
    "Reader",
    "Will",
    "connack",
    "packet_id_only",
    "parse_connect",
    "parse_publish",
    "parse_subscribe",
    "parse_unsubscribe",
    "pingresp",
    "puback",
    "pubcomp",
    "publish",
    "pubrec",
    "read_packet",
    "suback",
    "unsuback",
]

CONNECT = 1
CONNACK = 2
PUBLISH = 3
PUBACK = 4
PUBREC = 5
PUBREL = 6
PUBCOMP = 7
SUBSCRIBE = 8
SUBACK = 9
UNSUBSCRIBE = 10
UNSUBACK = 11
PINGREQ = 12
PINGRESP = 13
DISCONNECT = 14

# Fixed-header flags that MQTT-2.2.2-1 requires for each packet type (PUBLISH varies).
# Server-to-client types are listed so that clients (bench/broker.py) can use
# read_packet; the broker refuses them from a client in its read loop.
_REQUIRED_FLAGS = {
    CONNACK: 0,
    SUBACK: 0,
    UNSUBACK: 0,
    PINGRESP: 0,
    CONNECT: 0,
    PUBACK: 0,
    PUBREC: 0,
    PUBREL: 2,
    PUBCOMP: 0,
    SUBSCRIBE: 2,
    UNSUBSCRIBE: 2,
    PINGREQ: 0,
    DISCONNECT: 0,
}
_MAX_REMAINING = 268_435_455  # four length bytes (MQTT §2.2.3)
_H = struct.Struct("!H")


class Reader(Protocol):
    async def readexactly(self, n: int) -> bytes: ...


async def read_packet(reader: Reader, max_bytes: int) -> tuple[int, int, bytes]:
    """Read one control packet; return ``(type, flags, body)``.

    The remaining length is checked against ``max_bytes`` before the body is read,
    so an oversize packet costs no memory.

    Raises:
        asyncio.IncompleteReadError: the peer closed the connection.
        PacketTooLarge: remaining length above ``max_bytes``.
        MalformedPacket: bad length encoding, reserved type or wrong flags.
    """
    first = (await reader.readexactly(1))[0]
    length = 0
    for shift in (0, 7, 14, 21):
        byte = (await reader.readexactly(1))[0]
        length |= (byte & 0x7F) << shift
        if not byte & 0x80:
            break
    else:
        raise MalformedPacket("remaining length longer than four bytes")
    ptype, flags = first >> 4, first & 0x0F
    required = _REQUIRED_FLAGS.get(ptype)
    if ptype != PUBLISH and (required is None or flags != required):
        raise MalformedPacket(f"packet type {ptype} with flags {flags:#x} is not acceptable")
    if length > max_bytes:
        raise PacketTooLarge(f"packet of {length} bytes exceeds {max_bytes}")
    body = await reader.readexactly(length) if length else b""
    return ptype, flags, body


def _remaining(length: int) -> bytes:
    out = bytearray()
    while True:
        byte = length & 0x7F
        length >>= 7
        if length:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _string(data: bytes, pos: int, what: str) -> tuple[str, int]:
    raw, pos = _binary(data, pos, what)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedPacket(f"{what} is not UTF-8") from None
    if "\x00" in text:  # MQTT-1.5.3-2
        raise MalformedPacket(f"{what} contains U+0000")
    return text, pos


def _binary(data: bytes, pos: int, what: str) -> tuple[bytes, int]:
    if pos + 2 > len(data):
        raise MalformedPacket(f"truncated {what}")
    (size,) = _H.unpack_from(data, pos)
    end = pos + 2 + size
    if end > len(data):
        raise MalformedPacket(f"truncated {what}")
    return data[pos + 2 : end], end


@dataclass(frozen=True, slots=True)
class Will:
    topic: str
    payload: bytes
    qos: int
    retain: bool


@dataclass(frozen=True, slots=True)
class Connect:
    client_id: str
    clean_session: bool
    keep_alive: int
    username: str | None
    password: bytes | None = None
    will: Will | None = None
    protocol_level: int = 4

    def __repr__(self) -> str:  # never show the password
        return f"Connect(client_id={self.client_id!r}, username={self.username!r})"


def parse_connect(body: bytes) -> Connect:
    """Decode a CONNECT body (MQTT §3.1).

    Raises:
        MalformedPacket: anything that is not a valid MQTT 3.1.1 CONNECT.
    """
    name, pos = _string(body, 0, "protocol name")
    if pos + 4 > len(body):
        raise MalformedPacket("truncated CONNECT header")
    level, flags = body[pos], body[pos + 1]
    (keep_alive,) = _H.unpack_from(body, pos + 2)
    pos += 4
    if name != "MQTT":
        raise MalformedPacket(f"protocol name {name[:10]!r} is not MQTT")
    if flags & 0x01:  # MQTT-3.1.2-3
        raise MalformedPacket("CONNECT reserved flag set")
    will_flag, will_qos, will_retain = bool(flags & 0x04), (flags >> 3) & 3, bool(flags & 0x20)
    has_user, has_pass = bool(flags & 0x80), bool(flags & 0x40)
    if (
        will_qos == 3
        or (not will_flag and (will_qos or will_retain))
        or (has_pass and not has_user)
    ):
        raise MalformedPacket("inconsistent CONNECT flags")
    client_id, pos = _string(body, pos, "client id")
    will = None
    if will_flag:
        topic, pos = _string(body, pos, "will topic")
        payload, pos = _binary(body, pos, "will message")
        will = Will(topic, payload, will_qos, will_retain)
    username = None
    password = None
    if has_user:
        username, pos = _string(body, pos, "username")
    if has_pass:
        password, pos = _binary(body, pos, "password")
    if pos != len(body):
        raise MalformedPacket("trailing bytes after CONNECT payload")
    return Connect(client_id, bool(flags & 0x02), keep_alive, username, password, will, level)


@dataclass(frozen=True, slots=True)
class Publish:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    dup: bool
    packet_id: int | None


def parse_publish(flags: int, body: bytes) -> Publish:
    """Decode a PUBLISH (MQTT §3.3).

    Raises:
        MalformedPacket: QoS 3, a missing packet id, an invalid topic encoding.
    """
    qos = (flags >> 1) & 3
    if qos == 3:  # MQTT-3.3.1-4
        raise MalformedPacket("PUBLISH with QoS 3")
    topic, pos = _string(body, 0, "topic")
    packet_id = None
    if qos:
        if pos + 2 > len(body):
            raise MalformedPacket("truncated PUBLISH packet id")
        (packet_id,) = _H.unpack_from(body, pos)
        pos += 2
        if packet_id == 0:
            raise MalformedPacket("packet id 0")
    return Publish(topic, body[pos:], qos, bool(flags & 1), bool(flags & 8), packet_id)


def packet_id_only(body: bytes) -> int:
    """The packet id of PUBACK/PUBREC/PUBREL/PUBCOMP.

    Raises:
        MalformedPacket: not exactly two bytes.
    """
    if len(body) != 2:
        raise MalformedPacket("acknowledgement must carry exactly a packet id")
    return int(_H.unpack(body)[0])


def parse_subscribe(body: bytes) -> tuple[int, list[tuple[str, int]]]:
    """Decode a SUBSCRIBE into ``(packet id, [(filter, requested qos)])`` (MQTT §3.8).

    Raises:
        MalformedPacket: empty, truncated, or reserved bits set.
    """
    packet_id = packet_id_only(body[:2]) if len(body) >= 2 else packet_id_only(b"")
    pos, out = 2, []
    while pos < len(body):
        topic_filter, pos = _string(body, pos, "topic filter")
        if pos >= len(body):
            raise MalformedPacket("truncated SUBSCRIBE options")
        qos = body[pos]
        pos += 1
        if qos > 2:  # MQTT-3.8.3-4
            raise MalformedPacket("SUBSCRIBE with reserved option bits")
        out.append((topic_filter, qos))
    if not out:  # MQTT-3.8.3-3
        raise MalformedPacket("SUBSCRIBE without topic filters")
    return packet_id, out


def parse_unsubscribe(body: bytes) -> tuple[int, list[str]]:
    """Decode an UNSUBSCRIBE (MQTT §3.10).

    Raises:
        MalformedPacket: empty or truncated.
    """
    packet_id = packet_id_only(body[:2]) if len(body) >= 2 else packet_id_only(b"")
    pos, out = 2, []
    while pos < len(body):
        topic_filter, pos = _string(body, pos, "topic filter")
        out.append(topic_filter)
    if not out:
        raise MalformedPacket("UNSUBSCRIBE without topic filters")
    return packet_id, out


def publish(
    topic: bytes, payload: bytes, qos: int, packet_id: int | None, *, retain: bool, dup: bool
) -> bytes:
    """Encode a PUBLISH; ``topic`` is the UTF-8 topic name."""
    header = 0x30 | (8 if dup else 0) | (qos << 1) | (1 if retain else 0)
    pid = _H.pack(packet_id) if qos and packet_id is not None else b""
    length = 2 + len(topic) + len(pid) + len(payload)
    return b"".join(
        (bytes((header,)), _remaining(length), _H.pack(len(topic)), topic, pid, payload)
    )


def connack(session_present: bool, code: int) -> bytes:
    return bytes((0x20, 2, 1 if session_present else 0, code))


def puback(packet_id: int) -> bytes:
    return b"\x40\x02" + _H.pack(packet_id)


def pubrec(packet_id: int) -> bytes:
    return b"\x50\x02" + _H.pack(packet_id)


def pubcomp(packet_id: int) -> bytes:
    return b"\x70\x02" + _H.pack(packet_id)


def suback(packet_id: int, codes: list[int]) -> bytes:
    return b"\x90" + _remaining(2 + len(codes)) + _H.pack(packet_id) + bytes(codes)


def unsuback(packet_id: int) -> bytes:
    return b"\xb0\x02" + _H.pack(packet_id)


def pingresp() -> bytes:
    return b"\xd0\x00"

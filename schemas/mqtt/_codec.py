"""Packet bodies to objects and objects to packets (MQTT 3.1.1 and 5, §3).

:func:`decode` takes the fixed header's first byte and the body a framer cut
(:class:`schemas.mqtt.Decoder` does the framing); :func:`encode` returns a whole
packet. Both know the protocol level, since MQTT 5 adds properties and reason codes
to most packets. Decoding is strict: whatever §2-§3 call malformed or a protocol
error raises :class:`~schemas.errors.MalformedPacket`, and nothing else escapes.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from fieldchat.schemas.errors import MalformedPacket, UnsupportedProtocol
from fieldchat.schemas.mqtt._packets import (
    NO_PROPERTIES,
    Auth,
    Connack,
    Connect,
    Disconnect,
    Packet,
    PacketType,
    Pingreq,
    Pingresp,
    Properties,
    ProtocolLevel,
    Puback,
    Pubcomp,
    Publish,
    Pubrec,
    Pubrel,
    RetainHandling,
    Suback,
    Subscribe,
    Subscription,
    Unsuback,
    Unsubscribe,
    Will,
)
from fieldchat.schemas.mqtt._properties import WILL, decode_properties, encode_properties
from fieldchat.schemas.mqtt._wire import binary, encode_varint, read_binary, read_string, string

__all__ = ["REQUIRED_FLAGS", "decode", "encode", "encode_pubacks", "encode_publish"]

_V5 = ProtocolLevel.V5
_H = struct.Struct("!H")
_PINGREQ = Pingreq()
_PINGRESP = Pingresp()
_PROTOCOL_ERROR = 0x82

# Fixed-header flags each type must carry (MQTT-2.2.2-1, -2); PUBLISH's vary.
REQUIRED_FLAGS: dict[int, int] = {int(t): 0 for t in PacketType}
REQUIRED_FLAGS |= {PacketType.PUBREL: 2, PacketType.SUBSCRIBE: 2, PacketType.UNSUBSCRIBE: 2}
_ACKS: dict[int, type[Puback | Pubrec | Pubrel | Pubcomp]] = {
    PacketType.PUBACK: Puback,
    PacketType.PUBREC: Pubrec,
    PacketType.PUBREL: Pubrel,
    PacketType.PUBCOMP: Pubcomp,
}


def _packet_id(body: bytes, pos: int) -> int:
    if pos + 2 > len(body):
        raise MalformedPacket("truncated packet identifier")
    packet_id = (body[pos] << 8) | body[pos + 1]
    if not packet_id:  # MQTT-2.2.1-3
        raise MalformedPacket("packet identifier 0", code=_PROTOCOL_ERROR)
    return packet_id


def _properties(body: bytes, pos: int, context: int, level: int) -> tuple[Properties, int]:
    if level != _V5:
        return NO_PROPERTIES, pos
    return decode_properties(body, pos, context)


def _end(body: bytes, pos: int, what: str) -> None:
    if pos != len(body):
        raise MalformedPacket(f"trailing bytes after the {what}")


# decoding ----------------------------------------------------------------------------


def _connect(_flags: int, body: bytes, _level: int) -> Connect:
    name, pos = read_string(body, 0, "protocol name")
    if name not in ("MQTT", "MQIsdp"):  # MQTT-3.1.2-1
        raise MalformedPacket(f"protocol name {name[:10]!r} is not MQTT")
    if pos >= len(body):
        raise MalformedPacket("truncated CONNECT")
    level = body[pos]
    # The level is checked before anything that depends on it (MQTT-3.1.2-2).
    if name != "MQTT" or level not in (ProtocolLevel.V311, _V5):
        raise UnsupportedProtocol(f"protocol level {level} is not spoken here", level=level)
    if pos + 4 > len(body):
        raise MalformedPacket("truncated CONNECT")
    flags, (keep_alive,) = body[pos + 1], _H.unpack_from(body, pos + 2)
    pos += 4
    if flags & 0x01:  # MQTT-3.1.2-3
        raise MalformedPacket("CONNECT reserved flag set")
    will_flag, will_qos, will_retain = bool(flags & 0x04), (flags >> 3) & 3, bool(flags & 0x20)
    has_user, has_pass = bool(flags & 0x80), bool(flags & 0x40)
    if (
        will_qos == 3  # MQTT-3.1.2-14
        or (not will_flag and (will_qos or will_retain))  # MQTT-3.1.2-13, -15
        or (has_pass and not has_user and level != _V5)  # MQTT-3.1.2-22 (3.1.1 only)
    ):
        raise MalformedPacket("inconsistent CONNECT flags")
    properties, pos = _properties(body, pos, PacketType.CONNECT, level)
    client_id, pos = read_string(body, pos, "client identifier")
    will = None
    if will_flag:
        will_properties, pos = _properties(body, pos, WILL, level)
        topic, pos = read_string(body, pos, "will topic")
        payload, pos = read_binary(body, pos, "will payload")
        will = Will(topic, payload, will_qos, will_retain, will_properties)
    username = password = None
    if has_user:
        username, pos = read_string(body, pos, "user name")
    if has_pass:
        password, pos = read_binary(body, pos, "password")
    _end(body, pos, "CONNECT payload")
    return Connect(
        client_id, bool(flags & 0x02), keep_alive, username, password, will, level, properties
    )


def _connack(_flags: int, body: bytes, level: int) -> Connack:
    if len(body) < 2 or (level != _V5 and len(body) != 2):
        raise MalformedPacket("CONNACK of the wrong length")
    if body[0] & 0xFE:  # MQTT-3.2.2-1 reserved bits
        raise MalformedPacket("CONNACK reserved flags set")
    present, code = bool(body[0]), body[1]
    if present and code:  # MQTT-3.2.2-4 (3.1.1), MQTT-3.2.2-6 (5)
        raise MalformedPacket("session present on a refused connection")
    if len(body) == 2:  # also at level 5: a 3.1.1 server refusing our level (§3.1.2.2)
        return Connack(present, code)
    properties, pos = _properties(body, 2, PacketType.CONNACK, level)
    _end(body, pos, "CONNACK")
    return Connack(present, code, properties)


def _publish(flags: int, body: bytes, level: int) -> Publish:
    qos = (flags >> 1) & 3
    if qos == 3:  # MQTT-3.3.1-4
        raise MalformedPacket("PUBLISH with QoS 3")
    dup = bool(flags & 8)
    if dup and not qos:  # MQTT-3.3.1-2
        raise MalformedPacket("DUP set on a QoS 0 PUBLISH")
    topic, pos = read_string(body, 0, "topic name")
    packet_id = None
    if qos:
        packet_id = _packet_id(body, pos)
        pos += 2
    properties = NO_PROPERTIES
    if level == _V5:
        if pos < len(body) and body[pos] == 0:
            pos += 1  # no properties: the common case, without a call
        else:
            properties, pos = decode_properties(body, pos, PacketType.PUBLISH)
    return Publish(topic, body[pos:], qos, bool(flags & 1), dup, packet_id, properties)


def _ack(kind: int) -> Callable[[int, bytes, int], Puback | Pubrec | Pubrel | Pubcomp]:
    cls = _ACKS[kind]

    def decode_ack(_flags: int, body: bytes, level: int) -> Puback | Pubrec | Pubrel | Pubcomp:
        packet_id = _packet_id(body, 0)
        if len(body) == 2:
            return cls(packet_id)
        if level != _V5:
            raise MalformedPacket(f"{cls.type.name} must carry exactly a packet identifier")
        properties, pos = NO_PROPERTIES, 3
        if len(body) > 3:
            properties, pos = decode_properties(body, 3, kind)
        _end(body, pos, cls.type.name)
        return cls(packet_id, body[2], properties)

    return decode_ack


def _subscribe(_flags: int, body: bytes, level: int) -> Subscribe:
    packet_id = _packet_id(body, 0)
    properties, pos = _properties(body, 2, PacketType.SUBSCRIBE, level)
    out: list[Subscription] = []
    while pos < len(body):
        topic_filter, pos = read_string(body, pos, "topic filter")
        if pos >= len(body):
            raise MalformedPacket("truncated subscription options")
        options = body[pos]
        pos += 1
        qos, handling = options & 3, (options >> 4) & 3
        reserved = 0xC0 if level == _V5 else 0xFC
        if qos == 3 or handling == 3 or options & reserved:  # MQTT-3.8.3-4 (3.1.1), -5 (5)
            raise MalformedPacket("subscription options with reserved values")
        out.append(
            Subscription(
                topic_filter, qos, bool(options & 4), bool(options & 8), RetainHandling(handling)
            )
        )
    if not out:  # MQTT-3.8.3-3 (3.1.1), MQTT-3.8.3-2 (5)
        raise MalformedPacket("SUBSCRIBE without topic filters", code=_PROTOCOL_ERROR)
    return Subscribe(packet_id, tuple(out), properties)


def _suback(_flags: int, body: bytes, level: int) -> Suback:
    packet_id = _packet_id(body, 0)
    properties, pos = _properties(body, 2, PacketType.SUBACK, level)
    if pos >= len(body):
        raise MalformedPacket("SUBACK without reason codes")
    return Suback(packet_id, tuple(body[pos:]), properties)


def _unsubscribe(_flags: int, body: bytes, level: int) -> Unsubscribe:
    packet_id = _packet_id(body, 0)
    properties, pos = _properties(body, 2, PacketType.UNSUBSCRIBE, level)
    out: list[str] = []
    while pos < len(body):
        topic_filter, pos = read_string(body, pos, "topic filter")
        out.append(topic_filter)
    if not out:  # MQTT-3.10.3-2
        raise MalformedPacket("UNSUBSCRIBE without topic filters", code=_PROTOCOL_ERROR)
    return Unsubscribe(packet_id, tuple(out), properties)


def _unsuback(_flags: int, body: bytes, level: int) -> Unsuback:
    packet_id = _packet_id(body, 0)
    if level != _V5:
        _end(body, 2, "UNSUBACK")
        return Unsuback(packet_id)
    properties, pos = decode_properties(body, 2, PacketType.UNSUBACK)
    if pos >= len(body):
        raise MalformedPacket("UNSUBACK without reason codes")
    return Unsuback(packet_id, tuple(body[pos:]), properties)


def _empty(packet: Pingreq | Pingresp) -> Callable[[int, bytes, int], Pingreq | Pingresp]:
    def decode_empty(_flags: int, body: bytes, _level: int) -> Pingreq | Pingresp:
        _end(body, 0, packet.type.name)
        return packet

    return decode_empty


def _reason_and_properties(kind: int, body: bytes, level: int) -> tuple[int, Properties]:
    if level != _V5:
        if kind == PacketType.AUTH:
            raise MalformedPacket("AUTH is an MQTT 5 packet", code=_PROTOCOL_ERROR)
        _end(body, 0, "DISCONNECT")
        return 0, NO_PROPERTIES
    if not body:
        return 0, NO_PROPERTIES
    properties, pos = NO_PROPERTIES, 1
    if len(body) > 1:
        properties, pos = decode_properties(body, 1, kind)
    _end(body, pos, PacketType(kind).name)
    return body[0], properties


def _disconnect(_flags: int, body: bytes, level: int) -> Disconnect:
    return Disconnect(*_reason_and_properties(PacketType.DISCONNECT, body, level))


def _auth(_flags: int, body: bytes, level: int) -> Auth:
    return Auth(*_reason_and_properties(PacketType.AUTH, body, level))


_DECODERS: dict[int, Callable[[int, bytes, int], Packet]] = {
    PacketType.CONNECT: _connect,
    PacketType.CONNACK: _connack,
    PacketType.PUBLISH: _publish,
    PacketType.PUBACK: _ack(PacketType.PUBACK),
    PacketType.PUBREC: _ack(PacketType.PUBREC),
    PacketType.PUBREL: _ack(PacketType.PUBREL),
    PacketType.PUBCOMP: _ack(PacketType.PUBCOMP),
    PacketType.SUBSCRIBE: _subscribe,
    PacketType.SUBACK: _suback,
    PacketType.UNSUBSCRIBE: _unsubscribe,
    PacketType.UNSUBACK: _unsuback,
    PacketType.PINGREQ: _empty(_PINGREQ),
    PacketType.PINGRESP: _empty(_PINGRESP),
    PacketType.DISCONNECT: _disconnect,
    PacketType.AUTH: _auth,
}


def decode(first: int, body: bytes, level: int = ProtocolLevel.V311) -> Packet:
    """Decode one packet: ``first`` is the fixed header's first byte, ``body`` the rest
    after the remaining length. ``level`` is the connection's protocol level (a
    CONNECT carries its own).

    Raises:
        MalformedPacket: reserved type or flags, or a body that is not that packet.
        UnsupportedProtocol: a CONNECT of another protocol level (a MalformedPacket).
    """
    ptype, flags = first >> 4, first & 0x0F
    decoder = _DECODERS.get(ptype)
    if decoder is None:  # type 0 is reserved (MQTT 5 §2.1.2)
        raise MalformedPacket(f"reserved packet type {ptype}")
    if ptype != PacketType.PUBLISH and flags != REQUIRED_FLAGS[ptype]:
        raise MalformedPacket(f"packet type {ptype} with flags {flags:#x}")
    try:
        return decoder(flags, body, level)
    except (ValueError, TypeError, IndexError, struct.error) as exc:  # belt and braces
        raise MalformedPacket(f"undecodable packet type {ptype}: {exc}") from None


# encoding ----------------------------------------------------------------------------


def _frame(first: int, body: bytes) -> bytes:
    return bytes((first,)) + encode_varint(len(body)) + body


def _v5_only(packet: Packet, level: int, v5_content: bool) -> None:
    if v5_content and level != _V5:
        raise MalformedPacket(f"{packet.type.name}: MQTT 3.1.1 cannot carry this content")


def encode_publish(
    topic: bytes,
    payload: bytes,
    qos: int,
    packet_id: int | None,
    *,
    retain: bool = False,
    dup: bool = False,
    properties: bytes | None = None,
) -> bytes:
    """A PUBLISH from parts (the broker's hot path): ``topic`` is the UTF-8 topic name,
    ``properties`` an encoded property block (MQTT 5) or ``None`` (3.1.1)."""
    header = 0x30 | (8 if dup else 0) | (qos << 1) | (1 if retain else 0)
    head = len(topic).to_bytes(2, "big") + topic
    if qos:
        head += (packet_id or 0).to_bytes(2, "big")
    if properties is not None:
        head += properties
    size = len(head) + len(payload)
    if size < 0x80:
        return b"".join((bytes((header, size)), head, payload))
    return b"".join((bytes((header,)), encode_varint(size), head, payload))


def encode_pubacks(packet_ids: list[int]) -> bytes:
    """Successful PUBACKs of ``packet_ids``, in order, in one buffer (both levels: a
    PUBACK with reason Success and no properties is two bytes, MQTT 5 §3.4.2.1)."""
    return b"".join([b"\x40\x02" + i.to_bytes(2, "big") for i in packet_ids])


def _encode_connect(p: Connect, _level: int) -> bytes:
    v5 = p.protocol_level == _V5
    if p.protocol_level not in (ProtocolLevel.V311, _V5):
        raise MalformedPacket(f"protocol level {p.protocol_level} is not spoken here")
    _v5_only(p, p.protocol_level, p.properties != NO_PROPERTIES)
    flags = 0x02 if p.clean_start else 0
    payload = string(p.client_id)
    if p.will is not None:
        will = p.will
        if will.qos not in (0, 1, 2):
            raise MalformedPacket("will QoS must be 0, 1 or 2")
        _v5_only(p, p.protocol_level, will.properties != NO_PROPERTIES)
        flags |= 0x04 | (will.qos << 3) | (0x20 if will.retain else 0)
        if v5:
            payload += encode_properties(will.properties, WILL)
        payload += string(will.topic) + binary(will.payload)
    if p.username is not None:
        flags |= 0x80
        payload += string(p.username)
    if p.password is not None:
        if p.username is None and not v5:
            raise MalformedPacket("MQTT 3.1.1 sends a password only with a user name")
        flags |= 0x40
        payload += binary(p.password)
    head = string("MQTT") + bytes((p.protocol_level, flags)) + _h(p.keep_alive)
    if v5:
        head += encode_properties(p.properties, PacketType.CONNECT)
    return _frame(0x10, head + payload)


def _h(value: int) -> bytes:
    if not 0 <= value <= 0xFFFF:
        raise MalformedPacket(f"{value} does not fit two bytes")
    return _H.pack(value)


def _byte(value: int) -> bytes:
    if not 0 <= value <= 0xFF:
        raise MalformedPacket(f"{value} does not fit a byte")
    return bytes((value,))


def _encode_connack(p: Connack, level: int) -> bytes:
    if p.session_present and p.reason_code:
        raise MalformedPacket("session present on a refused connection")
    body = bytes((1 if p.session_present else 0,)) + _byte(p.reason_code)
    if level == _V5:
        body += encode_properties(p.properties, PacketType.CONNACK)
    else:
        _v5_only(p, level, p.properties != NO_PROPERTIES)
    return _frame(0x20, body)


def _encode_publish(p: Publish, level: int) -> bytes:
    if p.qos not in (0, 1, 2) or (p.dup and not p.qos):
        raise MalformedPacket("PUBLISH QoS must be 0, 1 or 2, and DUP only above 0")
    if p.qos and not p.packet_id:
        raise MalformedPacket("a QoS 1 or 2 PUBLISH needs a packet identifier")
    if level == _V5:
        properties = encode_properties(p.properties, PacketType.PUBLISH)
    else:
        _v5_only(p, level, p.properties != NO_PROPERTIES)
        properties = None
    if p.qos:
        _h(p.packet_id or 0)
    return encode_publish(
        string(p.topic)[2:],
        p.payload,
        p.qos,
        p.packet_id,
        retain=p.retain,
        dup=p.dup,
        properties=properties,
    )


def _encode_ack(p: Puback | Pubrec | Pubrel | Pubcomp, level: int) -> bytes:
    first = (p.type << 4) | REQUIRED_FLAGS[p.type]
    body = _h(p.packet_id)
    if not p.packet_id:
        raise MalformedPacket("packet identifier 0")
    if p.properties != NO_PROPERTIES:
        _v5_only(p, level, True)
        body += _byte(p.reason_code) + encode_properties(p.properties, p.type)
    elif p.reason_code:
        _v5_only(p, level, True)
        body += _byte(p.reason_code)
    return _frame(first, body)


def _id_and_properties(p: Subscribe | Suback | Unsubscribe | Unsuback, level: int) -> bytes:
    """The packet identifier, then the properties (MQTT 5) of a (UN)SUBSCRIBE/ACK."""
    if not p.packet_id:
        raise MalformedPacket(f"{p.type.name} needs a packet identifier")
    if level == _V5:
        return _h(p.packet_id) + encode_properties(p.properties, p.type)
    _v5_only(p, level, p.properties != NO_PROPERTIES)
    return _h(p.packet_id)


def _encode_subscribe(p: Subscribe, level: int) -> bytes:
    if not p.subscriptions:
        raise MalformedPacket("SUBSCRIBE needs a topic filter")
    body = _id_and_properties(p, level)
    for s in p.subscriptions:
        if s.qos not in (0, 1, 2) or s.retain_handling not in (0, 1, 2):
            raise MalformedPacket("subscription options out of range")
        options = s.qos
        if s.no_local or s.retain_as_published or s.retain_handling:
            _v5_only(p, level, True)
            options |= (4 if s.no_local else 0) | (8 if s.retain_as_published else 0)
            options |= s.retain_handling << 4
        body += string(s.topic_filter) + bytes((options,))
    return _frame(0x82, body)


def _encode_suback(p: Suback | Unsuback, level: int) -> bytes:
    body = _id_and_properties(p, level)
    if level == _V5 or p.type == PacketType.SUBACK:
        if not p.reason_codes:
            raise MalformedPacket(f"{p.type.name} needs reason codes")
    else:
        _v5_only(p, level, bool(p.reason_codes))
    return _frame(p.type << 4, body + b"".join(_byte(c) for c in p.reason_codes))


def _encode_unsubscribe(p: Unsubscribe, level: int) -> bytes:
    if not p.topic_filters:
        raise MalformedPacket("UNSUBSCRIBE needs a topic filter")
    body = _id_and_properties(p, level)
    return _frame(0xA2, body + b"".join(string(f) for f in p.topic_filters))


def _encode_reason(p: Disconnect | Auth, level: int) -> bytes:
    first = p.type << 4
    if level != _V5:
        _v5_only(p, level, p.type == PacketType.AUTH or bool(p.reason_code))
        _v5_only(p, level, p.properties != NO_PROPERTIES)
        return _frame(first, b"")
    if p.properties != NO_PROPERTIES:
        return _frame(first, _byte(p.reason_code) + encode_properties(p.properties, p.type))
    return _frame(first, _byte(p.reason_code) if p.reason_code else b"")


def encode(packet: Packet, level: int = ProtocolLevel.V311) -> bytes:  # noqa: PLR0911 - per type
    """The bytes of ``packet`` on a connection of protocol ``level`` (a CONNECT uses
    its own ``protocol_level``).

    Raises:
        MalformedPacket: a field out of range, or MQTT 5 content (properties, reason
            codes, AUTH) on a 3.1.1 connection.
    """
    if isinstance(packet, Publish):
        return _encode_publish(packet, level)
    if isinstance(packet, Puback | Pubrec | Pubrel | Pubcomp):
        return _encode_ack(packet, level)
    if isinstance(packet, Connect):
        return _encode_connect(packet, level)
    if isinstance(packet, Connack):
        return _encode_connack(packet, level)
    if isinstance(packet, Subscribe):
        return _encode_subscribe(packet, level)
    if isinstance(packet, Suback | Unsuback):
        return _encode_suback(packet, level)
    if isinstance(packet, Unsubscribe):
        return _encode_unsubscribe(packet, level)
    if isinstance(packet, Disconnect | Auth):
        return _encode_reason(packet, level)
    return bytes((packet.type << 4, 0))  # PINGREQ, PINGRESP

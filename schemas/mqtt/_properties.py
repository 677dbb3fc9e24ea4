"""MQTT 5 properties (§2.2.2): identifiers, types, where each may appear, encoding.

The table below is §2.2.2.2's, one row per property: its identifier, its wire type,
the packets allowed to carry it (``WILL`` stands for the Will Properties of a
CONNECT) and, for the few whose values the spec restricts, the values allowed. A
property in a packet its row does not list, a second copy of one that may not
repeat (§2.2.2.2: only User Property may, and Subscription Identifier in a PUBLISH
towards a client, §3.3.2.3.8) or a value out of range is a Protocol Error (0x82).
"""

from __future__ import annotations

import struct
from dataclasses import fields
from enum import IntEnum
from typing import Any

from fieldchat.schemas.errors import MalformedPacket
from fieldchat.schemas.mqtt._packets import NO_PROPERTIES, PacketType, Properties
from fieldchat.schemas.mqtt._wire import (
    MAX_VARINT,
    binary,
    encode_varint,
    read_binary,
    read_string,
    read_varint,
    string,
)

__all__ = ["WILL", "Property", "decode_properties", "encode_properties"]

WILL = 0  # the Will Properties of a CONNECT: a context of their own (§3.1.3.2)
_PROTOCOL_ERROR = 0x82


class Property(IntEnum):
    """Property identifiers (§2.2.2.2)."""

    PAYLOAD_FORMAT_INDICATOR = 0x01
    MESSAGE_EXPIRY_INTERVAL = 0x02
    CONTENT_TYPE = 0x03
    RESPONSE_TOPIC = 0x08
    CORRELATION_DATA = 0x09
    SUBSCRIPTION_IDENTIFIER = 0x0B
    SESSION_EXPIRY_INTERVAL = 0x11
    ASSIGNED_CLIENT_IDENTIFIER = 0x12
    SERVER_KEEP_ALIVE = 0x13
    AUTHENTICATION_METHOD = 0x15
    AUTHENTICATION_DATA = 0x16
    REQUEST_PROBLEM_INFORMATION = 0x17
    WILL_DELAY_INTERVAL = 0x18
    REQUEST_RESPONSE_INFORMATION = 0x19
    RESPONSE_INFORMATION = 0x1A
    SERVER_REFERENCE = 0x1C
    REASON_STRING = 0x1F
    RECEIVE_MAXIMUM = 0x21
    TOPIC_ALIAS_MAXIMUM = 0x22
    TOPIC_ALIAS = 0x23
    MAXIMUM_QOS = 0x24
    RETAIN_AVAILABLE = 0x25
    USER_PROPERTY = 0x26
    MAXIMUM_PACKET_SIZE = 0x27
    WILDCARD_SUBSCRIPTION_AVAILABLE = 0x28
    SUBSCRIPTION_IDENTIFIER_AVAILABLE = 0x29
    SHARED_SUBSCRIPTION_AVAILABLE = 0x2A


# wire types
_BYTE, _TWO, _FOUR, _VARINT, _UTF8, _BINARY, _PAIR = range(7)

P = PacketType
_ACKS = (P.PUBACK, P.PUBREC, P.PUBREL, P.PUBCOMP)
_ALL = (
    P.CONNECT,
    P.CONNACK,
    P.PUBLISH,
    WILL,
    *_ACKS,
    P.SUBSCRIBE,
    P.SUBACK,
    P.UNSUBSCRIBE,
    P.UNSUBACK,
    P.DISCONNECT,
    P.AUTH,
)
_END = (P.DISCONNECT, P.AUTH)
_FLAG = range(2)  # a Byte that must be 0 or 1

# identifier: (Properties field, wire type, packets, allowed values or None)
_TABLE: dict[int, tuple[str, int, tuple[int, ...], range | None]] = {
    0x01: ("payload_format_indicator", _BYTE, (P.PUBLISH, WILL), _FLAG),
    0x02: ("message_expiry_interval", _FOUR, (P.PUBLISH, WILL), None),
    0x03: ("content_type", _UTF8, (P.PUBLISH, WILL), None),
    0x08: ("response_topic", _UTF8, (P.PUBLISH, WILL), None),
    0x09: ("correlation_data", _BINARY, (P.PUBLISH, WILL), None),
    0x0B: ("subscription_identifiers", _VARINT, (P.PUBLISH, P.SUBSCRIBE), range(1, MAX_VARINT + 1)),
    0x11: ("session_expiry_interval", _FOUR, (P.CONNECT, P.CONNACK, P.DISCONNECT), None),
    0x12: ("assigned_client_identifier", _UTF8, (P.CONNACK,), None),
    0x13: ("server_keep_alive", _TWO, (P.CONNACK,), None),
    0x15: ("authentication_method", _UTF8, (P.CONNECT, P.CONNACK, P.AUTH), None),
    0x16: ("authentication_data", _BINARY, (P.CONNECT, P.CONNACK, P.AUTH), None),
    0x17: ("request_problem_information", _BYTE, (P.CONNECT,), _FLAG),
    0x18: ("will_delay_interval", _FOUR, (WILL,), None),
    0x19: ("request_response_information", _BYTE, (P.CONNECT,), _FLAG),
    0x1A: ("response_information", _UTF8, (P.CONNACK,), None),
    0x1C: ("server_reference", _UTF8, (P.CONNACK, P.DISCONNECT), None),
    0x1F: (
        "reason_string",
        _UTF8,
        (P.CONNACK, *_ACKS, P.SUBACK, P.UNSUBACK, P.DISCONNECT, P.AUTH),
        None,
    ),
    0x21: ("receive_maximum", _TWO, (P.CONNECT, P.CONNACK), range(1, 65536)),
    0x22: ("topic_alias_maximum", _TWO, (P.CONNECT, P.CONNACK), None),
    0x23: ("topic_alias", _TWO, (P.PUBLISH,), range(1, 65536)),
    0x24: ("maximum_qos", _BYTE, (P.CONNACK,), _FLAG),
    0x25: ("retain_available", _BYTE, (P.CONNACK,), _FLAG),
    0x26: ("user_properties", _PAIR, _ALL, None),
    0x27: ("maximum_packet_size", _FOUR, (P.CONNECT, P.CONNACK), range(1, 1 << 32)),
    0x28: ("wildcard_subscription_available", _BYTE, (P.CONNACK,), _FLAG),
    0x29: ("subscription_identifier_available", _BYTE, (P.CONNACK,), _FLAG),
    0x2A: ("shared_subscription_available", _BYTE, (P.CONNACK,), _FLAG),
}
_BY_FIELD = {name: (ident, kind, allowed) for ident, (name, kind, _, allowed) in _TABLE.items()}
_ORDER = [f.name for f in fields(Properties)]
_FIXED = {_BYTE: struct.Struct("!B"), _TWO: struct.Struct("!H"), _FOUR: struct.Struct("!I")}


def decode_properties(data: bytes, pos: int, context: int) -> tuple[Properties, int]:
    """Decode the property block at ``pos`` (its length first) for ``context``.

    ``context`` is the packet type, or :data:`WILL` for Will Properties.

    Raises:
        MalformedPacket: truncated, an unknown identifier, a property the packet may
            not carry, a repeated one, or a value out of range.
    """
    length, pos = read_varint(data, pos)
    end = pos + length
    if end > len(data):
        raise MalformedPacket("properties longer than the packet")
    if not length:
        return NO_PROPERTIES, pos
    key = (context, bytes(data[pos:end]))
    cached = _CACHE.get(key)
    if cached is not None:
        return cached, end
    properties = _decode(data, pos, end, context)
    if len(_CACHE) >= _CACHE_MAX:
        _CACHE.clear()
    _CACHE[key] = properties
    return properties, end


# Decoded blocks by their bytes: a stream repeats the same few (a topic alias, an
# expiry), and building a Properties costs more than the rest of a PUBLISH. Properties
# are immutable, so one object serves every packet that carries the same bytes.
_CACHE_MAX = 1024
_CACHE: dict[tuple[int, bytes], Properties] = {}


def _decode(data: bytes, pos: int, end: int, context: int) -> Properties:  # noqa: PLR0912
    values: dict[str, Any] = {}
    while pos < end:
        ident, pos = read_varint(data, pos)
        row = _TABLE.get(ident)
        if row is None:
            raise MalformedPacket(f"unknown property {ident:#x}")
        name, kind, packets, allowed = row
        if context not in packets:
            raise MalformedPacket(f"property {name} is not allowed here", code=_PROTOCOL_ERROR)
        value: Any
        if kind in _FIXED:
            fixed = _FIXED[kind]
            if pos + fixed.size > end:
                raise MalformedPacket(f"truncated property {name}")
            (value,) = fixed.unpack_from(data, pos)
            pos += fixed.size
        elif kind == _VARINT:
            value, pos = read_varint(data, pos)
        elif kind == _UTF8:
            value, pos = read_string(data, pos, name, end)
        elif kind == _BINARY:
            value, pos = read_binary(data, pos, name, end)
        else:
            key, pos = read_string(data, pos, name, end)
            text, pos = read_string(data, pos, name, end)
            value = (key, text)
        if pos > end:
            raise MalformedPacket(f"property {name} runs past the property block")
        if allowed is not None and value not in allowed:
            raise MalformedPacket(
                f"property {name} = {value} is out of range", code=_PROTOCOL_ERROR
            )
        if kind == _PAIR or (kind == _VARINT and context == P.PUBLISH):
            values[name] = (*values.get(name, ()), value)
        elif name in values:
            raise MalformedPacket(f"property {name} appears twice", code=_PROTOCOL_ERROR)
        elif kind == _VARINT:  # a Subscription Identifier of a SUBSCRIBE: one at most
            values[name] = (value,)
        else:
            values[name] = value
    return Properties(**values)


def encode_properties(  # noqa: PLR0912 - one branch per wire type and rule of §2.2.2
    properties: Properties, context: int
) -> bytes:
    """The property block (length first) of ``properties`` for ``context``.

    Raises:
        MalformedPacket: a property ``context`` may not carry, or a value out of range.
    """
    if properties is NO_PROPERTIES:
        return b"\x00"
    out = bytearray()
    for name in _ORDER:
        value = getattr(properties, name)
        if value is None or value == ():
            continue
        ident, kind, allowed = _BY_FIELD[name]
        if context not in _TABLE[ident][2]:
            raise MalformedPacket(f"property {name} is not allowed here", code=_PROTOCOL_ERROR)
        items = value if kind in (_PAIR, _VARINT) else (value,)
        if kind == _VARINT and context != P.PUBLISH and len(items) > 1:
            raise MalformedPacket(f"property {name} appears twice", code=_PROTOCOL_ERROR)
        for item in items:
            if allowed is not None and item not in allowed:
                raise MalformedPacket(
                    f"property {name} = {item} is out of range", code=_PROTOCOL_ERROR
                )
            out += encode_varint(ident)
            if kind in _FIXED:
                try:
                    out += _FIXED[kind].pack(item)
                except struct.error:
                    raise MalformedPacket(f"property {name} = {item} is out of range") from None
            elif kind == _VARINT:
                out += encode_varint(item)
            elif kind == _UTF8:
                out += string(item)
            elif kind == _BINARY:
                out += binary(item)
            else:
                out += string(item[0]) + string(item[1])
    return encode_varint(len(out)) + out

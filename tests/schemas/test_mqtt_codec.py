"""The MQTT codec (schemas.mqtt): every packet type round-trips at both protocol levels,
random and mutated bytes raise only MalformedPacket, and a stream split anywhere decodes
the same. Bounded examples: the whole file runs in seconds."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fieldchat.schemas import mqtt
from fieldchat.schemas.errors import (
    FieldchatError,
    MalformedPacket,
    PacketTooLarge,
    UnsupportedProtocol,
)
from fieldchat.schemas.mqtt import PacketType, ProtocolLevel
from fieldchat.schemas.mqtt._properties import _TABLE, WILL

SOME = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MANY = settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
LEVELS = [ProtocolLevel.V311, ProtocolLevel.V5]

text = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), max_size=12)
packet_id = st.integers(1, 65535)
byte = st.integers(0, 255)


def _value(kind: int, allowed: range | None) -> st.SearchStrategy:
    if allowed is not None:
        return st.integers(allowed.start, min(allowed.stop - 1, allowed.start + 70_000))
    return [
        st.integers(0, 255),
        st.integers(0, 65535),
        st.integers(0, 2**32 - 1),
        st.integers(1, mqtt.MAX_VARINT),
        text,
        st.binary(max_size=12),
        st.tuples(text, text),
    ][kind]


@st.composite
def properties(draw, context: int, level: int) -> mqtt.Properties:
    if level != ProtocolLevel.V5:
        return mqtt.NO_PROPERTIES
    values: dict[str, Any] = {}
    for name, kind, packets, allowed in _TABLE.values():
        if context not in packets or not draw(st.booleans()):
            continue
        if name == "user_properties":
            values[name] = tuple(draw(st.lists(_value(kind, allowed), min_size=1, max_size=3)))
        elif name == "subscription_identifiers":
            most = 3 if context == PacketType.PUBLISH else 1
            values[name] = tuple(draw(st.lists(_value(kind, allowed), min_size=1, max_size=most)))
        else:
            values[name] = draw(_value(kind, allowed))
    return mqtt.Properties(**values) if values else mqtt.NO_PROPERTIES


def reason(level: int) -> st.SearchStrategy[int]:
    return byte if level == ProtocolLevel.V5 else st.just(0)


@st.composite
def packets(draw, level: int) -> mqtt.Packet:
    v5 = level == ProtocolLevel.V5
    kind = draw(st.sampled_from([t for t in PacketType if v5 or t != PacketType.AUTH]))
    props = properties(kind, level)
    if kind == PacketType.CONNECT:
        will = None
        if draw(st.booleans()):
            will = mqtt.Will(
                draw(text),
                draw(st.binary(max_size=20)),
                draw(st.integers(0, 2)),
                draw(st.booleans()),
                draw(properties(WILL, level)),
            )
        username = draw(st.none() | text)
        password = draw(st.none() | st.binary(max_size=12))
        if not v5 and username is None:
            password = None
        return mqtt.Connect(
            draw(text),
            draw(st.booleans()),
            draw(st.integers(0, 65535)),
            username,
            password,
            will,
            level,
            draw(props),
        )
    if kind == PacketType.CONNACK:
        code = draw(reason(level) | st.integers(0, 5))
        present = draw(st.booleans()) and not code
        return mqtt.Connack(present, code, draw(props))
    if kind == PacketType.PUBLISH:
        qos = draw(st.integers(0, 2))
        return mqtt.Publish(
            draw(text),
            draw(st.binary(max_size=300)),
            qos,
            draw(st.booleans()),
            draw(st.booleans()) and qos > 0,
            draw(packet_id) if qos else None,
            draw(props),
        )
    if kind in (PacketType.PUBACK, PacketType.PUBREC, PacketType.PUBREL, PacketType.PUBCOMP):
        acks: dict[int, type[mqtt.Puback | mqtt.Pubrec | mqtt.Pubrel | mqtt.Pubcomp]]
        acks = {4: mqtt.Puback, 5: mqtt.Pubrec, 6: mqtt.Pubrel, 7: mqtt.Pubcomp}
        cls = acks[kind]
        return cls(draw(packet_id), draw(reason(level)), draw(props))
    if kind == PacketType.SUBSCRIBE:
        subscription = st.builds(
            mqtt.Subscription,
            text,
            st.integers(0, 2),
            st.booleans() if v5 else st.just(False),
            st.booleans() if v5 else st.just(False),
            st.sampled_from(mqtt.RetainHandling) if v5 else st.just(mqtt.RetainHandling(0)),
        )
        return mqtt.Subscribe(
            draw(packet_id),
            tuple(draw(st.lists(subscription, min_size=1, max_size=4))),
            draw(props),
        )
    if kind == PacketType.SUBACK:
        codes = tuple(draw(st.lists(byte, min_size=1, max_size=4)))
        return mqtt.Suback(draw(packet_id), codes, draw(props))
    if kind == PacketType.UNSUBSCRIBE:
        filters = tuple(draw(st.lists(text, min_size=1, max_size=4)))
        return mqtt.Unsubscribe(draw(packet_id), filters, draw(props))
    if kind == PacketType.UNSUBACK:
        codes = tuple(draw(st.lists(byte, min_size=1, max_size=4))) if v5 else ()
        return mqtt.Unsuback(draw(packet_id), codes, draw(props))
    if kind == PacketType.PINGREQ:
        return mqtt.Pingreq()
    if kind == PacketType.PINGRESP:
        return mqtt.Pingresp()
    if kind == PacketType.DISCONNECT:
        return mqtt.Disconnect(draw(reason(level)), draw(props))
    return mqtt.Auth(draw(reason(level)), draw(props))


def _decode_all(data: bytes, level: int, *, pieces: list[int] | None = None) -> list[mqtt.Packet]:
    decoder = mqtt.Decoder(level=level)
    cuts = [0, *(pieces or []), len(data)]
    out = []
    for start, stop in itertools.pairwise(cuts):
        out += decoder.feed(data[start:stop])
    assert decoder.buffered == 0
    return out


@pytest.mark.parametrize("level", LEVELS)
def test_every_packet_type_is_generated(level):
    seen = set()

    @settings(max_examples=400, deadline=None, database=None)
    @given(packets(level))
    def collect(packet):
        seen.add(packet.type)

    collect()
    assert seen == {t for t in PacketType if level == 5 or t != PacketType.AUTH}


@pytest.mark.parametrize("level", LEVELS)
@SOME
@given(data=st.data())
def test_round_trip(level, data):
    packet = data.draw(packets(level))
    assert _decode_all(mqtt.encode(packet, level), level) == [packet]


@pytest.mark.parametrize("level", LEVELS)
@SOME
@given(data=st.data())
def test_split_at_every_byte_boundary_decodes_the_same(level, data):
    stream_packets = data.draw(st.lists(packets(level), min_size=1, max_size=4))
    stream = b"".join(mqtt.encode(p, level) for p in stream_packets)
    for cut in range(len(stream) + 1):
        assert _decode_all(stream, level, pieces=[cut]) == stream_packets
    assert _decode_all(stream, level, pieces=list(range(1, len(stream)))) == stream_packets


def _feed_only_typed_errors(data: bytes, level: int | None) -> None:
    try:
        for packet in mqtt.Decoder(level=level, max_packet_size=4096).feed(data):
            mqtt.encode(
                packet, packet.protocol_level if isinstance(packet, mqtt.Connect) else level or 4
            )
    except MalformedPacket:
        pass


@pytest.mark.parametrize("level", [None, *LEVELS])
@MANY
@given(data=st.binary(max_size=200))
def test_random_bytes_raise_only_malformed_packet(level, data):
    _feed_only_typed_errors(data, level)


@pytest.mark.parametrize("level", LEVELS)
@MANY
@given(data=st.data())
def test_mutated_packets_raise_only_malformed_packet(level, data):
    encoded = bytearray(mqtt.encode(data.draw(packets(level)), level))
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(encoded)))
        op = data.draw(st.sampled_from(["flip", "insert", "delete"]))
        if op == "insert" or at == len(encoded):
            encoded[at:at] = bytes([data.draw(byte)])
        elif op == "flip":
            encoded[at] ^= 1 << data.draw(st.integers(0, 7))
        else:
            del encoded[at]
    _feed_only_typed_errors(bytes(encoded), level)


def test_max_packet_size_is_checked_before_the_body_is_buffered():
    decoder = mqtt.Decoder(level=4, max_packet_size=1000)
    with pytest.raises(PacketTooLarge) as caught:
        decoder.feed(b"\x30\x80\x80\x40")  # 1 MiB announced; not one body byte sent
    assert caught.value.code == 0x95
    assert isinstance(caught.value, FieldchatError)
    assert caught.value.reason == "too_large"


@pytest.mark.parametrize(
    ("level", "rest"), [(3, b"\x02\x00\x3c"), (6, b"\xff\xff garbage of a future level")]
)
def test_another_protocol_level_is_reported_before_the_rest_is_parsed(level, rest):
    name = b"MQTT" if level != 3 else b"MQIsdp"
    body = len(name).to_bytes(2, "big") + name + bytes([level]) + rest
    with pytest.raises(UnsupportedProtocol) as caught:
        mqtt.Decoder().feed(b"\x10" + bytes([len(body)]) + body)
    assert caught.value.level == level


@pytest.mark.parametrize(
    ("props", "why"),
    [
        (b"\x04\x23\x00\x01\x00", "topic alias in a SUBSCRIBE"),
        (b"\x04\x0b\x01\x0b\x02", "two subscription identifiers in a SUBSCRIBE"),
        (b"\x02\x0b\x00", "subscription identifier 0"),
        (b"\x01\x99", "unknown property"),
    ],
)
def test_properties_follow_the_rules_of_their_packet(props, why):
    body = b"\x00\x01" + props + b"\x00\x01a\x01"
    with pytest.raises(MalformedPacket):
        mqtt.decode(0x82, body, 5)


def test_repeated_properties_other_than_user_property_are_protocol_errors():
    twice = b"\x06\x21\x00\x01\x21\x00\x02"  # Receive Maximum twice
    with pytest.raises(MalformedPacket) as caught:
        mqtt.decode(0x20, b"\x00\x00" + twice, 5)
    assert caught.value.code == 0x82
    users = b"\x0e\x26\x00\x01k\x00\x01a\x26\x00\x01k\x00\x01b"
    connack = mqtt.decode(0x20, b"\x00\x00" + users, 5)
    assert isinstance(connack, mqtt.Connack)
    assert connack.properties.user_properties == (("k", "a"), ("k", "b"))


def test_311_cannot_carry_mqtt5_content():
    with pytest.raises(MalformedPacket):
        mqtt.encode(mqtt.Puback(1, mqtt.ReasonCode.NOT_AUTHORIZED), 4)
    with pytest.raises(MalformedPacket):
        mqtt.encode(mqtt.Auth(), 4)
    with pytest.raises(MalformedPacket):
        mqtt.decode(0xF0, b"", 4)


def test_topic_aliases_in_both_directions():
    out = mqtt.OutboundAliases(2)
    assert out.alias("a") == (1, False)
    assert out.alias("a") == (1, True)
    assert out.alias("b") == (2, False)
    assert out.alias("c") == (None, False)  # beyond the peer's maximum: in full
    inbound = mqtt.InboundAliases(2)
    props = mqtt.Properties(topic_alias=1)
    assert inbound.resolve(mqtt.Publish("a/b", b"", properties=props)) == "a/b"
    assert inbound.resolve(mqtt.Publish("", b"", properties=props)) == "a/b"
    for bad in (mqtt.Properties(topic_alias=3), mqtt.Properties(topic_alias=2)):
        with pytest.raises(MalformedPacket):
            inbound.resolve(mqtt.Publish("", b"", properties=bad))
    with pytest.raises(MalformedPacket):
        inbound.resolve(mqtt.Publish("", b""))

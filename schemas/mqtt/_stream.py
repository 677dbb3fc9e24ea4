"""Framing: a byte stream in, packets out (sans-I/O), and topic aliases (MQTT 5 §3.3.2.3.4).

:class:`Decoder` is fed whatever a ``recv()`` returned and returns every complete
packet in it at once, so a reader handles a burst in one call rather than one
``await`` per header byte. The remaining length is checked against the Maximum
Packet Size as soon as it is known, before the body is buffered: an oversize packet
costs no memory (MQTT-3.1.2-24 / §3.2.2.3.6, a server's own limit likewise).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, TypeVar, overload

from fieldchat.schemas.errors import MalformedPacket, PacketTooLarge
from fieldchat.schemas.mqtt._codec import decode
from fieldchat.schemas.mqtt._packets import Connect, Packet, Publish
from fieldchat.schemas.mqtt._wire import MAX_VARINT

__all__ = ["MAX_PACKET_SIZE", "Decoder", "InboundAliases", "OutboundAliases"]

MAX_PACKET_SIZE = MAX_VARINT + 5  # the protocol's own ceiling: 268,435,455 + header
M = TypeVar("M")
M_contra = TypeVar("M_contra", contravariant=True)
MessageFactory = Callable[[str, bytes, int, int, bool], M]


class Sink(Protocol[M_contra]):
    """Where :meth:`Decoder.feed` puts messages: a list, a deque."""

    def append(self, item: M_contra, /) -> None: ...


_TOPIC_ALIAS_INVALID = 0x94
_PROTOCOL_ERROR = 0x82


class Decoder:
    """Cuts a byte stream into packets and decodes them.

    ``level`` is the connection's protocol level; ``None`` on a server before the
    CONNECT, whose own level then applies to what follows it. ``max_packet_size``
    bounds a whole packet (fixed header included, as MQTT 5 counts it).

    After a :class:`MalformedPacket` the stream cannot be resynchronised: close it.
    """

    __slots__ = ("_buf", "level", "max_packet_size")

    def __init__(self, *, level: int | None = None, max_packet_size: int = MAX_PACKET_SIZE) -> None:
        self._buf = bytearray()
        self.level = None if level is None else int(level)  # a plain int: compared per packet
        self.max_packet_size = max_packet_size

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete packet held."""
        return len(self._buf)

    @overload
    def feed(self, data: bytes) -> list[Packet]: ...

    @overload
    def feed(self, data: bytes, message: MessageFactory[M]) -> list[Packet | M]: ...

    @overload
    def feed(self, data: bytes, message: MessageFactory[M], into: Sink[M]) -> list[Packet]: ...

    def feed(  # noqa: PLR0912, PLR0915 - the hot loop, inlined on purpose (measured)
        self,
        data: bytes,
        message: MessageFactory[M] | None = None,
        into: Sink[M] | None = None,
    ) -> list[Packet | M] | list[Packet]:
        """Add ``data``; return the packets it completes, in order.

        ``message``, when given, builds the caller's own object for each PUBLISH from
        ``(topic, payload, qos, packet id or 0, retain)`` in place of a
        :class:`Publish`: a reader that needs nothing else of a PUBLISH (no
        properties, hence no topic alias: it announces no Topic Alias Maximum) then
        makes one object per message instead of two. ``into``, with ``message``,
        receives those objects (``into.append``) and only the other packets are
        returned, so a reader's inbox is filled without a second pass. The gateway's
        archiver client does both (one frozen object costs ≈ 0.5 µs, a third of its
        receive path; the second pass ≈ 0.1 µs, measured with bench/mqtt_client.py).

        Raises:
            PacketTooLarge: a remaining length above ``max_packet_size``.
            MalformedPacket: anything else that is not a valid packet (the packets
                completed before it in this call are lost with the connection).
        """
        buf = self._buf
        buf += data
        end = len(buf)
        pos = 0
        out: list[Packet | M] = []
        append = out.append
        put = append if into is None else into.append
        limit = self.max_packet_size
        level = self.level
        while end - pos >= 2:
            size = shift = 0
            at = pos + 1
            while True:  # the remaining length (§2.1.4), up to four bytes
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
                    del buf[:]
                    raise MalformedPacket("remaining length longer than four bytes")
            if size < 0:
                break
            if at - pos + size > limit:
                del buf[:]
                raise PacketTooLarge(f"a packet of {at - pos + size} bytes exceeds {limit}")
            if end - at < size:
                break
            first = buf[pos]
            stop = pos = at + size
            if 0x30 <= first <= 0x33 and level is not None and size > 2:
                # PUBLISH at QoS 0 or 1 without DUP, the hot path, read in place: one
                # copy (the payload), no call. Other shapes take the full decoder.
                topic_end = at + 2 + ((buf[at] << 8) | buf[at + 1])
                qos = (first >> 1) & 1
                start = topic_end + 2 * qos
                mid = (buf[topic_end] << 8) | buf[topic_end + 1] if qos and start <= stop else 0
                if (
                    start <= stop
                    and (mid or not qos)
                    and (level == 4 or (start < stop and buf[start] == 0))
                ):
                    try:
                        topic = buf[at + 2 : topic_end].decode()
                    except UnicodeDecodeError:
                        raise MalformedPacket("topic name is not UTF-8") from None
                    if "\x00" in topic:  # MQTT-1.5.4-2
                        raise MalformedPacket("topic name contains U+0000")
                    payload = bytes(buf[start + (level == 5) : stop])
                    if message is not None:
                        put(message(topic, payload, qos, mid, bool(first & 1)))
                    else:
                        append(Publish(topic, payload, qos, bool(first & 1), False, mid or None))
                    continue
            body = bytes(buf[at:stop])
            if first & 0xF0 == 0x30 and level is not None:
                packet = decode(first, body, level)
                if message is not None:
                    assert isinstance(packet, Publish)
                    put(
                        message(
                            packet.topic,
                            packet.payload,
                            packet.qos,
                            packet.packet_id or 0,
                            packet.retain,
                        )
                    )
                    continue
            else:
                packet = decode(first, body, level or 4)
                if isinstance(packet, Connect) and level is None:
                    self.level = level = int(packet.protocol_level)
            append(packet)
        if pos:
            del buf[:pos]
        return out


class InboundAliases:
    """Topic aliases a peer sets on the PUBLISH packets it sends us (§3.3.2.3.4).

    ``maximum`` is the Topic Alias Maximum we announced (0: none allowed).
    """

    __slots__ = ("_topics", "maximum")

    def __init__(self, maximum: int) -> None:
        self.maximum = maximum
        self._topics: dict[int, str] = {}

    def resolve(self, packet: Publish) -> str:
        """The topic of ``packet``, learning or applying its alias.

        Raises:
            MalformedPacket: (0x94) an alias of 0 or above ``maximum``, or an empty
                topic with an alias never set; (0x82) an empty topic without alias.
        """
        alias = packet.properties.topic_alias
        if alias is None:
            if not packet.topic:  # MQTT-3.3.2-1 with no alias to stand for it
                raise MalformedPacket(
                    "empty topic name without a topic alias", code=_PROTOCOL_ERROR
                )
            return packet.topic
        if not 0 < alias <= self.maximum:  # MQTT-3.3.2-9, -10
            raise MalformedPacket(f"topic alias {alias} out of range", code=_TOPIC_ALIAS_INVALID)
        if packet.topic:
            self._topics[alias] = packet.topic
            return packet.topic
        topic = self._topics.get(alias)
        if topic is None:
            raise MalformedPacket(f"topic alias {alias} was never set", code=_PROTOCOL_ERROR)
        return topic

    def clear(self) -> None:
        """A new connection starts without aliases (MQTT-3.3.2-7)."""
        self._topics.clear()


class OutboundAliases:
    """Topic aliases we set on what we send; the peer allows ``maximum`` of them.

    The first ``maximum`` distinct topics get an alias for the life of the
    connection; later topics go in full (no eviction: fieldchat's topics per
    connection are few, and a stable table costs no bookkeeping per message).
    """

    __slots__ = ("_aliases", "maximum")

    def __init__(self, maximum: int) -> None:
        self.maximum = maximum
        self._aliases: dict[str, int] = {}

    def alias(self, topic: str) -> tuple[int | None, bool]:
        """``(alias, known)``: the alias for ``topic`` (``None``: send it in full) and
        whether the peer already knows it (then the topic name may be empty)."""
        alias = self._aliases.get(topic)
        if alias is not None:
            return alias, True
        if len(self._aliases) >= self.maximum:
            return None, False
        alias = self._aliases[topic] = len(self._aliases) + 1
        return alias, False

    def clear(self) -> None:
        self._aliases.clear()

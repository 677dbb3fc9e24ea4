"""What MQTT 5 adds to a connection, as pure functions: reason codes for our denials,
the CONNACK's properties, the properties a PUBLISH carries on (MQTT 5 §3.3.2.3).

Kept apart from :mod:`fieldchat.broker._connection` so that the connection only moves packets
and each rule here reads (and is tested) on its own.
"""

from __future__ import annotations

import dataclasses
import enum
import math

from fieldchat.broker._acl import Deny
from fieldchat.broker._config import Limits
from fieldchat.broker._metrics import Drop
from fieldchat.broker._outlet import Close
from fieldchat.broker._session import NEVER, Message, SubOptions
from fieldchat.broker._subscriptions import valid_filter
from fieldchat.schemas import mqtt

__all__ = [
    "DISCONNECT_REASONS",
    "Refusal",
    "connack_properties",
    "denial_code",
    "forwarded",
    "publish_bytes",
    "publish_properties",
    "resolve_alias",
    "session_expiry",
    "suback_code",
]

R = mqtt.ReasonCode
_SUBACK_FAILURE = 0x80  # 3.1.1's only refusal code


class Refusal(enum.Enum):
    """Why a CONNECT is refused: ``(denials label, 3.1.1 return code, MQTT 5 reason code)``
    (MQTT 5 §3.2.2.2 maps the 3.1.1 codes)."""

    PROTOCOL = ("protocol", 0x01, R.UNSUPPORTED_PROTOCOL_VERSION)  # MQTT-3.1.2-2
    CLIENT_ID = ("client_id", 0x02, R.CLIENT_IDENTIFIER_NOT_VALID)
    CREDENTIALS = ("auth", 0x04, R.BAD_USER_NAME_OR_PASSWORD)
    WILL = ("will", 0x05, R.NOT_AUTHORIZED)
    AUTH_METHOD = ("auth", R.BAD_AUTHENTICATION_METHOD, R.BAD_AUTHENTICATION_METHOD)  # 5 only

    def __init__(self, label: str, v311: int, v5: int) -> None:
        self.label = label
        self.v311 = v311
        self.v5 = v5

    def code(self, level: int) -> int:
        return self.v5 if level == mqtt.ProtocolLevel.V5 else self.v311


# The reason code of a PUBACK/PUBREC or DISCONNECT for each denial (§2.4).
_DENIAL_CODES = {
    Deny.FORBIDDEN: R.TOPIC_NAME_INVALID,  # wildcards, $, outside the prefix
    Deny.NOT_OWNER: R.NOT_AUTHORIZED,
    Deny.NOT_MEMBER: R.NOT_AUTHORIZED,  # the device learns it is not in the conversation
    Deny.ROSTER: R.NOT_AUTHORIZED,
    Deny.RETAINED: R.RETAIN_NOT_SUPPORTED,
    Deny.EMPTY: R.PAYLOAD_FORMAT_INVALID,
    Deny.TOO_LARGE: R.QUOTA_EXCEEDED,
    Deny.FOUNDING: R.QUOTA_EXCEEDED,
    Deny.TOO_MANY: R.QUOTA_EXCEEDED,
}

# Server DISCONNECT reason codes for the broker's own closes (MQTT 5 §3.14.2.1).
DISCONNECT_REASONS = {
    Close.KEEPALIVE: R.KEEP_ALIVE_TIMEOUT,
    Close.TAKEOVER: R.SESSION_TAKEN_OVER,
    Close.REVOKED: R.NOT_AUTHORIZED,
    Close.SHUTDOWN: R.SERVER_SHUTTING_DOWN,
    Close.STORE_ERROR: R.UNSPECIFIED_ERROR,
    Close.RECEIVE_MAXIMUM: R.RECEIVE_MAXIMUM_EXCEEDED,
    Close.AUTH_METHOD: R.BAD_AUTHENTICATION_METHOD,
}

# What a server forwards of a PUBLISH unaltered (MQTT-3.3.2-15, -17, -18, -20; §3.3.2.3.7).
_FORWARDED = (
    "payload_format_indicator",
    "content_type",
    "response_topic",
    "correlation_data",
    "user_properties",
)


def denial_code(denial: Deny) -> int:
    """The MQTT 5 reason code that tells a client why its publish or subscription was
    refused."""
    return _DENIAL_CODES.get(denial, R.NOT_AUTHORIZED)


def suback_code(topic_filter: str, result: SubOptions | Deny, *, v5_level: bool) -> int:
    """A SUBACK's code for one filter: the granted QoS, or why not (§3.9.3: a bad
    filter 0x8F, too many subscriptions 0x97, the ACL's refusals 0x87; 3.1.1 has only
    0x80)."""
    if isinstance(result, SubOptions):
        return result.qos
    if not v5_level:
        return _SUBACK_FAILURE
    if not valid_filter(topic_filter):
        return R.TOPIC_FILTER_INVALID
    if result is Deny.TOO_MANY:
        return R.QUOTA_EXCEEDED
    return R.NOT_AUTHORIZED


def resolve_alias(packet: mqtt.Publish, aliases: mqtt.InboundAliases) -> mqtt.Publish:
    """A received PUBLISH with its topic alias resolved (MQTT 5 §3.3.2.3.4).

    Raises:
        MalformedPacket: a bad alias (0x94 / 0x82).
    """
    if packet.properties.topic_alias is None:
        return packet
    topic = aliases.resolve(packet)
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


def session_expiry(connect: mqtt.Connect) -> tuple[bool, int]:
    """``(persistent, expiry)``: 3.1.1 sessions without Clean Session never expire;
    MQTT 5 sessions live for their Session Expiry Interval (0 by default: they end
    with the connection, §3.1.2.11.2)."""
    if connect.protocol_level != mqtt.ProtocolLevel.V5:
        return not connect.clean_start, NEVER
    expiry = connect.properties.session_expiry_interval or 0
    return expiry > 0, expiry


def connack_properties(
    limits: Limits, connect: mqtt.Connect, *, assigned: str | None, inbox: str | None
) -> mqtt.Properties:
    """What the broker tells an MQTT 5 client about itself (§3.2.2.3).

    Maximum Packet Size, Topic Alias Maximum and (when below the protocol's default)
    Receive Maximum always; Server Keep Alive when the client asked for a longer one
    than ``max_keepalive_s`` or none; the Assigned Client Identifier when we chose it;
    Response Information (the client's own inbox topic, the one topic any participant
    may publish to and only it may read) when asked for.
    """
    keep_alive = None
    if limits.max_keepalive_s and not 0 < connect.keep_alive <= limits.max_keepalive_s:
        keep_alive = limits.max_keepalive_s
    asked = connect.properties.request_response_information == 1
    return mqtt.Properties(
        maximum_packet_size=limits.max_packet_bytes,
        topic_alias_maximum=limits.topic_alias_maximum or None,
        receive_maximum=limits.receive_maximum if limits.receive_maximum < 65_535 else None,
        server_keep_alive=keep_alive,
        assigned_client_identifier=assigned,
        response_information=inbox if asked else None,
    )


def forwarded(properties: mqtt.Properties) -> mqtt.Properties:
    """The properties of a received PUBLISH that go on to its subscribers."""
    if properties is mqtt.NO_PROPERTIES or (
        properties.payload_format_indicator is None
        and properties.content_type is None
        and properties.response_topic is None
        and properties.correlation_data is None
        and not properties.user_properties
    ):  # per message: no dict, no object when nothing goes on (a topic alias alone)
        return mqtt.NO_PROPERTIES
    kept = {name: getattr(properties, name) for name in _FORWARDED}
    if not any(kept.values()):
        return mqtt.NO_PROPERTIES
    return mqtt.Properties(**kept)


def publish_properties(
    message: Message, alias: int | None, now: float
) -> tuple[mqtt.Properties, bool]:
    """The properties of ``message`` as sent now, and whether it has expired.

    The Message Expiry Interval sent is what remains of it (MQTT-3.3.2-6).
    """
    remaining = None
    if message.expires_at is not None:
        left = message.expires_at - now
        if left <= 0:
            return mqtt.NO_PROPERTIES, True
        remaining = math.ceil(left)
    if (
        message.properties is mqtt.NO_PROPERTIES
        and remaining is None
        and not message.identifiers
        and alias is None
    ):
        return mqtt.NO_PROPERTIES, False
    return (
        dataclasses.replace(
            message.properties,
            message_expiry_interval=remaining,
            subscription_identifiers=message.identifiers,
            topic_alias=alias,
        ),
        False,
    )


# The property block of a PUBLISH that carries only a Topic Alias, by alias (§3.3.2.3.4),
# made once per alias: at most Limits.topic_alias_maximum of them.
_ALIAS_BLOCKS: dict[int, bytes] = {}


def _alias_block(alias: int) -> bytes:
    block = _ALIAS_BLOCKS.get(alias)
    if block is None:
        properties = mqtt.Properties(topic_alias=alias)
        block = _ALIAS_BLOCKS[alias] = mqtt.encode_properties(properties, mqtt.PacketType.PUBLISH)
    return block


def publish_bytes(
    message: Message,
    qos: int,
    packet_id: int | None,
    *,
    dup: bool,
    aliases: mqtt.OutboundAliases,
    max_size: int | None,
    now: float,
) -> tuple[bytes | None, Drop | None]:
    """An MQTT 5 PUBLISH of ``message``, or ``(None, why)`` when it may not be sent.

    The topic goes as its alias once the client knows it; the remaining expiry and
    the subscription identifiers go along. Not sent: an expired message
    (:attr:`Drop.EXPIRED`, MQTT-3.3.2-5) or one above the client's Maximum Packet Size
    (:attr:`Drop.TOO_LARGE_FOR_CLIENT`, MQTT-3.1.2-25).
    """
    alias, known = aliases.alias(message.topic)
    if (
        message.properties is mqtt.NO_PROPERTIES
        and message.expires_at is None
        and not message.identifiers
    ):  # the common case, without building properties: at most an alias
        block = b"\x00" if alias is None else _alias_block(alias)
    else:
        properties, expired = publish_properties(message, alias, now)
        if expired:
            return None, Drop.EXPIRED
        block = mqtt.encode_properties(properties, mqtt.PacketType.PUBLISH)
    data = mqtt.encode_publish(
        b"" if known else message.topic_bytes,
        message.payload,
        qos,
        packet_id,
        retain=message.retain,
        dup=dup,
        properties=block,
    )
    if max_size is not None and len(data) > max_size:
        return None, Drop.TOO_LARGE_FOR_CLIENT
    return data, None

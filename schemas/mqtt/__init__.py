"""MQTT 3.1.1 and 5 control packets, sans I/O: bytes in, packets out; packets to bytes.

Why here: both the broker (which reads what clients send) and the gateway's archiver
client (which reads what brokers send) speak MQTT, and the dependency rule of
STYLE.md lets both import ``schemas`` while forbidding the gateway to import the
broker. The codec is, like the rest of ``schemas``, nothing but bytes and rules: it
imports no project package beyond ``fieldchat.schemas.errors``, no third-party package, and
does no I/O. It is a subpackage rather than a module because it has four parts
(packets, properties, packet bodies, framing) that read best apart.

* :class:`Decoder` cuts a byte stream into packets (every complete packet of a
  ``recv()`` at once; the Maximum Packet Size is checked before a body is buffered);
  :func:`decode` / :func:`encode` turn one packet's bytes into an object and back.
* Packets are frozen dataclasses (:class:`Connect`, :class:`Publish`, …) with the
  MQTT 5 properties in one typed :class:`Properties`; :class:`PacketType`,
  :class:`ReasonCode` and :class:`RetainHandling` are enums.
* Anything malformed raises :class:`~schemas.errors.MalformedPacket` (``reason``
  label, and ``code``: the MQTT 5 reason code to close with), or its subclasses
  :class:`~schemas.errors.PacketTooLarge` and
  :class:`~schemas.errors.UnsupportedProtocol` (a CONNECT of another protocol level,
  which a server answers with CONNACK 0x01 / 0x84, MQTT-3.1.2-2). Nothing else.
* :class:`InboundAliases` / :class:`OutboundAliases` keep a connection's topic
  aliases (MQTT 5 §3.3.2.3.4).
"""

from fieldchat.schemas.errors import MalformedPacket, PacketTooLarge, UnsupportedProtocol
from fieldchat.schemas.mqtt._codec import decode, encode, encode_pubacks, encode_publish
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
    ReasonCode,
    RetainHandling,
    Suback,
    Subscribe,
    Subscription,
    Unsuback,
    Unsubscribe,
    Will,
)
from fieldchat.schemas.mqtt._properties import Property, decode_properties, encode_properties
from fieldchat.schemas.mqtt._stream import MAX_PACKET_SIZE, Decoder, InboundAliases, OutboundAliases
from fieldchat.schemas.mqtt._wire import MAX_VARINT

__all__ = [
    "MAX_PACKET_SIZE",
    "MAX_VARINT",
    "NO_PROPERTIES",
    "Auth",
    "Connack",
    "Connect",
    "Decoder",
    "Disconnect",
    "InboundAliases",
    "MalformedPacket",
    "OutboundAliases",
    "Packet",
    "PacketTooLarge",
    "PacketType",
    "Pingreq",
    "Pingresp",
    "Properties",
    "Property",
    "ProtocolLevel",
    "Puback",
    "Pubcomp",
    "Publish",
    "Pubrec",
    "Pubrel",
    "ReasonCode",
    "RetainHandling",
    "Suback",
    "Subscribe",
    "Subscription",
    "Unsuback",
    "Unsubscribe",
    "UnsupportedProtocol",
    "Will",
    "decode",
    "decode_properties",
    "encode",
    "encode_properties",
    "encode_pubacks",
    "encode_publish",
]

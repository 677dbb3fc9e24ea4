"""Broker errors: subclasses of :class:`schemas.errors.FieldchatError`.

FieldchatError
└── BrokerError                 the broker cannot do what was asked
    ├── PortInUse               a listener's address is already bound
    ├── UnknownAccount          revoke/allow/deny of an account never enrolled
    └── AmqttChanged            aMQTT lacks an internal the broker uses (broker._amqtt)

Malformed MQTT input raises the codec's :class:`schemas.errors.MalformedPacket`
(and :class:`~schemas.errors.PacketTooLarge`, above ``Limits.max_packet_bytes``),
re-exported here for the broker's callers.
"""

from __future__ import annotations

from fieldchat.schemas.errors import FieldchatError, MalformedPacket, PacketTooLarge

__all__ = ["BrokerError", "MalformedPacket", "PacketTooLarge", "PortInUse", "UnknownAccount"]


class BrokerError(FieldchatError):
    """The broker cannot do what was asked."""

    reason = "broker"


class PortInUse(BrokerError):
    """A listener could not bind because another process holds the address."""

    reason = "port_in_use"


class UnknownAccount(BrokerError):
    """An admin command named an account that was never enrolled."""

    reason = "unknown_account"

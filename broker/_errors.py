"""Broker errors: subclasses of :class:`schemas.errors.FieldchatError`.

FieldchatError
└── BrokerError                 the broker cannot do what was asked
    ├── PortInUse               a listener's address is already bound
    ├── UnknownAccount          revoke/allow/deny of an account never enrolled
    └── MalformedPacket         bytes on the wire that are not MQTT 3.1.1
        └── PacketTooLarge      remaining length above ``Limits.max_packet_bytes``
"""

from __future__ import annotations

from schemas.errors import FieldchatError

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


class MalformedPacket(BrokerError):
    """Bytes that are not a well-formed MQTT 3.1.1 control packet (MQTT §2, §3)."""

    reason = "malformed"


class PacketTooLarge(MalformedPacket):
    """A packet whose remaining length exceeds the configured maximum."""

    reason = "too_large"

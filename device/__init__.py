"""The participant side of fieldchat.

Identity and key store, the pure E2E engine, and the paho-mqtt ``Device`` client
with its durable outbox, and ``AsyncDevice``, the same device for asyncio (see
docs/device.md).

The names below are imported on first use (PEP 562), so importing one module of
the package (the engine, say) does not load the MQTT client and its link.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fieldchat.device.aio import AsyncDevice
    from fieldchat.device.client import ConversationInfo, Device, SentMessage
    from fieldchat.device.config import BrokerOptions, DeviceSettings, LinkOptions, TlsOptions
    from fieldchat.device.engine import Engine
    from fieldchat.device.event_streams import EventStream
    from fieldchat.device.events import (
        Connected,
        Disconnected,
        Event,
        EventsDropped,
        ForgeryDetected,
        GapDetected,
        Joined,
        KeyChanged,
        MessageReceived,
        MessageVerified,
        PresenceChanged,
        PublishRefused,
        ReceiptReceived,
        Removed,
        StreamEvent,
    )
    from fieldchat.device.history import GatewayHistory
    from fieldchat.device.identity import Identity

_HOMES = {
    "AsyncDevice": "aio",
    "BrokerOptions": "config",
    "Connected": "events",
    "ConversationInfo": "client",
    "Device": "client",
    "DeviceSettings": "config",
    "Disconnected": "events",
    "Engine": "engine",
    "Event": "events",
    "EventStream": "event_streams",
    "EventsDropped": "events",
    "ForgeryDetected": "events",
    "GapDetected": "events",
    "GatewayHistory": "history",
    "Identity": "identity",
    "Joined": "events",
    "KeyChanged": "events",
    "LinkOptions": "config",
    "MessageReceived": "events",
    "MessageVerified": "events",
    "PresenceChanged": "events",
    "PublishRefused": "events",
    "ReceiptReceived": "events",
    "Removed": "events",
    "SentMessage": "client",
    "StreamEvent": "events",
    "TlsOptions": "config",
}

__all__ = [
    "AsyncDevice",
    "BrokerOptions",
    "Connected",
    "ConversationInfo",
    "Device",
    "DeviceSettings",
    "Disconnected",
    "Engine",
    "Event",
    "EventStream",
    "EventsDropped",
    "ForgeryDetected",
    "GapDetected",
    "GatewayHistory",
    "Identity",
    "Joined",
    "KeyChanged",
    "LinkOptions",
    "MessageReceived",
    "MessageVerified",
    "PresenceChanged",
    "PublishRefused",
    "ReceiptReceived",
    "Removed",
    "SentMessage",
    "StreamEvent",
    "TlsOptions",
]


def __getattr__(name: str) -> Any:  # noqa: ANN401 - whichever class is asked for
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'fieldchat.device' has no attribute {name!r}")
    return getattr(importlib.import_module(f"fieldchat.device.{home}"), name)

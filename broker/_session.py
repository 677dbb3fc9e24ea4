"""Session state: subscriptions, the bounded offline queue and the in-flight window."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fieldchat.broker._acl import Principal
from fieldchat.schemas import mqtt

if TYPE_CHECKING:
    import asyncio

    from fieldchat.broker._outlet import Outlet

__all__ = ["NEVER", "Message", "Session", "SubOptions"]

NEVER = 0xFFFF_FFFF  # a Session Expiry Interval that never ends (MQTT 5 §3.1.2.11.2)


@dataclass(frozen=True, slots=True)
class SubOptions:
    """One subscription of a session: granted QoS and the MQTT 5 options (§3.8.3.1)."""

    qos: int
    no_local: bool = False
    retain_as_published: bool = False
    identifier: int | None = None

    def to_json(self) -> int | list[int]:
        """A bare QoS when no option is set (what schema 1 stored), else a list."""
        if not (self.no_local or self.retain_as_published or self.identifier):
            return self.qos
        return [self.qos, int(self.no_local), int(self.retain_as_published), self.identifier or 0]

    @classmethod
    def from_json(cls, value: int | list[int]) -> SubOptions:
        if isinstance(value, int):
            return cls(value)
        qos, no_local, rap, identifier = value
        return cls(qos, bool(no_local), bool(rap), identifier or None)


class Message:
    """One QoS 1 message on its way to one session.

    ``properties`` are what MQTT 5 forwards unaltered (MQTT-3.3.2-15…-20: payload
    format, content type, response topic, correlation data, user properties);
    ``expires_at`` is the wall-clock end of its Message Expiry Interval (``None``:
    never); ``identifiers`` the Subscription Identifiers of the matching subscriptions.
    """

    __slots__ = (
        "expires_at",
        "identifiers",
        "payload",
        "properties",
        "retain",
        "seq",
        "topic",
        "topic_bytes",
    )

    def __init__(
        self,
        seq: int,
        topic: str,
        payload: bytes,
        *,
        retain: bool = False,
        properties: mqtt.Properties = mqtt.NO_PROPERTIES,
        expires_at: float | None = None,
        identifiers: tuple[int, ...] = (),
    ) -> None:
        self.seq = seq
        self.topic = topic
        self.topic_bytes = topic.encode()
        self.payload = payload
        self.retain = retain
        self.properties = properties
        self.expires_at = expires_at
        self.identifiers = identifiers


class Session:
    """MQTT session of one client id (MQTT §4.1).

    ``persistent`` (3.1.1 clean session 0, or MQTT 5 with a Session Expiry Interval)
    sessions outlive their connection and are written to the store; their queued and
    in-flight messages too. ``expiry`` is the Session Expiry Interval in seconds
    (:data:`NEVER` for 3.1.1); ``expiry_timer`` ends an offline session when it
    passes. ``inflight`` maps packet ids to messages sent and not yet acknowledged;
    they are sent again, DUP set, when the client reconnects (MQTT-4.4.0-1) and never
    dropped on a timeout. ``queue`` holds what waits for the window or the client.
    ``qos2_received``: packet ids of QoS 2 PUBLISH packets received and not yet
    released (PUBREL), kept with the session so that a PUBLISH resent with DUP after
    a reconnect is not delivered twice (MQTT-4.3.3-10, method B). ``outlet``: the
    connection while one holds the session (set by :meth:`Router.attach`).
    """

    __slots__ = (
        "client_id",
        "expiry",
        "expiry_timer",
        "inflight",
        "next_id",
        "outlet",
        "persistent",
        "principal",
        "qos2_received",
        "queue",
        "queued_bytes",
        "subscriptions",
        "will_timer",
    )

    def __init__(
        self, client_id: str, principal: Principal, *, persistent: bool, expiry: int = NEVER
    ) -> None:
        self.client_id = client_id
        self.principal = principal
        self.persistent = persistent
        self.expiry = expiry
        self.expiry_timer: asyncio.TimerHandle | None = None
        self.will_timer: asyncio.TimerHandle | None = None
        self.subscriptions: dict[str, SubOptions] = {}
        self.queue: deque[Message] = deque()
        self.queued_bytes = 0
        self.inflight: dict[int, Message] = {}
        self.qos2_received: set[int] = set()
        self.next_id = 0
        self.outlet: Outlet | None = None

    def allocate_id(self) -> int:
        """A packet id not in flight (the window is far below 65,535)."""
        while True:
            self.next_id = self.next_id % 65_535 + 1
            if self.next_id not in self.inflight:
                return self.next_id

    def __repr__(self) -> str:
        state = "connected" if self.outlet is not None else "offline"
        return f"Session({self.client_id!r}, {state}, queued={len(self.queue)})"

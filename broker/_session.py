"""Session state: subscriptions, the bounded offline queue and the in-flight window."""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

from broker._acl import Identity

if TYPE_CHECKING:
    from broker._connection import Connection

__all__ = ["Message", "Session"]


class Message:
    """One QoS 1 message on its way to one session."""

    __slots__ = ("payload", "retain", "seq", "topic", "topic_bytes")

    def __init__(self, seq: int, topic: str, payload: bytes, *, retain: bool = False) -> None:
        self.seq = seq
        self.topic = topic
        self.topic_bytes = topic.encode()
        self.payload = payload
        self.retain = retain


class Session:
    """MQTT session of one client id (MQTT §4.1).

    ``persistent`` (CONNECT with clean session 0) sessions outlive their connection
    and are written to the store; their queued and in-flight messages too.
    ``inflight`` maps packet ids to messages sent and not yet acknowledged; they are
    sent again, DUP set, when the client reconnects (MQTT-4.4.0-1) and never
    dropped on a timeout. ``queue`` holds what waits for the window or the client.
    """

    __slots__ = (
        "client_id",
        "conn",
        "identity",
        "inflight",
        "next_id",
        "persistent",
        "queue",
        "queued_bytes",
        "subscriptions",
    )

    def __init__(self, client_id: str, identity: Identity, *, persistent: bool) -> None:
        self.client_id = client_id
        self.identity = identity
        self.persistent = persistent
        self.subscriptions: dict[str, int] = {}
        self.queue: deque[Message] = deque()
        self.queued_bytes = 0
        self.inflight: dict[int, Message] = {}
        self.next_id = 0
        self.conn: Connection | None = None

    def allocate_id(self) -> int:
        """A packet id not in flight (the window is far below 65,535)."""
        while True:
            self.next_id = self.next_id % 65_535 + 1
            if self.next_id not in self.inflight:
                return self.next_id

    def __repr__(self) -> str:
        state = "connected" if self.conn is not None else "offline"
        return f"Session({self.client_id!r}, {state}, queued={len(self.queue)})"

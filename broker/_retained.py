"""Retained messages (MQTT §3.3.1.3): the last retained payload of each topic, stored.

Pure but for the store writes it queues (:class:`~broker._writebehind.WriteBehind`).
"""

from __future__ import annotations

from fieldchat.broker._subscriptions import matches
from fieldchat.broker._writebehind import RetainClear, RetainSet, WriteBehind

__all__ = ["Retained"]


class Retained:
    """``topic → (payload, qos)``; ``writer`` None: nothing is stored."""

    def __init__(self) -> None:
        self.messages: dict[str, tuple[bytes, int]] = {}
        self.writer: WriteBehind | None = None

    def __len__(self) -> int:
        return len(self.messages)

    def get(self, topic: str) -> tuple[bytes, int] | None:
        return self.messages.get(topic)

    def set(self, topic: str, payload: bytes, qos: int) -> bool:
        """Keep ``payload`` as ``topic``'s retained message, or clear it when empty
        (MQTT-3.3.1-10); return whether the store was written."""
        if payload:
            self.messages[topic] = (payload, qos)
        else:
            self.messages.pop(topic, None)
        if self.writer is None:
            return False
        self.writer.put(RetainSet(topic, payload, qos) if payload else RetainClear(topic))
        return True

    def matching(self, topic_filter: str) -> list[tuple[str, bytes, int]]:
        """``(topic, payload, qos)`` of every retained message ``topic_filter`` matches."""
        if "+" in topic_filter or "#" in topic_filter:
            return [(t, p, q) for t, (p, q) in self.messages.items() if matches(t, topic_filter)]
        held = self.messages.get(topic_filter)
        return [] if held is None else [(topic_filter, *held)]

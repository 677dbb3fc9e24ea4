"""A bounded queue of events that never blocks the side that fills it.

The device's worker thread must not wait for an application that reads its events
slowly (it would stop PUBACKing, receipting and sending for everyone), and an
unbounded queue would let a stalled reader take the process's memory. So a
:class:`Backlog` holds at most ``limit`` events; past that it drops the newest and
counts them into one :class:`~fieldchat.device.events.EventsDropped` marker, kept at
the place in the sequence where the events went missing. Everything dropped is still
in the state file (the marker says which message rows), so a reader that falls behind
loses display, never data.

Pure and unlocked: :mod:`fieldchat.device.aio` holds a lock around it.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from fieldchat.device.events import Event, EventsDropped, MessageReceived, StreamEvent

__all__ = ["Backlog"]


@dataclass(slots=True)
class _Gap:
    """Events dropped in a row, until one is kept again."""

    count: int = 0
    messages: int = 0
    first_id: int | None = None
    last_id: int | None = None

    def add(self, event: Event) -> None:
        self.count += 1
        if isinstance(event, MessageReceived):
            self.messages += 1
            self.first_id = event.id if self.first_id is None else min(self.first_id, event.id)
            self.last_id = event.id if self.last_id is None else max(self.last_id, event.id)

    def marker(self) -> EventsDropped:
        return EventsDropped(self.count, self.messages, self.first_id, self.last_id)


class Backlog:
    """At most ``limit`` events in order, plus markers where newer ones were dropped.

    Raises:
        ValueError: ``limit`` below 1.
    """

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"a backlog holds at least one event, not {limit}")
        self.limit = limit
        self.dropped = 0  # events dropped since it was made
        self._items: deque[Event | _Gap] = deque()
        self._held = 0  # events (not markers) in _items: what the limit bounds

    def __len__(self) -> int:
        """Items waiting: events and markers."""
        return len(self._items)

    def push(self, event: Event) -> bool:
        """Queue ``event``; whether it was kept (else it was counted into a marker:
        the one that ends the backlog, or a new one)."""
        if self._held >= self.limit:
            gap = self._items[-1]  # never empty here: limit >= 1
            if not isinstance(gap, _Gap):
                gap = _Gap()
                self._items.append(gap)
            gap.add(event)
            self.dropped += 1
            return False
        self._items.append(event)
        self._held += 1
        return True

    def pop(self) -> StreamEvent:
        """The oldest item (a marker as :class:`EventsDropped`).

        Raises:
            IndexError: the backlog is empty.
        """
        item = self._items.popleft()
        if isinstance(item, _Gap):
            return item.marker()
        self._held -= 1
        return item

    def clear(self) -> None:
        self._items.clear()
        self._held = 0

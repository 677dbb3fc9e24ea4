"""A client's acknowledgements, in the order of its PUBLISH packets (MQTT-4.6.0-2).

A PUBACK (or PUBREC) whose message was written to the store goes only once that
commit is done; those after it wait behind it, even if they need no commit. If the
commit failed, nothing more is acknowledged and the connection is closed: the broker
never acknowledges what it did not store.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

__all__ = ["Acks"]


class Acks:
    """``write(data)`` sends an acknowledgement; ``failed()`` is called once when a
    commit fails (close the connection)."""

    def __init__(self, write: Callable[[bytes], None], failed: Callable[[], None]) -> None:
        self._write = write
        self._failed = failed
        self._waiting: deque[tuple[bytes, asyncio.Future[None] | None]] = deque()
        self._closed = False

    def __len__(self) -> int:
        """Acknowledgements waiting (the client's unacknowledged QoS 1/2 PUBLISH)."""
        return len(self._waiting)

    def send(self, data: bytes, pending: asyncio.Future[None] | None) -> None:
        """Send ``data`` after ``pending`` (None: nothing to wait for) and every
        acknowledgement before it."""
        if pending is None and not self._waiting:
            self._write(data)
            return
        self._waiting.append((data, pending))
        if pending is not None and not pending.done():
            pending.add_done_callback(self._flush)
        else:
            self._flush()

    def close(self) -> None:
        """The connection closed: nothing more goes."""
        self._closed = True

    def _flush(self, _: object = None) -> None:
        waiting = self._waiting
        while waiting and not self._closed:
            data, pending = waiting[0]
            if pending is not None:
                if not pending.done():
                    return
                if pending.cancelled() or pending.exception() is not None:
                    self._closed = True
                    self._failed()
                    return
            waiting.popleft()
            self._write(data)

"""The events of a device's worker thread as asyncio streams: each open
:class:`EventStream` gets every event into its own bounded backlog, and the loop is
woken once per burst, so the worker never waits for the loop (a reader that falls
behind drops and says so, :mod:`fieldchat.device.backlog`). Used by
:class:`~fieldchat.device.aio.AsyncDevice`.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import weakref
from collections.abc import AsyncIterator, Callable

from fieldchat.device.backlog import Backlog
from fieldchat.device.events import Event, StreamEvent

__all__ = ["EVENT_BUFFER", "EventFanout", "EventStream"]

# Events a stream holds for a reader that is behind, before it drops (and says so).
# A chat or sensor MessageReceived is ≈ 0.3-1 KB with its text: ≈ 1 MB a stream; at
# most ≈ 64 MB if every text filled an envelope (MAX_ENVELOPE_BYTES). A reader that
# takes a millisecond an event is a second behind when it overflows.
EVENT_BUFFER = 1024


class EventStream(AsyncIterator[StreamEvent]):
    """The device's events from the moment the stream was made, in order.

    Made by :meth:`AsyncDevice.events`. Holds up to ``limit`` events for a reader
    that is behind; past that it drops the newest and yields one
    :class:`~fieldchat.device.events.EventsDropped` where they went missing (counted in
    :attr:`dropped`). Iteration ends when the device closes (after the events it
    emitted before) or the stream is closed (at once).
    """

    def __init__(
        self, lock: threading.Lock, limit: int, detach: Callable[[EventStream], None]
    ) -> None:
        self._lock = lock  # the fan-out's: the worker thread pushes under it
        self._backlog = Backlog(limit)
        self._ready = asyncio.Event()
        self._ended = False
        self._detach = detach  # stops the fan-out pushing to us

    @property
    def dropped(self) -> int:
        """Events dropped so far because the reader was behind."""
        with self._lock:
            return self._backlog.dropped

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> StreamEvent:
        while True:
            with self._lock:
                if self._backlog:
                    return self._backlog.pop()
                if self._ended:
                    raise StopAsyncIteration
                self._ready.clear()
            await self._ready.wait()

    async def __aenter__(self) -> EventStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop receiving; iteration ends at once (what was buffered is dropped)."""
        self._detach(self)
        with self._lock:
            self._backlog.clear()
            self._ended = True
        self._ready.set()

    # -- called by EventFanout ---------------------------------------------------------

    def _push(self, event: Event) -> bool:
        """Under the fan-out's lock, on the worker thread: whether a wake is needed."""
        if self._ended:
            return False
        self._backlog.push(event)
        return True

    def _wake(self) -> None:
        """On the loop: let a waiting reader look again."""
        self._ready.set()

    def _end(self) -> None:
        """On the loop: the device closed; iteration ends once the backlog is read."""
        with self._lock:
            self._ended = True
        self._ready.set()


class EventFanout:
    """Every event the device's worker thread emits, into each open stream, and one
    wake-up of the loop per burst of events.

    Streams are held weakly: one a reader dropped (a ``break`` out of ``async for``)
    stops costing anything once collected.
    """

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None  # set when the device starts
        self._lock = threading.Lock()
        self._streams: weakref.WeakSet[EventStream] = weakref.WeakSet()
        self._wake_pending = False

    def open(self, limit: int) -> EventStream:
        """A new stream of the events published from now on."""
        stream = EventStream(self._lock, limit, self._detach)
        with self._lock:
            self._streams.add(stream)
        return stream

    def publish(self, event: Event) -> None:
        """On the worker thread: into every stream, and one wake-up for the loop."""
        with self._lock:
            pushed = [stream._push(event) for stream in self._streams]
            if not any(pushed) or self._wake_pending:
                return
            self._wake_pending = True
        loop = self.loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop closed under an open device
                loop.call_soon_threadsafe(self._wake)

    def end(self) -> None:
        """On the loop: the device closed; each stream ends once its backlog is read."""
        with self._lock:
            streams = list(self._streams)
        for stream in streams:
            stream._end()

    def _detach(self, stream: EventStream) -> None:
        with self._lock:
            self._streams.discard(stream)

    def _wake(self) -> None:
        with self._lock:
            self._wake_pending = False
            streams = list(self._streams)
        for stream in streams:
            stream._wake()

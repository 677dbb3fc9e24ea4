"""The device for asyncio applications (Home Assistant, aiomqtt users): the
synchronous :class:`~fieldchat.device.client.Device`, its threads unchanged, behind
awaitable methods and async event streams (docs/device.md, "asyncio").

    task ──await send()──▶ writer thread (one, calls in order) ──▶ Device.send
    task ──await wait_connected()──▶ wait thread, slices of 0.1 s ──▶ Device.wait_connected
    worker thread ──on_event──▶ each EventStream's Backlog (bounded) ──wake──▶ async for

Nothing here speaks the protocol: the seal, the outbox, the link and the worker are
the synchronous device's. A call never blocks the event loop, and the worker never
waits for the loop: a stream whose reader falls behind drops and says so
(:mod:`fieldchat.device.event_streams`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from enum import Enum
from functools import partial
from types import TracebackType
from typing import TypeVar

from fieldchat.device.client import Device, HistorySource
from fieldchat.device.config import BrokerOptions, LinkOptions
from fieldchat.device.event_streams import EVENT_BUFFER, EventFanout, EventStream
from fieldchat.device.rows import Gap, OutboxRow, ReceivedRow, SentRow
from fieldchat.device.state import DeviceState
from fieldchat.device.texts import ConversationInfo, SentMessage
from fieldchat.schemas import Policy
from fieldchat.schemas.errors import (
    ConnectFailed,
    NotAuthorized,
    TransportError,
    UnknownParticipant,
)
from fieldchat.schemas.topics import DEFAULT_PREFIX

__all__ = ["EVENT_BUFFER", "AsyncDevice", "EventStream"]

# A blocking wait (connection, drained outbox, bundles) runs on a thread in slices this
# long, so cancelling the task that awaits it frees the thread within one slice.
_SLICE_S = 0.1

T = TypeVar("T")


class _Phase(Enum):
    NEW = "new"
    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


class AsyncDevice:
    """One participant on an MQTT broker, for asyncio.

    ``async with AsyncDevice(state, broker) as device:`` opens the state file and
    starts the link (it connects in the background: sends are accepted offline and
    leave once connected; :meth:`wait_connected` waits); leaving the block closes it.
    The arguments are :class:`~fieldchat.device.client.Device`'s (its ``on_event`` is
    :meth:`events`).

    Calls that change or read the state run one at a time, in the order they were
    made, on one thread of this device's own (so concurrent ``send`` tasks queue in
    the order they called); waits run on another, in short slices.

    Cancellation: a call cancelled before its thread started it does nothing. One
    cancelled while it runs (a ``send`` sealing and committing: about a millisecond)
    finishes first, then ``CancelledError`` is raised: what it accepted is in the
    outbox and will be delivered (look at :meth:`sent`), and the device is never left
    half-way through a call. :meth:`close` is not interrupted by cancellation either:
    it finishes, then the cancellation goes on.

    Errors are the :class:`~fieldchat.schemas.errors.FieldchatError` tree, as the
    synchronous device raises them. Using the device before :meth:`start` or after
    :meth:`close` is a programming error: ``RuntimeError``.
    """

    def __init__(
        self,
        state: DeviceState | str | os.PathLike[str],
        broker: BrokerOptions | None = None,
        *,
        link: LinkOptions | None = None,
        prefix: str = DEFAULT_PREFIX,
        history: HistorySource | None = None,
        post_quantum: bool = True,
        power_safe: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._events = EventFanout()
        self._make = partial(
            Device,
            state,
            broker,
            link=link,
            prefix=prefix,
            on_event=self._events.publish,
            history=history,
            post_quantum=post_quantum,
            power_safe=power_safe,
            clock=clock,
        )
        self._device: Device | None = None
        self._phase = _Phase.NEW
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="fieldchat-aio")
        self._waiter = ThreadPoolExecutor(2, thread_name_prefix="fieldchat-aio-wait")
        self._closing: asyncio.Task[None] | None = None

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> AsyncDevice:
        """Open the state file and start the device (the link connects in the background).

        Raises:
            KeyStoreError: the state file cannot be opened or is corrupt.
            ConfigError: another process is using the same state file.
            RuntimeError: started before, or closed.
        """
        if self._phase is not _Phase.NEW:
            raise RuntimeError(f"an AsyncDevice starts once (this one is {self._phase.value})")
        self._events.loop = asyncio.get_running_loop()
        self._phase = _Phase.OPEN
        try:
            await self._run(self._writer, self._open)
        except BaseException:
            await self.close()  # whatever the open got to, cancelled or failed
            raise
        return self

    def _open(self) -> None:
        """On the writer thread: the device is ours to close as soon as it exists."""
        self._device = self._make()
        self._device.start()

    async def close(self) -> None:
        """Close the device: calls already made finish, then the link disconnects
        cleanly, the state is saved and closed, and every event stream ends after the
        events emitted before. Idempotent; not interrupted by cancellation."""
        if self._closing is None:
            self._closing = asyncio.ensure_future(self._close())
        try:
            await asyncio.shield(self._closing)
        except asyncio.CancelledError:
            await _finished(self._closing)
            raise

    async def _close(self) -> None:
        self._phase = _Phase.CLOSING
        try:
            # The writer runs this after every call submitted before (one thread, in order).
            await asyncio.wrap_future(self._writer.submit(self._close_device))
        finally:
            self._writer.shutdown(wait=False)  # idle: its last task was the close
            self._phase = _Phase.CLOSED
            self._events.end()

    def _close_device(self) -> None:
        """On the writer thread: waits out their slice (no new one starts: the phase
        is no longer open), then the device closes."""
        self._waiter.shutdown(wait=True)
        if self._device is not None:
            self._device.close()

    async def __aenter__(self) -> AsyncDevice:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- identity and link ---------------------------------------------------------------

    @property
    def device(self) -> Device:
        """The synchronous device underneath: its properties and counters are safe to
        read; call its blocking methods only off the event loop.

        Raises:
            RuntimeError: not started, or closed.
        """
        return self._open_device()

    @property
    def pid(self) -> str:
        """Our participant id (also after close).

        Raises:
            RuntimeError: not started.
        """
        if self._device is None:
            raise RuntimeError("start the AsyncDevice first: `async with AsyncDevice(...)`")
        return self._device.pid

    @property
    def connected(self) -> bool:
        return self._phase is _Phase.OPEN and self._device is not None and self._device.connected

    @property
    def protocol(self) -> str | None:
        return self._open_device().protocol

    async def wait_connected(self, timeout: float = 10.0) -> None:
        """Wait until connected to the broker and subscribed (its SUBACKs arrived; see
        :meth:`Device.wait_connected`).

        Raises:
            NotAuthorized: the broker refused our credential (at once).
            ConnectFailed: not connected or not subscribed within ``timeout`` (with the
                last reason), or the device closed meanwhile.
        """
        device = self._open_device()
        end = time.monotonic() + timeout
        while True:
            if self._phase is not _Phase.OPEN:
                raise ConnectFailed("the device closed before it connected")
            left = end - time.monotonic()
            try:
                await self._wait(device.wait_connected, max(0.0, min(left, _SLICE_S)))
            except NotAuthorized:
                raise
            except TransportError as exc:
                if time.monotonic() >= end:
                    raise type(exc)(f"not connected within {timeout:g} s: {exc}") from None
            else:
                return

    async def wait_drained(self, timeout: float = 10.0) -> bool:
        """Wait until the broker acknowledged the whole outbox; whether it did (``False``
        also when the device closed meanwhile)."""
        device = self._open_device()
        end = time.monotonic() + timeout
        while self._phase is _Phase.OPEN:
            left = end - time.monotonic()
            if await self._wait(device.wait_drained, max(0.0, min(left, _SLICE_S))):
                return True
            if left <= _SLICE_S:
                return False
        return False

    # -- events ------------------------------------------------------------------------

    def events(self, *, limit: int = EVENT_BUFFER) -> EventStream:
        """A new stream of the events emitted from now on (each stream sees every one).

        ``async for event in device.events():`` — make it before the action whose
        events you want (the stream starts empty); ``async with device.events() as
        events:`` stops it at the end of the block. A reader more than ``limit``
        events behind meets an :class:`~fieldchat.device.events.EventsDropped` instead
        of the rest; other streams and the device are not slowed.

        Raises:
            RuntimeError: the device is closed.
            ValueError: ``limit`` below 1.
        """
        if self._phase in (_Phase.CLOSING, _Phase.CLOSED):
            raise RuntimeError("the AsyncDevice is closed")
        return self._events.open(limit)

    # -- sending -----------------------------------------------------------------------

    async def send(self, cid: str, text: str, *, idempotency_key: str | None = None) -> SentMessage:
        """Seal ``text`` for ``cid`` and make it durable; it leaves as soon as it can.

        ``idempotency_key`` as in :meth:`Device.send`: a retry under the same key
        queues nothing and returns the first message.

        Raises:
            UnknownConversation, NotAMember: not a member of ``cid``.
            LimitExceeded: the text is too long.
            IdempotencyConflict: the key was used for another conversation or text.
            KeyStoreError: the state file could not be written (nothing was queued).
        """
        send = functools.partial(self._open_device().send, idempotency_key=idempotency_key)
        return await self._call(send, cid, text)

    async def send_many(self, cid: str, texts: Sequence[str]) -> list[SentMessage]:
        """Like :meth:`send` for several texts, in one transaction (all or none).

        Raises:
            UnknownConversation, NotAMember, LimitExceeded, KeyStoreError: as ``send``.
        """
        return await self._call(self._open_device().send_many, cid, list(texts))

    async def mark_read(self, cid: str) -> int:
        """Mark received texts of ``cid`` read; queue read receipts. How many."""
        return await self._call(self._open_device().mark_read, cid)

    # -- conversations -----------------------------------------------------------------

    async def create_conversation(
        self, members: Sequence[str] = (), *, policy: Policy | None = None, timeout: float = 10.0
    ) -> str:
        """Found a conversation with ``members``; its cid (roster and grants queued).

        Raises:
            UnknownParticipant: a member's bundle did not arrive within ``timeout``.
        """
        device = self._open_device()
        await self._fetch_bundles(device, members, timeout)
        return await self._call(
            partial(device.create_conversation, list(members), policy=policy, timeout=timeout)
        )

    async def invite(self, cid: str, pids: Sequence[str], *, timeout: float = 10.0) -> None:
        """Add members (admins only): a new epoch listing them, keys granted.

        Raises:
            UnknownConversation, NotAMember: no such conversation, or we are no admin.
            UnknownParticipant: a bundle did not arrive within ``timeout``.
        """
        device = self._open_device()
        await self._fetch_bundles(device, pids, timeout)
        await self._call(partial(device.invite, cid, list(pids), timeout=timeout))

    async def remove(self, cid: str, pids: Sequence[str]) -> None:
        """Remove members (admins only): a new epoch, every remaining member re-keys.

        Raises:
            UnknownConversation, NotAMember: no such conversation, or we are no admin.
        """
        await self._call(self._open_device().remove, cid, list(pids))

    async def leave(self, cid: str) -> None:
        """Leave ``cid`` (an admin removes us from the next epoch).

        Raises:
            UnknownConversation, NotAMember: not a member of ``cid``.
        """
        await self._call(self._open_device().leave, cid)

    async def set_policy(self, cid: str, policy: Policy) -> None:
        """Change the conversation's policy (admins only, a new epoch)."""
        await self._call(self._open_device().set_policy, cid, policy)

    async def conversations(self) -> list[ConversationInfo]:
        return await self._call(self._open_device().conversations)

    async def fingerprint(self, pid: str | None = None) -> str:
        """Our fingerprint, or a known participant's.

        Raises:
            UnknownParticipant: no bundle known for ``pid``.
        """
        return await self._call(self._open_device().fingerprint, pid)

    async def verify(self, pid: str, fingerprint: str) -> bool:
        """Compare ``pid``'s fingerprint with one read out of band; mark it verified.

        Raises:
            UnknownParticipant: no bundle known for ``pid``.
        """
        return await self._call(self._open_device().verify, pid, fingerprint)

    # -- local views -------------------------------------------------------------------

    async def outbox(self) -> list[OutboxRow]:
        """What waits for the broker's acknowledgement, in publishing order."""
        return await self._call(self._open_device().outbox)

    async def messages(self, cid: str | None = None, *, after_id: int = 0) -> list[ReceivedRow]:
        """Received messages stored past ``after_id`` (the ids of ``MessageReceived``)."""
        return await self._call(partial(self._open_device().messages, cid, after_id=after_id))

    async def sent(self, cid: str | None = None) -> list[SentRow]:
        return await self._call(self._open_device().sent, cid)

    async def undelivered(self, cid: str) -> int:
        """Own messages of the current epoch some current member has not receipted yet."""
        return await self._call(self._open_device().undelivered, cid)

    async def gaps(self, cid: str | None = None) -> list[Gap]:
        return await self._call(self._open_device().gaps, cid)

    # -- helpers -----------------------------------------------------------------------

    def _open_device(self) -> Device:
        if self._phase is _Phase.NEW or self._device is None:
            raise RuntimeError("start the AsyncDevice first: `async with AsyncDevice(...)`")
        if self._phase is not _Phase.OPEN:
            raise RuntimeError("the AsyncDevice is closed")
        return self._device

    async def _call(self, fn: Callable[..., T], /, *args: object) -> T:
        """``fn(*args)`` on the writer thread, after the calls made before it."""
        self._open_device()
        return await self._run(self._writer, partial(fn, *args))

    async def _wait(self, fn: Callable[[float], T], slice_s: float) -> T:
        """One slice of a blocking wait on the wait thread."""
        self._open_device()
        return await self._run(self._waiter, partial(fn, slice_s))

    async def _fetch_bundles(self, device: Device, pids: Sequence[str], timeout: float) -> None:
        """Wait for the bundles of ``pids`` in slices (a cancel is prompt).

        Raises:
            UnknownParticipant: one did not arrive within ``timeout``.
        """
        end = time.monotonic() + timeout
        while True:
            left = end - time.monotonic()
            try:
                await self._wait(partial(device.fetch_bundles, pids), max(0.0, min(left, _SLICE_S)))
            except UnknownParticipant:
                if time.monotonic() < end:
                    continue
                absent = await self._wait(partial(_absent, device, pids), 0.0)
                raise UnknownParticipant(
                    f"no bundle for {absent} within {timeout:g} s: has that device "
                    f"connected to this broker once?"
                ) from None
            return

    async def _run(self, executor: ThreadPoolExecutor, fn: Callable[[], T]) -> T:
        """``fn()`` on ``executor``'s thread; see the class docstring on cancellation."""
        done: Future[T] = executor.submit(fn)
        result = asyncio.wrap_future(done)
        try:
            return await asyncio.shield(result)
        except asyncio.CancelledError:
            if not done.cancel():  # already running: let it finish before we go on
                await _finished(result)
            raise


def _absent(device: Device, pids: Sequence[str], _: float) -> str:
    """The first of ``pids`` whose bundle is unknown (on a thread: the engine locks)."""
    return next(p for p in pids if device.engine.bundle_of(p) is None)


async def _finished(future: asyncio.Future[T]) -> None:
    """Wait until ``future`` is done, whatever cancels the waiting task meanwhile (the
    caller raises its own cancellation next); its outcome is retrieved, not raised."""
    while not future.done():
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait([future])
    if not future.cancelled():
        future.exception()

"""Stop signals: SIGTERM is a normal stop, the same as Ctrl-C (SIGINT).

Every long-running command (``fieldchat up``, ``broker run``, ``gateway run``,
``device listen`` and ``chat``) stops the same way on either signal: it runs its
clean shutdown, prints one "stopped" line and exits 0, so ``systemctl stop`` (SIGTERM)
and Ctrl-C lose nothing. A second signal while it stops ends the process at once,
with a line saying so and status 128 + the signal number: the way out of a clean stop
that hangs (a full disk, a consumer that stopped reading ``listen``'s output).

Like logging and tracing, signals are process state: only entry points (the CLI)
install these handlers, each for the time its command runs, and put the previous
ones back afterwards.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable, Coroutine, Iterator
from types import FrameType
from typing import Any, Final, NoReturn

__all__ = ["STOP_SIGNALS", "Interrupts", "force_exit", "stop_signals", "until_stopped"]

STOP_SIGNALS: Final = (signal.SIGINT, signal.SIGTERM)
_Handler = Callable[[int, FrameType | None], Any] | int | None  # signal.getsignal()


def force_exit(signum: int) -> NoReturn:
    """End the process now, loudly: a second stop signal came while stopping cleanly."""
    name = signal.Signals(signum).name
    line = f"fieldchat: {name} while stopping: exiting at once, the clean stop unfinished\n"
    os.write(2, line.encode())
    os._exit(128 + signum)


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def stop_signals(on_stop: Callable[[], None]) -> Iterator[None]:
    """In a running event loop: the first SIGINT or SIGTERM calls ``on_stop`` (which
    starts a clean stop: set an event, cancel the main task); a second one while the
    block runs calls :func:`force_exit`. Outside the main thread it does nothing
    (signals reach only the main thread)."""
    if not _main_thread():
        yield
        return
    import asyncio  # noqa: PLC0415 - a device command's cold start does without it

    loop = asyncio.get_running_loop()
    stopping = False

    def handle(signum: int) -> None:
        nonlocal stopping
        if stopping:
            force_exit(signum)
        stopping = True
        on_stop()

    previous: dict[int, _Handler] = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, handle, sig)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            loop.remove_signal_handler(signum)  # resets to the default, not to ``handler``
            if handler is not None:
                signal.signal(signum, handler)


async def until_stopped(main: Coroutine[Any, Any, None]) -> bool:
    """Run ``main`` until it returns (``False``) or a stop signal cancels it and it has
    finished its clean-up (``True``). A second signal forces the exit.

    Cancelling is the clean stop: every ``finally`` and ``async with`` of ``main``
    runs, as in asyncio's own handling of a first Ctrl-C, and now of SIGTERM too.
    """
    import asyncio  # noqa: PLC0415 - as in stop_signals

    task = asyncio.ensure_future(main)
    stopped = False

    def stop() -> None:
        nonlocal stopped
        stopped = True
        task.cancel()

    with stop_signals(stop):
        try:
            await task
        except asyncio.CancelledError:
            if not (stopped and task.cancelled()):
                raise  # we were cancelled, not stopped by a signal
    return stopped


class Interrupts:
    """For synchronous commands: while installed, SIGINT and SIGTERM raise
    :class:`KeyboardInterrupt` in the main thread (what Python does for Ctrl-C), so
    both stop through the same ``finally`` blocks; a second signal calls
    :func:`force_exit`. Inside :meth:`deferred` a first signal is held and raised
    when the block ends, so a step that must not be cut in two (save a cursor, then
    print what it covers; close the state file) completes first.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._deferring = 0
        self._installed = 0
        self._previous: dict[int, _Handler] = {}

    @property
    def requested(self) -> bool:
        """Whether a stop signal came (and was raised or is held)."""
        return self.signum is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:  # noqa: ARG002
        if self.signum is not None:
            force_exit(signum)
        self.signum = signum
        if not self._deferring:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def installed(self) -> Iterator[Interrupts]:
        """Handle the stop signals while the block runs (nested uses are fine)."""
        if not _main_thread():
            yield self
            return
        if not self._installed:
            self.signum = None
            self._previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}
        self._installed += 1
        try:
            yield self
        finally:
            self._installed -= 1
            if not self._installed:
                for signum, handler in self._previous.items():
                    if handler is not None:  # None: set outside Python, cannot be restored
                        signal.signal(signum, handler)

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """Hold a first stop signal that comes during the block until it ends, then
        raise it (one that came before is being handled already: nothing is raised)."""
        before = self.signum
        self._deferring += 1
        try:
            yield
        finally:
            self._deferring -= 1
        if before is None and self.signum is not None and not self._deferring:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def unwrapped(self, *kept: type[BaseException]) -> Iterator[None]:
        """Turn back into :class:`KeyboardInterrupt` an error a library made of ours.

        pydantic-core catches every exception raised inside a serializer, ours
        included, and raises ``PydanticSerializationError`` with only its name in the
        text (seen in CI: a Ctrl-C while the settings were dumped ended in a
        traceback). So once a stop signal came, any error but those ``kept`` (a
        command's own exit) is that stop.
        """
        try:
            yield
        except Exception as exc:
            if self.signum is None or isinstance(exc, kept):
                raise
            raise KeyboardInterrupt from exc

"""Imports that a stop signal must not cut in half, and how a stop before a command
ran ends.

SIGINT and SIGTERM are the same stop from the first instant (docs: "Stopping"). A
KeyboardInterrupt raised inside an import can come out as another error (CPython
reports one raised in a class's ``__set_name__`` as a RuntimeError), so both signals
are held while the command line imports what it runs, and one that came meanwhile is
raised once the import is done: one line, no traceback. A service (``up``, ``demo``,
``broker run``, ``gateway run``, ``device listen``, ``chat`` or ``run``) stopped so
early stops cleanly, status 0, as it would later; any other command says it was
interrupted and exits 130 (:class:`fieldchat.schemas.exits.ExitCode`), as it would
while connecting.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable, Sequence
from types import FrameType
from typing import NoReturn, TypeVar

from fieldchat.schemas.exits import ExitCode

T = TypeVar("T")

STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}
STOPPED_BEFORE_START = "fieldchat stopped before it started."
INTERRUPTED_BEFORE_START = "fieldchat: interrupted before it started; nothing was done."
SERVICES = {
    ("up",),
    ("demo",),
    ("broker", "run"),
    ("gateway", "run"),
    ("device", "listen"),
    ("device", "chat"),
    ("device", "run"),
}
# The options before a service's name that take a value (the device group's; a test
# checks this against the command line itself), to find the command's words.
VALUE_OPTIONS = frozenset(
    {
        "--state",
        "--broker",
        "--credential",
        "--gateway",
        "--config",
        "--prefix",
        "--protocol",
        "--ca-file",
        "--cert-file",
        "--key-file",
    }
)


_stops_seen: list[int] = []


def _raise_stop(signum: int, frame: FrameType | None) -> None:  # noqa: ARG001
    _stops_seen.append(signum)
    raise KeyboardInterrupt


def handle_stops() -> None:
    """Until a command takes them over: SIGINT and SIGTERM both raise
    KeyboardInterrupt, and one that came is remembered (:func:`stop_came`)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, _raise_stop)


def stop_came() -> bool:
    """Whether a stop signal reached :func:`handle_stops`'s handler: then an error
    that follows is that stop, whatever a library made of it (pydantic-core raises
    PydanticSerializationError for a KeyboardInterrupt raised in a serializer)."""
    return bool(_stops_seen)


def command_words(argv: Sequence[str]) -> tuple[str, ...]:
    """The first two words of a command line that name its command (``device send``)."""
    words: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg.startswith("-"):
            skip = arg in VALUE_OPTIONS
        else:
            words.append(arg)
            if len(words) == 2:
                break
    return tuple(words)


def stopped_before_start(argv: Sequence[str] | None = None) -> NoReturn:
    """Exit for a stop signal that came before the command ran: one line; status 0
    for a service, 130 for any other command."""
    words = command_words(sys.argv[1:] if argv is None else argv)
    if words[:1] in SERVICES or words[:2] in SERVICES:
        sys.stderr.write(STOPPED_BEFORE_START + "\n")
        raise SystemExit(ExitCode.OK)
    sys.stderr.write(INTERRUPTED_BEFORE_START + "\n")
    raise SystemExit(ExitCode.INTERRUPTED)


def import_held(load: Callable[[], T]) -> T:
    """``load()`` with the stop signals held; one that came meanwhile ends the process
    (:func:`stopped_before_start`)."""
    held = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        try:
            loaded = load()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)  # a pending one is raised here
    except KeyboardInterrupt:
        stopped_before_start()
    return loaded

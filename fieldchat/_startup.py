"""Imports that a stop signal must not cut in half.

SIGINT and SIGTERM are the same stop from the first instant (docs: "Stopping"). A
KeyboardInterrupt raised inside an import can come out as another error (CPython
reports one raised in a class's ``__set_name__`` as a RuntimeError), so both signals
are held while the command line imports what it runs, and one that came meanwhile is
raised once the import is done: a clean stop, one line, status 0.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}
STOPPED_BEFORE_START = "fieldchat stopped before it started."


def import_held(load: Callable[[], T]) -> T:
    """``load()`` with the stop signals held; one that came meanwhile is a clean exit."""
    held = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        try:
            loaded = load()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)  # a pending one is raised here
    except KeyboardInterrupt:
        sys.stderr.write(STOPPED_BEFORE_START + "\n")
        raise SystemExit(0) from None
    return loaded

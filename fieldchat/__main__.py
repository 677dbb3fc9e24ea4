"""The ``fieldchat`` console script (and ``python -m fieldchat``).

SIGINT and SIGTERM are the same stop from the first instant (docs: "Stopping"), and
a stop before a command ran is a clean one: one line, status 0. Importing the root
command, and then the sub-app a command belongs to (:mod:`fieldchat._startup`),
happens with both signals held; a Ctrl-C in that time used to end in a traceback,
and a SIGTERM in status 143. From there on the commands handle the signals
(:mod:`fieldchat.schemas.signals`).
"""

from __future__ import annotations

import signal
import sys

_STOP = {signal.SIGINT, signal.SIGTERM}


def main() -> None:
    """Run the ``fieldchat`` command line."""
    held = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP)  # first of all
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # the same as Ctrl-C
    from fieldchat._startup import STOPPED_BEFORE_START  # noqa: PLC0415 - signals held

    try:
        from fieldchat.cli import app  # noqa: PLC0415 - after the signals, on purpose

        signal.pthread_sigmask(signal.SIG_SETMASK, held)  # one that came is raised here
    except KeyboardInterrupt:
        sys.stderr.write(STOPPED_BEFORE_START + "\n")
        raise SystemExit(0) from None
    app()


if __name__ == "__main__":
    main()

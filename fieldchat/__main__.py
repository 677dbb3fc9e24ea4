"""The ``fieldchat`` console script (and ``python -m fieldchat``).

SIGINT and SIGTERM are the same stop from the first instant (docs: "Stopping"), and
a stop before a command ran is one line: status 0 for a service, 130 for a one-shot
command. Importing the root command, and then the sub-app a command belongs to
(:mod:`fieldchat._startup`), happens with both signals held; a Ctrl-C in that time
used to end in a traceback, and a SIGTERM in status 143. From there on the commands
handle the signals (:mod:`fieldchat.schemas.signals`).
"""

from __future__ import annotations

import signal
import sys

_STOP = {signal.SIGINT, signal.SIGTERM}


def main() -> None:
    """Run the ``fieldchat`` command line."""
    held = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP)  # first of all
    from fieldchat._startup import handle_stops, stopped_before_start  # noqa: PLC0415 - held

    handle_stops()  # SIGTERM the same as Ctrl-C

    argv = sys.argv[1:]
    asks_help = "--help" in argv[-1:]
    if asks_help:
        from fieldchat import _help  # noqa: PLC0415

        kept = _help.cached_help(argv)
        if kept is not None:  # typer's own rendering, from the last time (fieldchat._help)
            raise SystemExit(_help.show(kept))
    else:
        _send_through_daemon(argv, held)
    try:
        from fieldchat.cli import app  # noqa: PLC0415 - after the signals, on purpose

        signal.pthread_sigmask(signal.SIG_SETMASK, held)  # one that came is raised here
    except KeyboardInterrupt:
        stopped_before_start()
    if asks_help:
        _help.run_and_keep(argv, app)
    else:
        app()


def _send_through_daemon(argv: list[str], held: set[int | signal.Signals]) -> None:
    """``device send CID TEXT`` to a running daemon without typer (fieldchat._fast);
    returns when the command line is another or no daemon answers. Called with the
    stop signals held (the imports); they are let through while the daemon answers."""
    from fieldchat import _fast  # noqa: PLC0415 - signals held
    from fieldchat.schemas.exits import ExitCode  # noqa: PLC0415

    line = _fast.parse_send(argv)
    client = _fast.daemon_for(line) if line is not None else None
    if line is None or client is None:
        return
    try:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)  # one that came is raised here
        status = _fast.send(client, line)
    except KeyboardInterrupt:
        sys.stderr.write("fieldchat device: interrupted before it finished.\n")
        raise SystemExit(ExitCode.INTERRUPTED) from None
    raise SystemExit(status)


if __name__ == "__main__":
    main()

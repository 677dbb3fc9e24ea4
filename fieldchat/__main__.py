"""The ``fieldchat`` console script (and ``python -m fieldchat``).

SIGINT and SIGTERM are the same stop from the first instant (docs: "Stopping"), and
a stop before a command ran is a clean one: one line, status 0. Importing the root
command, and then the sub-app a command belongs to, happens with both signals held
(:mod:`fieldchat._startup`); a Ctrl-C in that time used to end in a traceback, and a
SIGTERM in status 143. From there on the commands handle the signals
(:mod:`fieldchat.schemas.signals`).
"""

from __future__ import annotations

import signal
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import typer


def main() -> None:
    """Run the ``fieldchat`` command line."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # the same as Ctrl-C
    from fieldchat._startup import import_held  # noqa: PLC0415 - after the handler

    import_held(_root)()


def _root() -> typer.Typer:
    from fieldchat.cli import app  # noqa: PLC0415 - with the signals held, on purpose

    return app


if __name__ == "__main__":
    main()

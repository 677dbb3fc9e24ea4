"""``fieldchat device send CID TEXT`` to a running daemon, without typer.

The command a script runs per message, so its cold start is what a Pi pays per
message (issue 18: at most twice the time to import paho). typer 0.29 imports
pydantic to parse any command line, which alone costs more than that; so when the
command line has exactly this shape (the device group's options that take a value,
``send``, a conversation and a text) and a daemon (``fieldchat device run``) answers
on the state file's control socket, it is sent here over the socket with the
standard library. Anything else (another command, another flag, ``--wait``, stdin,
no daemon, ``FIELDCHAT_NO_DAEMON=1``) returns ``None`` and the full command line
runs, which talks to the daemon the same way (:mod:`fieldchat.device.remote`): the
same output, the same exit codes (:mod:`fieldchat.schemas.exits`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from fieldchat._startup import VALUE_OPTIONS
from fieldchat.schemas.exits import ExitCode

if TYPE_CHECKING:
    from fieldchat.device.control_client import ControlClient

__all__ = ["SendLine", "daemon_for", "parse_send", "send"]


class SendLine(NamedTuple):  # not a dataclass: dataclasses imports inspect (≈ 7 ms)
    """``fieldchat device [OPTIONS] send CID TEXT``, as far as the daemon needs it."""

    state: str | None
    config: str | None
    cid: str
    text: str


def parse_send(argv: Sequence[str]) -> SendLine | None:
    """``argv`` read as ``device [--option value]… send CID TEXT``, or ``None`` when it
    is anything else (then typer parses it)."""
    if len(argv) < 4 or argv[0] != "device":
        return None
    options: dict[str, str] = {}
    rest = list(argv[1:])
    while rest and rest[0].startswith("-"):
        name, eq, value = rest.pop(0).partition("=")
        if name not in VALUE_OPTIONS:
            return None
        if not eq:
            if not rest:
                return None
            value = rest.pop(0)
        options[name] = value
    if len(rest) != 3 or rest[0] != "send" or any(a.startswith("-") for a in rest[1:]):
        return None
    state = options.get("--state", os.environ.get("FIELDCHAT_STATE"))
    config = options.get("--config", os.environ.get("FIELDCHAT_CONFIG"))
    return SendLine(state or None, config or None, rest[1], rest[2])


def daemon_for(line: SendLine) -> ControlClient | None:
    """A connection to the daemon of ``line``'s state file, or ``None`` when none
    answers there (or ``FIELDCHAT_NO_DAEMON=1``): the command then runs standalone.
    As :func:`fieldchat.device.remote.daemon_for`, only a daemon running as the state
    file's owner is one.

    Raises:
        SystemExit: something else answers there (``NotOurDaemon``) or the socket may
            not be used; one line says so, as the full command line would (nothing was
            sent).
    """
    from fieldchat.device.control_client import daemon_of, state_file  # noqa: PLC0415

    path = state_file(line.state, Path(line.config) if line.config else None)
    try:
        return daemon_of(path)
    except OSError as exc:  # as the full command line says it (it imports typer)
        from fieldchat.device.remote import refusal  # noqa: PLC0415 - this case only

        said, code = refusal(exc, path)
        sys.stderr.write(said + "\n")
        raise SystemExit(code) from None


def send(client: ControlClient, line: SendLine) -> int:
    """Send ``line``'s text through the daemon; the exit status (the error in one line
    on stderr, as :mod:`fieldchat.device.remote` says it)."""
    from fieldchat.device.control_client import DaemonError  # noqa: PLC0415 - loaded

    try:
        with client:
            client.call("send", {"cid": line.cid, "text": line.text})
    except DaemonError as exc:
        codes = {"config": ExitCode.USAGE, "transport": ExitCode.UNAVAILABLE}
        sys.stderr.write(f"error: {exc}\n")
        return codes.get(exc.kind, ExitCode.REFUSED)
    except ConnectionError as exc:  # DaemonGone included
        sys.stderr.write(f"error: the device daemon went away: {exc}\n")
        return ExitCode.UNAVAILABLE
    return ExitCode.OK

"""The exit codes of the ``fieldchat`` commands: the one table (docs/device.md, "Exit codes").

A script branches on these, so each says whether anything was lost and whether a
retry could send twice. ``send`` exits 0 once a message is accepted into the outbox
(durable in the state file; it leaves when the broker is reachable): a broker that is
down, or a credential it refuses, after that is reported but is not a failure, since
retrying would send the message twice. Only ``--wait`` asks for more, and
``NOT_YET`` says "kept, not delivered yet" (its value is sysexits' EX_TEMPFAIL).

Every command's ``--help`` ends with the codes it can return (:func:`epilog`). Pure
standard library: the command line imports it before it knows its command.
"""

from __future__ import annotations

from enum import IntEnum

__all__ = ["MEANINGS", "ExitCode", "epilog", "for_kind"]


class ExitCode(IntEnum):
    """What a ``fieldchat`` command's status means."""

    OK = 0
    REFUSED = 1
    USAGE = 2
    UNAVAILABLE = 3
    NOT_YET = 75
    INTERRUPTED = 130


MEANINGS: dict[ExitCode, str] = {
    ExitCode.OK: "done (send: accepted into the outbox, delivered as soon as the broker "
    "is reachable; with --wait: delivered)",
    ExitCode.REFUSED: "fieldchat refused it (unknown conversation, not a member, "
    "fingerprints differ): nothing was sent",
    ExitCode.USAGE: "bad command line or settings, or no identity yet (run init): nothing was done",
    ExitCode.UNAVAILABLE: "the broker or network failed a step that needed it and nothing "
    "was changed, or the broker refused a publication (not sent again)",
    ExitCode.NOT_YET: "only with --wait: kept in the outbox, not delivered (or not "
    "acknowledged) within --timeout; it still leaves later, do not send it again",
    ExitCode.INTERRUPTED: "stopped by Ctrl-C or SIGTERM before it finished (what it "
    "accepted stays in the outbox)",
}


def epilog(*codes: ExitCode) -> str:
    """The ``--help`` line listing ``codes`` (all of them when none are given)."""
    chosen = codes or tuple(ExitCode)
    return "Exit codes: " + "; ".join(f"{int(c)} {MEANINGS[c]}" for c in chosen) + "."


def for_kind(kind: str) -> ExitCode:
    """The code of an error by its kind, as the device daemon reports it (JSON-RPC
    ``data.kind``, :mod:`fieldchat.device.rpc`): the standalone commands' mapping of
    ConfigError, TransportError and the other FieldchatErrors."""
    return {"config": ExitCode.USAGE, "transport": ExitCode.UNAVAILABLE}.get(kind, ExitCode.REFUSED)

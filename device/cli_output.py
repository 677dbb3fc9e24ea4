"""How the device commands print: one line per message (a person's line, or JSON with
the ids that name it on every device), notes for events, and the refusal line of a
``send`` the broker refused. Kept apart from the commands in :mod:`fieldchat.device.cli`."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence

import typer

from fieldchat.device.events import (
    Event,
    ForgeryDetected,
    KeyChanged,
    MessageReceived,
    MessageVerified,
    PresenceChanged,
    PublishRefused,
    ReceiptReceived,
)
from fieldchat.device.rows import ReceivedRow, Trust

__all__ = [
    "forgery_line",
    "note",
    "presence_line",
    "print_rows",
    "refusal_line",
    "render",
    "verified_line",
    "write",
]

# What a person's line says of who sent it (PROTOCOL.md §6.5): nothing when signed.
_MARKS = {
    Trust.AUTHENTIC: "",
    Trust.PENDING: " [pending]",
    Trust.VERIFIED: " [verified]",
    Trust.FORGED: " [FORGED]",
}


def _steps(steps: Sequence[int]) -> str:
    return ", ".join(str(s) for s in steps)


def verified_line(event: MessageVerified) -> str:
    """What the device commands say when pending messages are verified."""
    return (
        f"-- verified: {len(event.steps)} pending message(s) from {event.sender[:8]} "
        f"(steps {_steps(event.steps)})"
    )


def forgery_line(event: ForgeryDetected) -> str:
    """What they say, loudly, when a member forged another member's messages."""
    which = "were" if event.pinpointed else "include one or more that were"
    return (
        f"FORGERY: message(s) shown as from {event.sender} in {event.cid} "
        f"(epoch {event.epoch}, steps {_steps(event.steps)}) {which} NOT sent by them: "
        "another member of the conversation forged them"
    )


def presence_line(pid: str, online: bool) -> str:
    """The note for a member's presence change (``listen``, ``chat``)."""
    return f"-- {pid[:8]} is {'online' if online else 'offline'}"


def refusal_line(refused: Sequence[PublishRefused]) -> str:
    """What ``send`` says when the broker refused some of what it sent."""
    first = refused[0]
    count = sum(r.messages for r in refused)
    where = f"conversation {first.cid}" if first.cid else first.topic
    return (
        f"the broker refused {count} publication(s) to {where} "
        f"(0x{first.code:02X} {first.reason}); they are not sent again"
    )


def _line(row: MessageReceived | ReceivedRow, json_out: bool) -> str:
    """One printed message. ``--json`` lines carry the ids that name a message on every
    device (cid, sender, epoch, sender_index, chain, step) and its local row ``id``."""
    if isinstance(row, MessageReceived):
        trust = Trust.PENDING if row.pending else Trust.AUTHENTIC
    else:
        trust = row.trust
    if not json_out:
        clock = time.strftime("%H:%M:%S", time.localtime(row.sent_at or 0))
        return f"[{clock}] {row.sender[:8]}: {row.text}{_MARKS[trust]}"
    return json.dumps(row.to_json())


def print_rows(rows: Sequence[MessageReceived | ReceivedRow], json_out: bool) -> None:
    """Print ``rows`` in one write."""
    write(render(rows, json_out))


def render(rows: Sequence[MessageReceived | ReceivedRow], json_out: bool) -> bytes:
    return "".join(_line(row, json_out) + "\n" for row in rows).encode()


def write(text: bytes) -> None:
    sys.stdout.flush()  # whatever was written through sys.stdout comes first
    sys.stdout.buffer.write(text)
    sys.stdout.flush()


def event_line(event: Event) -> str:
    """``-- connected: protocol=5 session_present=True``: an event for a person."""
    fields = " ".join(
        f"{key}={','.join(map(str, value)) if isinstance(value, list | tuple) else value}"
        for key, value in event.to_json().items()
        if key != "type"
    )
    return f"-- {event.type.value}: {fields}" if fields else f"-- {event.type.value}"


def note(event: Event, json_out: bool) -> None:
    if isinstance(event, MessageReceived):
        return
    if json_out:
        typer.echo(json.dumps(event.to_json()))
        sys.stdout.flush()
    elif isinstance(event, ForgeryDetected):
        typer.echo(forgery_line(event), err=True)
    elif isinstance(event, MessageVerified):
        typer.echo(verified_line(event), err=True)
    elif isinstance(event, KeyChanged):
        typer.echo(
            f"WARNING: the keys of {event.pid} CHANGED. Compare fingerprints: "
            f"fieldchat device verify {event.pid}",
            err=True,
        )
    elif isinstance(event, PresenceChanged):
        typer.echo(presence_line(event.pid, event.online), err=True)
    elif not isinstance(event, ReceiptReceived | PublishRefused):  # the latter: logged
        typer.echo(event_line(event), err=True)

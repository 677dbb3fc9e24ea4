"""``fieldchat device send`` and ``outbox``: messages into the outbox, and what waits
there for the broker."""

from __future__ import annotations

import json
import select
import sys
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Annotated

import typer

from fieldchat.device import remote
from fieldchat.device.cli_common import (
    NOT_YET,
    JsonOut,
    close,
    device_for,
    errors,
    opened,
    options,
    running_daemon,
)
from fieldchat.schemas.errors import ConfigError, LimitExceeded, ProtocolError, Refused

if TYPE_CHECKING:
    from fieldchat.device.client import Device, SentMessage
    from fieldchat.device.events import PublishRefused

__all__ = ["outbox", "send"]


def _stdin_batches(limit: int = 100) -> Iterator[list[str]]:
    """Lines of stdin in batches: whatever arrived within 50 ms, at most ``limit``."""
    batch: list[str] = []
    while True:
        ready = not batch or select.select([sys.stdin], [], [], 0.05)[0]
        if ready:
            line = sys.stdin.readline()
            if not line:
                break
            text = line.rstrip("\n")
            if text:
                batch.append(text)
            if len(batch) < limit:
                continue
        if batch:
            yield batch
            batch = []
    if batch:
        yield batch


SendTimeout = Annotated[
    float,
    typer.Option(
        help="Seconds to try to deliver (with --wait: to wait) before leaving it in the outbox."
    ),
]
Wait = Annotated[
    bool,
    typer.Option(
        "--wait",
        help="Exit 0 only once the broker has the message (its PUBACK); 75 if it is "
        "still in the outbox after --timeout.",
    ),
]
Acks = Annotated[
    int,
    typer.Option(
        "--acks",
        min=0,
        metavar="N",
        help="Wait (implies --wait) until N members acknowledged it (delivery receipts).",
    ),
]


def send(
    cid: str,
    text: Annotated[
        str | None, typer.Argument(help="The text; omit or '-' to read lines from stdin.")
    ] = None,
    timeout: SendTimeout = 10.0,
    wait: Wait = False,
    acks: Acks = 0,
) -> None:
    """Send a message (durable at once; delivered when the broker is reachable)."""
    refused: list[PublishRefused] = []
    with errors():
        if (daemon := running_daemon()) is not None:
            if not (wait or acks):
                remote.send(daemon, cid, text)
                return
            from fieldchat.device.remote_wait import send_and_wait  # noqa: PLC0415

            batches = [[text]] if text is not None and text != "-" else _stdin_batches()
            send_and_wait(daemon, cid, batches, timeout=timeout, acks=acks)
            return
        options.load()
        from fieldchat.device.cli_output import refusal_line  # noqa: PLC0415 - loaded
        from fieldchat.device.cli_wait import Delivery, deliver  # noqa: PLC0415
        from fieldchat.device.events import PublishRefused  # noqa: PLC0415

        device = device_for(lambda e: refused.append(e) if isinstance(e, PublishRefused) else None)
        try:
            if acks:
                _check_acks(device, cid, acks)
            sent = _queue(device, cid, text)
            wanted = Delivery(sent, broker=wait or acks > 0, acks=acks)
            kept = deliver(device, wanted, timeout, refused)
        finally:
            close(device)
        if refused:  # checked after close: the worker has emitted all it committed
            raise Refused(refusal_line(refused))
    if kept is not None:
        typer.echo(kept.line(waited=wanted.broker), err=True)
        if wanted.broker:
            raise typer.Exit(NOT_YET)


def _check_acks(device: Device, cid: str, acks: int) -> None:
    """``--acks N`` asks for no more members than the conversation has besides us.

    Raises:
        ConfigError: it does (nothing was sent).
    """
    infos = {info.cid: info for info in device.conversations()}
    others = len(infos[cid].members) - 1 if cid in infos else acks
    if acks > others:
        raise ConfigError(
            f"--acks {acks}: conversation {cid} has {others} other member(s); nothing was sent"
        )


def _queue(device: Device, cid: str, text: str | None) -> list[SentMessage]:
    """Accept ``text`` (or stdin's lines) into the outbox and start the device.

    Raises:
        ProtocolError, LimitExceeded: refused; the message says what was sent before.
    """
    sent: list[SentMessage] = []
    try:
        if text is not None and text != "-":
            sent += device.send_many(cid, [text])
            device.start()
        else:
            device.start()
            for batch in _stdin_batches():
                sent += device.send_many(cid, batch)
    except (ProtocolError, LimitExceeded) as exc:
        before = f"the {len(sent)} line(s) before were accepted" if sent else "nothing was sent"
        raise type(exc)(f"{exc}; {before}") from None
    return sent


def outbox(json_out: JsonOut = False) -> None:
    """What is waiting for the broker (no network)."""
    with errors():
        if (daemon := running_daemon()) is not None:
            remote.outbox(daemon, json_out=json_out)
            return
        with opened() as device:
            rows = device.outbox()
    for row in rows:
        if json_out:
            typer.echo(
                json.dumps(
                    {
                        "seq": row.seq,
                        "what": row.what,
                        "cid": row.cid,
                        "topic": row.topic,
                        "bytes": len(row.payload),
                        "queued_at": row.created_at,
                    }
                )
            )
        else:
            age = time.time() - row.created_at
            typer.echo(
                f"{row.seq:6d}  {row.what:7s}  {row.cid or '-':26s}  "
                f"{len(row.payload):5d} B  {age:6.0f} s ago"
            )
    if not json_out:
        typer.echo(f"{len(rows)} waiting", err=True)

"""``fieldchat device send --wait`` / ``--acks N`` through a running daemon: send, keep
the ids of what the daemon accepted, then ask its ``delivery`` method until the broker
has them (and N members receipted each) or ``--timeout`` passes (exit 75: kept, not
delivered yet). The same promises as the standalone command (docs/device.md, "Exit
codes"); the standard library, typer and the control client only, like
:mod:`fieldchat.device.remote`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import typer

from fieldchat.device.control_client import ControlClient, DaemonError
from fieldchat.schemas.exits import ExitCode, for_kind

__all__ = ["send_and_wait"]

MAX_IDS = 1024  # ids per delivery call (the daemon's limit)
MAX_WAIT_S = 120.0  # seconds per delivery call (the daemon's limit); longer waits loop


def send_and_wait(
    client: ControlClient, cid: str, batches: Iterable[list[str]], *, timeout: float, acks: int
) -> None:
    """Send ``batches`` of texts to ``cid`` through ``client`` and wait for them.

    Raises:
        typer.Exit: 75 when not delivered within ``timeout``; the daemon's error codes
            (:func:`fieldchat.schemas.exits.for_kind`) with one line saying what was sent.
    """
    ids: list[int] = []
    try:
        with client:
            if acks:
                _check_acks(client, cid, acks)
            for batch in batches:
                results = client.call_many("send", [{"cid": cid, "text": t} for t in batch])
                ids += [int(r["id"]) for r in results]
            progress = _wait(client, ids, acks, timeout)
    except DaemonError as exc:
        before = f"the {len(ids)} message(s) before were accepted" if ids else "nothing was sent"
        typer.echo(f"error: {exc}; {before}", err=True)
        raise typer.Exit(for_kind(exc.kind)) from None
    except ConnectionError as exc:  # the daemon stopped: what it accepted is in the outbox
        if not ids:
            typer.echo(f"error: the device daemon went away: {exc}; nothing was sent", err=True)
            raise typer.Exit(ExitCode.UNAVAILABLE) from None
        progress = {"published": 0, "acknowledged": 0, "why": "the device daemon stopped"}
    if progress.get("delivered"):
        return
    what = f"acknowledged by {acks} member(s)" if acks else "taken by the broker"
    why = progress.get("why") or f"{progress['published']} of {len(ids)} taken by the broker"
    if acks and "why" not in progress:
        why += f", {progress['acknowledged']} acknowledged"
    typer.echo(
        f"fieldchat device: not delivered yet: {len(ids)} message(s) not {what} within "
        f"{timeout:g} s ({why}); kept in the outbox, the device daemon sends them; "
        "do not send them again",
        err=True,
    )
    raise typer.Exit(ExitCode.NOT_YET)


def _check_acks(client: ControlClient, cid: str, acks: int) -> None:
    """``--acks N`` asks for no more members than the conversation has besides us."""
    for info in client.call("conversations"):
        others = len(info["members"]) - 1
        if info["cid"] == cid and acks > others:
            typer.echo(
                f"error: --acks {acks}: conversation {cid} has {others} other member(s); "
                "nothing was sent",
                err=True,
            )
            raise typer.Exit(ExitCode.USAGE)


def _wait(client: ControlClient, ids: list[int], acks: int, timeout: float) -> dict[str, Any]:
    """The daemon's ``delivery`` of ``ids`` within ``timeout``, in calls it accepts."""
    end = time.monotonic() + timeout
    pending = ids
    progress: dict[str, Any] = {"delivered": True, "published": 0, "acknowledged": 0}
    while pending:
        chunk, rest = pending[:MAX_IDS], pending[MAX_IDS:]
        left = min(MAX_WAIT_S, max(0.0, end - time.monotonic()))
        got = client.call("delivery", {"ids": chunk, "acks": acks, "timeout": left})
        if not got["delivered"] and left < MAX_WAIT_S:  # the whole timeout has passed
            done = len(ids) - len(pending)
            return {
                "delivered": False,
                "published": done + got["published"],
                "acknowledged": done + got["acknowledged"],
            }
        if got["delivered"]:
            pending = rest
    return progress

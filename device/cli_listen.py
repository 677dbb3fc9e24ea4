"""``fieldchat device listen`` and ``chat``: the standalone loops that show what
arrives, each message once across runs (the cursor in the state file)."""

from __future__ import annotations

import queue
import sys
import time
from typing import TYPE_CHECKING, Annotated

import typer

from fieldchat.device import remote
from fieldchat.device.cli_common import (
    JsonOut,
    Timeout,
    close,
    device_for,
    errors,
    finish,
    interrupts,
    opened,
    running_daemon,
)
from fieldchat.schemas.errors import ConfigError, TransportError

if TYPE_CHECKING:
    from fieldchat.device.client import Device
    from fieldchat.device.events import Event

__all__ = ["LISTEN_BATCH", "chat", "listen"]

_CURSOR = "listen_cursor"
# listen saves its cursor past a batch of rows before printing them (docs/device.md):
# a SIGKILL or power cut between the two leaves at most this many rows unshown (they
# stay in the state file); never one shown twice.
LISTEN_BATCH = 64


ListenTimeout = Annotated[
    float,
    typer.Option(
        help="Seconds without the broker before saying so once (with --exit-on-disconnect: "
        "before giving up)."
    ),
]
ExitOnDisconnect = Annotated[
    bool,
    typer.Option(
        "--exit-on-disconnect",
        help="Exit 3 when the broker is not reached within --timeout or the connection "
        "drops, instead of waiting for it with backoff.",
    ),
]


def listen(
    cid: Annotated[str | None, typer.Argument(help="Only this conversation.")] = None,
    json_out: JsonOut = False,
    count: Annotated[int | None, typer.Option(help="Exit after this many messages.")] = None,
    duration: Annotated[float | None, typer.Option(help="Exit after this many seconds.")] = None,
    timeout: ListenTimeout = 10.0,
    exit_on_disconnect: ExitOnDisconnect = False,
) -> None:
    """Print messages as they arrive, each at most once across runs, until stopped.

    Without the broker it keeps waiting (reconnecting with backoff) and shows what is
    stored meanwhile; it says so once.
    """
    events: queue.Queue[Event] = queue.Queue()
    shown = 0
    with errors("listen"):
        if (daemon := running_daemon()) is not None:
            remote.listen(
                daemon,
                cid,
                json_out=json_out,
                count=count,
                duration=duration,
                exit_on_disconnect=timeout if exit_on_disconnect else None,
            )
            return
        device = device_for(events.put)
        from fieldchat.device.cli_output import note, render, write  # noqa: PLC0415 - loaded
        from fieldchat.device.events import Disconnected  # noqa: PLC0415

        try:
            if cid is not None and cid not in device.engine.conversations():
                raise ConfigError(f"unknown conversation {cid}")
            cursor = int(device.state.get_meta(_CURSOR) or 0)
            device.start()
            if exit_on_disconnect:
                device.wait_connected(timeout)
            waiting = _BrokerWait(device, timeout)
            end = time.monotonic() + duration if duration is not None else None
            while count is None or shown < count:
                waiting.check()
                # Stored rows past the cursor first: messages that arrived while another
                # command (send, conv …) was running are shown here, once.
                limit = LISTEN_BATCH if count is None else min(LISTEN_BATCH, count - shown)
                rows = device.state.received(cid, after_id=cursor, limit=limit)
                if rows:
                    cursor = rows[-1].id
                    # The cursor passes the rows before they are printed, so no kill
                    # shows one twice (it printed them, then saved: issue 14); a
                    # SIGKILL in between leaves this batch unshown, still stored. A
                    # stop signal waits until the batch is out.
                    # The output is rendered first: between the save and the write
                    # there is then one write call (a kill there is the only way a
                    # row goes unshown; the soak hit it once in 9,600 messages when
                    # rendering a batch came in between).
                    text = render(rows, json_out)
                    with interrupts.deferred():
                        device.state.set_meta({_CURSOR: str(cursor)})
                        write(text)
                    shown += len(rows)
                left = None if end is None else end - time.monotonic()
                if left is not None and left <= 0:
                    break
                if rows:
                    continue  # more may be stored already
                try:
                    event = events.get(timeout=0.5 if left is None else min(left, 0.5))
                except queue.Empty:
                    continue
                if exit_on_disconnect and isinstance(event, Disconnected):
                    raise TransportError(f"the connection to the broker dropped ({event.reason})")
                note(event, json_out)
        finally:
            close(device)


class _BrokerWait:
    """``listen``'s one line while it waits for the broker (the link reconnects with
    backoff by itself), and one when the broker is there after all."""

    def __init__(self, device: Device, after: float) -> None:
        self.device = device
        self.deadline = time.monotonic() + after
        self.said = False

    def check(self) -> None:
        connected = self.device.connected
        if self.said and connected:
            typer.echo("fieldchat device listen: connected to the broker.", err=True)
            self.said = False
        elif not self.said and not connected:
            error = self.device.last_error
            if error is not None or time.monotonic() >= self.deadline:
                why = f" ({error})" if error is not None else ""
                typer.echo(
                    f"fieldchat device listen: waiting for the broker{why}; retrying with "
                    "backoff until it answers (stored messages are shown meanwhile).",
                    err=True,
                )
                self.said = True
                self.deadline = float("inf")  # then once per outage (the link says why)


def chat(cid: str, timeout: Timeout = 10.0) -> None:
    """Interactive chat: type lines to send them; incoming ones are printed.

    Ctrl-D ends it and keeps its place (what it showed is not shown again); Ctrl-C or
    SIGTERM stops it at once, keeping the outbox for the next command.
    """
    with errors("chat"):
        if (daemon := running_daemon()) is not None:
            remote.chat(daemon, cid)
            return
        with opened() as device:
            from fieldchat.device.cli_output import note, print_rows  # noqa: PLC0415 - loaded
            from fieldchat.device.events import MessageReceived  # noqa: PLC0415

            if cid not in device.engine.conversations():
                raise ConfigError(f"unknown conversation {cid}")
            cursor = int(device.state.get_meta(_CURSOR) or 0)

            def on_event(event: Event) -> None:
                nonlocal cursor
                if isinstance(event, MessageReceived) and event.cid == cid and event.id > cursor:
                    print_rows([event], json_out=False)
                    cursor = event.id
                else:
                    note(event, json_out=False)

            rows = device.messages(cid, after_id=cursor)
            print_rows(rows, json_out=False)
            cursor = rows[-1].id if rows else cursor
            device.on_event = on_event
            device.start()
            device.wait_connected(timeout)
            typer.echo(f"-- chatting in {cid} as {device.pid[:8]}; Ctrl-D to quit", err=True)
            for line in sys.stdin:
                if line.strip():
                    device.send(cid, line.rstrip("\n"))
                device.mark_read(cid)
            device.mark_read(cid)
            device.state.set_meta({_CURSOR: str(cursor)})
            finish(device, timeout)

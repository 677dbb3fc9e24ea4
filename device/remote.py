"""The device commands run through a daemon (``fieldchat device run``) that owns the
state file: what ``fieldchat device send|listen|chat|conv …|outbox|verify|whoami``
do when :func:`daemon_for` finds one answering on the state file's control socket.

They print what the standalone commands print (:mod:`fieldchat.device.cli`) and exit
with the same codes (:mod:`fieldchat.schemas.exits`, ``for_kind`` of the daemon's
error kinds), but import only the standard library, typer and
:mod:`~fieldchat.device.control_client`: no engine, cryptography, pydantic or paho. A
command through the daemon returns once the daemon accepted its work (durable in the
outbox); the daemon delivers it.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

import typer

from fieldchat.device.control_client import (
    ControlClient,
    DaemonError,
    DaemonGone,
    NotOurDaemon,
    daemon_of,
    socket_path,
    state_file,
)
from fieldchat.schemas.exits import ExitCode, for_kind

__all__ = [
    "chat",
    "conv_change",
    "conv_create",
    "conv_list",
    "daemon_for",
    "listen",
    "outbox",
    "refusal",
    "send",
    "verify",
    "whoami",
]

DAEMON_RESTART_S = 60.0  # listen waits this long for a daemon that stopped to answer again
_BATCH = 64  # messages taken per call by listen


def daemon_for(state: str | os.PathLike[str] | None, config: Path | None) -> ControlClient | None:
    """A connection to the daemon of the command's state file, or ``None`` (none
    runs: the command runs standalone). ``FIELDCHAT_NO_DAEMON=1`` forces standalone."""
    path = state_file(state, config)
    try:
        return daemon_of(path)
    except OSError as exc:
        line, code = refusal(exc, path)
        typer.echo(line, err=True)
        raise typer.Exit(code) from None


def refusal(exc: OSError, state: Path) -> tuple[str, ExitCode]:
    """What a command says when connecting to the daemon of ``state`` failed with
    ``exc``, and its exit code (also for ``fieldchat._fast``, which connects without
    typer)."""
    sock = socket_path(state)
    if isinstance(exc, NotOurDaemon):
        return f"error: {exc}: not the device daemon; nothing was sent", ExitCode.USAGE
    if isinstance(exc, PermissionError):
        return (
            f"error: the device daemon at {sock} serves only its user: run this command "
            f"as the state file's owner (uid {state.stat().st_uid})",
            ExitCode.USAGE,
        )
    return (
        f"error: cannot reach the device daemon at {sock}: {exc.strerror}",
        ExitCode.UNAVAILABLE,
    )


@contextlib.contextmanager
def _failures(client: ControlClient, *, gone: bool = True) -> Iterator[None]:
    """The daemon's errors as one line and the standalone commands' exit codes
    (``gone``: also for a daemon that went away; else that propagates)."""
    try:
        with client:
            yield
    except DaemonError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(for_kind(exc.kind)) from None
    except (DaemonGone, ConnectionError) as exc:
        if not gone:
            raise DaemonGone(str(exc)) from None
        typer.echo(f"error: the device daemon went away: {exc}", err=True)
        raise typer.Exit(ExitCode.UNAVAILABLE) from None


def whoami(client: ControlClient, *, json_out: bool, pid_only: bool) -> None:
    with _failures(client):
        me = client.call("whoami")
    if pid_only:
        typer.echo(me["pid"])
    elif json_out:
        typer.echo(json.dumps({"pid": me["pid"], "fingerprint": me["fingerprint"]}))
    else:
        typer.echo(f"pid          {me['pid']}\nfingerprint  {me['fingerprint']}")


def verify(client: ControlClient, pid: str, fingerprint: str | None, timeout: float) -> None:
    params: dict[str, Any] = {"pid": pid, "timeout": timeout}
    if fingerprint:
        params["fingerprint"] = fingerprint
    with _failures(client):
        out = client.call("verify", params)
    typer.echo(f"{pid}  {out['fingerprint']}")
    if out["verified"] is False:
        typer.echo("error: FINGERPRINTS DIFFER: do not trust this participant", err=True)
        raise typer.Exit(ExitCode.REFUSED)
    if out["verified"]:
        typer.echo("verified")


def conv_create(client: ControlClient, params: dict[str, Any], *, json_out: bool) -> None:
    with _failures(client):
        cid = client.call("conversation.create", params)["cid"]
    typer.echo(json.dumps({"cid": cid}) if json_out else cid)


def conv_change(client: ControlClient, method: str, params: dict[str, Any]) -> None:
    """``conv invite|remove|leave``: ``conversation.<method>``."""
    with _failures(client):
        client.call(f"conversation.{method}", params)


def conv_list(client: ControlClient, *, json_out: bool) -> None:
    with _failures(client):
        me = client.call("whoami")["pid"]
        infos = client.call("conversations")
    for info in infos:
        if json_out:
            typer.echo(json.dumps(info))
            continue
        state = "member" if info["member"] else "invited" if info["epoch"] < 0 else "left"
        admin = " admin" if me in info["admins"] else ""
        typer.echo(
            f"{info['cid']}  epoch {info['epoch']}  {len(info['members'])} members  {state}{admin}"
        )


def outbox(client: ControlClient, *, json_out: bool) -> None:
    with _failures(client):
        rows = client.call("outbox")
    for row in rows:
        if json_out:
            typer.echo(json.dumps(row))
        else:
            age = time.time() - row["queued_at"]
            typer.echo(
                f"{row['seq']:6d}  {row['what']:7s}  {row['cid'] or '-':26s}  "
                f"{row['bytes']:5d} B  {age:6.0f} s ago"
            )
    if not json_out:
        typer.echo(f"{len(rows)} waiting", err=True)


def send(client: ControlClient, cid: str, text: str | None) -> None:
    """One text, or stdin's lines: what arrived together goes as one batch request."""
    with _failures(client):
        if text is not None and text != "-":
            client.call("send", {"cid": cid, "text": text})
            return
        for batch in _line_batches(sys.stdin):
            client.call_many("send", [{"cid": cid, "text": line} for line in batch])


def _line_batches(stream: TextIO, limit: int = 64) -> Iterator[list[str]]:
    """Non-empty lines of ``stream``: those already readable together, at most ``limit``
    at a time (a pipe's burst is one request; a person's line goes at once)."""
    batch: list[str] = []
    for line in stream:
        if text := line.rstrip("\n"):
            batch.append(text)
        if len(batch) >= limit or not select.select([stream], [], [], 0)[0]:
            if batch:
                yield batch
            batch = []
    if batch:
        yield batch


# -- listen and chat ---------------------------------------------------------------------


def _print_message(message: dict[str, Any], json_out: bool) -> None:
    if json_out:
        line = json.dumps(message)
    else:
        clock = time.strftime("%H:%M:%S", time.localtime(message.get("sent_at") or 0))
        line = f"[{clock}] {str(message['sender'])[:8]}: {message['text']}"
    sys.stdout.write(line + "\n")


def _note(event: dict[str, Any], json_out: bool) -> None:
    """An event that is not a message, as :func:`fieldchat.device.cli_output.note`."""
    kind = event.get("type")
    if kind == "message":
        return
    if json_out:
        sys.stdout.write(json.dumps(event) + "\n")
        sys.stdout.flush()
    elif kind == "key_changed":
        typer.echo(
            f"WARNING: the keys of {event['pid']} CHANGED. Compare fingerprints: "
            f"fieldchat device verify {event['pid']}",
            err=True,
        )
    elif kind == "presence":
        state = "online" if event["online"] else "offline"  # as cli_output.presence_line
        typer.echo(f"-- {str(event['pid'])[:8]} is {state}", err=True)
    elif kind not in ("receipt", "publish_refused"):
        typer.echo(f"-- {kind}: {event}", err=True)


def listen(
    client: ControlClient,
    cid: str | None,
    *,
    json_out: bool,
    count: int | None,
    duration: float | None,
    exit_on_disconnect: float | None = None,
) -> None:
    """Messages past the shared cursor (each shown once across every listen), then as
    they arrive; events as notes. A daemon that restarts (``systemctl restart``) is
    waited for, up to :data:`DAEMON_RESTART_S`; one that does not come back is exit 3.
    ``exit_on_disconnect``: exit 3 when the daemon is not connected to the broker
    within that many seconds, or loses the connection (``listen --exit-on-disconnect``)."""
    shown = [0]
    end = None if duration is None else time.monotonic() + duration
    while True:
        try:
            _listen(
                client,
                cid,
                json_out=json_out,
                count=count,
                end=end,
                shown=shown,
                exit_on_disconnect=exit_on_disconnect,
            )
        except DaemonGone as exc:
            again = _reconnect(client, end)
            if again is None:
                if end is not None and time.monotonic() >= end:
                    return  # the duration ran out meanwhile
                typer.echo(f"error: the device daemon went away: {exc}", err=True)
                raise typer.Exit(ExitCode.UNAVAILABLE) from None
            client = again
        else:
            return


def _reconnect(gone: ControlClient, end: float | None) -> ControlClient | None:
    """The daemon ``gone`` was connected to, once it answers again, or ``None`` after
    :data:`DAEMON_RESTART_S` (or at ``end``)."""
    if gone.path is None:
        return None
    typer.echo("-- the device daemon stopped; waiting for it to come back", err=True)
    give_up = time.monotonic() + DAEMON_RESTART_S
    if end is not None:
        give_up = min(give_up, end)
    while time.monotonic() < give_up:
        time.sleep(0.2)
        try:
            again = ControlClient.connect(gone.path, owner=gone.owner)
        except NotOurDaemon as exc:
            typer.echo(f"error: {exc}: not the device daemon", err=True)
            raise typer.Exit(ExitCode.USAGE) from None
        if again is not None:
            return again
    return None


def _listen(
    client: ControlClient,
    cid: str | None,
    *,
    json_out: bool,
    count: int | None,
    end: float | None,
    shown: list[int],
    exit_on_disconnect: float | None,
) -> None:
    """:func:`listen` on one connection; ``shown[0]`` counts what was printed.

    Raises:
        DaemonGone: the daemon stopped.
    """
    with _failures(client, gone=False):
        client.call("subscribe", {"cids": [cid]} if cid is not None else {})
        if exit_on_disconnect is not None:
            _wait_connected(client, exit_on_disconnect)
        while count is None or shown[0] < count:
            limit = _BATCH if count is None else min(_BATCH, count - shown[0])
            params: dict[str, Any] = {"limit": limit}
            if cid is not None:
                params["cid"] = cid
            rows = client.call("listen.take", params)
            for row in rows:
                _print_message(row, json_out)
            sys.stdout.flush()
            shown[0] += len(rows)
            if rows:
                continue
            while True:  # until a message may be stored, or the time is up
                left = None if end is None else end - time.monotonic()
                if left is not None and left <= 0:
                    return
                event = client.next_event(0.5 if left is None else min(left, 0.5))
                if event is None:
                    continue
                if event.get("type") == "message":
                    break
                if exit_on_disconnect is not None and event.get("type") == "disconnected":
                    reason = event.get("reason", "")
                    typer.echo(f"error: the connection to the broker dropped ({reason})", err=True)
                    raise typer.Exit(ExitCode.UNAVAILABLE)
                _note(event, json_out)


def _wait_connected(client: ControlClient, timeout: float) -> None:
    """Exit 3 unless the daemon is connected to the broker within ``timeout`` s (its
    ``connected`` notification, or its status, polled as the notification may have
    gone before we subscribed)."""
    give_up = time.monotonic() + timeout
    while not client.call("status")["connected"]:
        left = give_up - time.monotonic()
        if left <= 0:
            typer.echo(
                f"error: the device daemon is not connected to the broker ({timeout:g} s)",
                err=True,
            )
            raise typer.Exit(ExitCode.UNAVAILABLE)
        event = client.next_event(min(left, 0.5))
        if event is not None and event.get("type") == "connected":
            return


def chat(client: ControlClient, cid: str) -> None:
    """Type lines to send them; messages of ``cid`` are printed as they arrive."""
    with _failures(client):
        me = client.call("whoami")["pid"]
        client.call("subscribe", {"cids": [cid]})
        cursor = int(client.call("listen.cursor")["cursor"])
        for row in client.call("messages", {"cid": cid, "after_id": cursor}):
            _print_message(row, json_out=False)
            cursor = row["id"]
        sys.stdout.flush()
        typer.echo(f"-- chatting in {cid} as {me[:8]}; Ctrl-D to quit", err=True)
        while True:
            if not client.pending:
                ready = select.select([sys.stdin, client], [], [])[0]
                if sys.stdin in ready:
                    line = sys.stdin.readline()
                    if not line:
                        break
                    if line.strip():
                        client.call("send", {"cid": cid, "text": line.rstrip("\n")})
                    client.call("mark_read", {"cid": cid})
                    continue
            event = client.next_event(0)
            if event is None:
                continue
            if event.get("type") == "message" and event.get("cid") == cid and event["id"] > cursor:
                _print_message(event, json_out=False)
                sys.stdout.flush()
                cursor = event["id"]
            else:
                _note(event, json_out=False)
        client.call("mark_read", {"cid": cid})

"""``fieldchat device init``, ``whoami`` and ``verify``: this device's identity and
the fingerprints of others."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from fieldchat._command import command_name
from fieldchat.device import remote
from fieldchat.device.cli_common import (
    JsonOut,
    Timeout,
    close,
    connected,
    errors,
    finish,
    opened,
    options,
    running_daemon,
)

__all__ = ["init", "verify", "whoami"]


def init(
    post_quantum: Annotated[
        bool, typer.Option("--pq/--no-pq", help="Give the identity an ML-KEM-768 key.")
    ] = True,
    json_out: JsonOut = False,
) -> None:
    """Create this device's identity (once) and save the broker URL and credential."""
    with errors():
        settings = options.load()
        from fieldchat.device.client import Device  # noqa: PLC0415 - loaded by options.load
        from fieldchat.device.history import gateway_base  # noqa: PLC0415
        from fieldchat.device.state import DeviceState  # noqa: PLC0415

        state = DeviceState(settings.state)
        try:
            saved: dict[str, str | None] = {}
            if settings.broker:
                settings.broker_options(None, None)  # validate the URL
                saved["broker"] = settings.broker
                saved["protocol"] = None  # a level remembered for the old broker goes
            if settings.credential:
                saved["credential"] = settings.credential.get_secret_value()
            if settings.gateway:
                saved["gateway"] = gateway_base(settings.gateway)
            if saved:
                state.set_meta(saved)
            existed = state.load("identity") is not None
            device = Device(state, prefix=settings.prefix, post_quantum=post_quantum)
            pid, fingerprint = device.pid, device.fingerprint()
            close(device)
        except BaseException:
            state.close()
            raise
        registered = False
        if settings.credential or (settings.broker and _saved_credential(settings.state)):
            # Connect once: publish our bundle (retained) and open the persistent session
            # on our inbox, so others can invite us while we are away.
            saved_only = (
                "the identity and settings are saved; the bundle is published by the "
                "next command that connects"
            )
            with connected(10.0, unchanged=saved_only) as online:
                finish(online, 10.0)
            registered = True
    if json_out:
        typer.echo(
            json.dumps(
                {
                    "pid": pid,
                    "fingerprint": fingerprint,
                    "new": not existed,
                    "state": str(settings.state),
                    "registered": registered,
                }
            )
        )
        return
    typer.echo(f"pid          {pid}")
    typer.echo(f"fingerprint  {fingerprint}")
    typer.echo(f"state        {settings.state}")
    if registered:
        typer.echo("registered   bundle published; invitations wait for this device")
    if not existed and not settings.credential:
        fc = command_name()
        typer.echo(
            f"next: on the broker run `{fc} broker enroll {pid}`, then "
            f"`{fc} device --credential … init` to save the credential"
        )


def whoami(
    json_out: JsonOut = False,
    pid_only: Annotated[
        bool, typer.Option("--pid", help="Print only the pid (for scripts and enrollment).")
    ] = False,
) -> None:
    """Print this device's pid and fingerprint."""
    with errors():
        if (daemon := running_daemon()) is not None:
            remote.whoami(daemon, json_out=json_out, pid_only=pid_only)
            return
        with opened() as device:
            pid, fingerprint = device.pid, device.fingerprint()
    if pid_only:
        typer.echo(pid)
    elif json_out:
        typer.echo(json.dumps({"pid": pid, "fingerprint": fingerprint}))
    else:
        typer.echo(f"pid          {pid}\nfingerprint  {fingerprint}")


def verify(
    pid: str,
    fingerprint: Annotated[
        str | None,
        typer.Argument(help="The fingerprint read out by its owner; omit to just show it."),
    ] = None,
    timeout: Timeout = 10.0,
) -> None:
    """Show PID's fingerprint, or compare it with one read out of band."""
    with errors():
        if (daemon := running_daemon()) is not None:
            remote.verify(daemon, pid, fingerprint, timeout)
            return
        with opened() as device:
            if device.engine.bundle_of(pid) is None:
                device.start()
                device.wait_connected(timeout)
                device.fetch_bundles([pid], timeout)
            known = device.fingerprint(pid)
            ok = device.verify(pid, fingerprint) if fingerprint else None
    typer.echo(f"{pid}  {known}")
    if ok is False:
        typer.echo("error: FINGERPRINTS DIFFER: do not trust this participant", err=True)
        raise typer.Exit(1)
    if ok:
        typer.echo("verified")


def _saved_credential(path: Path) -> bool:
    from fieldchat.device.state import DeviceState  # noqa: PLC0415 - the stack is loaded

    state = DeviceState(path)
    try:
        return state.get_meta("credential") is not None
    finally:
        state.close()

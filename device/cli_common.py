"""What every ``fieldchat device …`` command shares: the group's settings, importing the
device stack on first use, opening the device (standalone) or finding the daemon, and
turning failures and stop signals into one line and an exit code
(:mod:`fieldchat.schemas.exits`). Like the commands, it imports typer and the standard
library only; the device stack comes with :func:`load_stack`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from fieldchat._command import command_name
from fieldchat.device import remote
from fieldchat.schemas.errors import ConfigError, FieldchatError, TransportError
from fieldchat.schemas.exits import ExitCode, epilog
from fieldchat.schemas.signals import Interrupts

if TYPE_CHECKING:
    from fieldchat.device.client import Device
    from fieldchat.device.config import DeviceSettings
    from fieldchat.device.control_client import ControlClient
    from fieldchat.device.state import DeviceState

__all__ = [
    "INTERRUPTED",
    "LOCAL",
    "NOT_YET",
    "OK",
    "ONLINE",
    "REFUSED",
    "SERVICE",
    "UNAVAILABLE",
    "USAGE",
    "JsonOut",
    "Options",
    "Timeout",
    "close",
    "connected",
    "device_for",
    "errors",
    "failures",
    "finish",
    "interrupts",
    "load_stack",
    "open_existing",
    "opened",
    "options",
    "running_daemon",
]

JsonOut = Annotated[bool, typer.Option("--json", help="Machine-readable output (JSON lines).")]
Timeout = Annotated[float, typer.Option(help="Seconds to wait for the broker.")]
OK, REFUSED, USAGE, UNAVAILABLE, NOT_YET, INTERRUPTED = tuple(ExitCode)
# What each kind of command can return (its --help ends with them).
LOCAL = epilog(OK, REFUSED, USAGE, INTERRUPTED)  # no network
ONLINE = epilog(OK, REFUSED, USAGE, UNAVAILABLE, INTERRUPTED)
SERVICE = epilog(OK, REFUSED, USAGE, UNAVAILABLE)  # a stop signal is a clean stop: 0
# SIGINT and SIGTERM raise KeyboardInterrupt while a command runs (process state, as
# logging is); a second one while stopping forces the exit.
interrupts = Interrupts()


@dataclass
class Options:
    """The group's settings as the ``device`` callback parsed them, loaded once."""

    config: Path | None = None
    flags: dict[str, object] | None = None
    settings: DeviceSettings | None = None

    def load(self) -> DeviceSettings:
        load_stack()
        from fieldchat.device.config import DeviceSettings  # noqa: PLC0415 - loaded above

        if self.settings is None:
            self.settings = DeviceSettings.load(self.config, **(self.flags or {}))
        return self.settings


options = Options()


_loaded = False


def load_stack() -> None:
    """Import the device stack (pydantic, cryptography, paho) and turn tracing on
    (docs/tracing.md; queued spans leave at exit, bounded, 3 s). A stop signal during
    the imports is held until they are done (one raised inside an import can come out
    as another error), then raised: the command says it was interrupted.

    Raises:
        ConfigError: tracing asked for in the environment but impossible.
    """
    global _loaded  # noqa: PLW0603 - once per process, like the imports themselves
    if _loaded:
        return
    with interrupts.deferred():
        import fieldchat.device.cli_output  # noqa: PLC0415
        import fieldchat.device.client  # noqa: PLC0415
        import fieldchat.device.config  # noqa: PLC0415
        import fieldchat.device.history  # noqa: PLC0415, F401
        from fieldchat.schemas import tracing  # noqa: PLC0415

        _loaded = True
        tracing.configure(tracing.TraceSettings.from_environ(os.environ))


@contextlib.contextmanager
def failures() -> Iterator[None]:
    """One line per failure a user can cause, and an exit code by kind."""
    try:
        yield
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(USAGE) from None
    except TransportError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(UNAVAILABLE) from None
    except FieldchatError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(REFUSED) from None


@contextlib.contextmanager
def errors(service: str | None = None) -> Iterator[None]:
    """A command's body: :func:`failures`, and SIGINT or SIGTERM raise
    KeyboardInterrupt inside (the ``finally`` blocks close the device; an error a
    library made of it is recognised, :meth:`Interrupts.unwrapped`). A ``service``
    (listen, chat) stopped that way ends normally: one line, status 0; a one-shot
    command says it was interrupted (status 130: what it did may be partial).
    """
    try:
        with interrupts.installed(), failures(), interrupts.unwrapped(typer.Exit):
            yield
    except KeyboardInterrupt:
        if service is not None:
            typer.echo(f"fieldchat device {service} stopped.", err=True)
            raise typer.Exit(0) from None
        typer.echo("fieldchat device: interrupted before it finished.", err=True)
        raise typer.Exit(INTERRUPTED) from None


def close(device: Device) -> None:
    """Close the device (park its reserved steps, save, disconnect) in one piece: a
    first stop signal during it is held until it is done."""
    with interrupts.deferred():
        device.close()


def open_existing(path: Path) -> DeviceState:
    """The state file at ``path``, which must hold an identity: only ``init`` creates
    one (``whoami`` used to make a new identity in the default data directory).

    Raises:
        ConfigError: no state file there, or one without an identity.
    """
    from fieldchat.device.state import DeviceState  # noqa: PLC0415 - the stack is loaded

    hint = f"create one with `{command_name()} device --state {path} init`"
    if not path.expanduser().is_file():
        raise ConfigError(f"no state file {path} (no identity yet): {hint}")
    state = DeviceState(path)
    if state.load("identity") is None:
        state.close()
        raise ConfigError(f"state file {path} holds no identity yet: {hint}")
    return state


def running_daemon() -> ControlClient | None:
    """The daemon serving this state file (``fieldchat device run``), or ``None``: the
    command then runs standalone (docs/device.md, Daemon and control socket)."""
    state = (options.flags or {}).get("state")
    return remote.daemon_for(state if isinstance(state, Path) else None, options.config)


def device_for(on_event: object = None) -> Device:
    from fieldchat.device.client import Device  # noqa: PLC0415 - loaded by options.load
    from fieldchat.device.history import GatewayHistory  # noqa: PLC0415

    settings = options.load()
    state = open_existing(settings.state)
    try:
        broker = settings.broker_options(state.get_meta("broker"), state.get_meta("credential"))
        device = Device(
            state,
            broker,
            link=settings.link_options(),
            prefix=settings.prefix,
            on_event=on_event,  # type: ignore[arg-type]
            power_safe=settings.power_safe,
        )
    except BaseException:
        state.close()
        raise
    gateway = settings.gateway or state.get_meta("gateway")
    if gateway:
        try:
            device.history = GatewayHistory(gateway, device.engine.identity)
        except BaseException:
            close(device)
            raise
    return device


@contextlib.contextmanager
def opened() -> Iterator[Device]:
    """The device standalone and not connected (yet), closed in one piece afterwards,
    also when the block fails."""
    device = device_for()
    try:
        yield device
    finally:
        close(device)


@contextlib.contextmanager
def connected(
    timeout: float, on_event: object = None, *, unchanged: str = "nothing was changed"
) -> Iterator[Device]:
    """The device, connected; a failure to connect says what it left as it was."""
    device = device_for(on_event)
    try:
        device.start()
        try:
            device.wait_connected(timeout)
        except TransportError as exc:
            raise type(exc)(f"{exc}; {unchanged}") from None
        yield device
    finally:
        close(device)


def finish(device: Device, timeout: float) -> None:
    """Wait until the broker has everything we queued; what is left is kept in the
    outbox, which is not a failure (exit 0): it leaves with the next command that
    connects, and running this one again would do the change twice."""
    if not device.wait_drained(timeout):
        waiting = len(device.outbox())
        typer.echo(
            f"fieldchat device: {waiting} publication(s) kept in the outbox after "
            f"{timeout:g} s, will be sent when the broker takes them (by the next "
            "device command that connects)",
            err=True,
        )

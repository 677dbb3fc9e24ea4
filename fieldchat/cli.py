"""``fieldchat``: the root command. Each package contributes a sub-app; this only composes.

The sub-apps are imported when their command runs, not before: a device command
imports the device and nothing of the broker's or the gateway's stacks (which a
device's ``pip install fieldchat`` does not install), and ``fieldchat --help`` imports
none of them.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NamedTuple, NoReturn

import typer
from typer.core import TyperCommand, TyperGroup

from fieldchat._startup import import_held, stop_came, stopped_before_start

if TYPE_CHECKING:
    from fieldchat.stack import StackOptions


class _SubApp(NamedTuple):
    """A package's sub-app, imported on use; ``extra`` installs what it needs."""

    target: str  # "module:attribute" of the typer app
    help: str
    extra: str | None


_SUB_APPS = {
    "broker": _SubApp(
        "fieldchat.broker.cli:broker_app",
        "The embedded MQTT broker: run it, enroll participants, write Mosquitto config.",
        "broker",
    ),
    "device": _SubApp(
        "fieldchat.device.cli:device_app",
        "A fieldchat participant: identity, conversations, sending and listening.",
        None,
    ),
    "gateway": _SubApp(
        "fieldchat.gateway._cli:gateway_app",
        "The gateway: encrypted history archive, history API, accounts, WebSocket bridge.",
        "gateway",
    ),
}

# What each extra installs, to tell a missing extra from a broken install.
_EXTRA_MODULES = {
    "broker": {"amqtt", "argon2", "prometheus_client"},
    "gateway": {"fastapi", "uvicorn", "sqlalchemy", "asyncpg", "argon2"}
    | {"prometheus_client", "starlette", "websockets", "httptools", "uvloop"},
}
_EXTRA_MODULES["server"] = _EXTRA_MODULES["broker"] | _EXTRA_MODULES["gateway"]


# The missing-extra command takes whatever the real one would have, to say its line.
_ANY_ARGS = {"ignore_unknown_options": True, "allow_extra_args": True, "help_option_names": []}


def _needs_extra(command: str, extra: str, exc: ModuleNotFoundError) -> NoReturn:
    """One line naming the extra that installs what ``command`` lacks; status 1."""
    typer.echo(
        f"error: 'fieldchat {command}' needs {exc.name}, which this install lacks: "
        f"pip install 'fieldchat[{extra}]'",
        err=True,
    )
    raise typer.Exit(1)


def _missing_extra(name: str, extra: str, exc: ModuleNotFoundError) -> TyperCommand:
    """A command that says which extra to install, instead of a traceback."""
    return TyperCommand(
        name,
        callback=lambda: _needs_extra(name, extra, exc),
        help=_SUB_APPS[name].help,
        context_settings=_ANY_ARGS,
    )


# click's types are typer's private vendored copy: Any where they appear.
def _load(name: str, sub: _SubApp) -> Any:  # noqa: ANN401
    module, _, attribute = sub.target.partition(":")
    try:
        sub_app = getattr(importlib.import_module(module), attribute)
    except ModuleNotFoundError as exc:
        if sub.extra is None or exc.name not in _EXTRA_MODULES[sub.extra]:
            raise
        return _missing_extra(name, sub.extra, exc)
    command = typer.main.get_command(sub_app)
    command.name = name
    return command


class _Lazy(TyperCommand):
    """Stands for a sub-app in listings (name and help only); parsing its arguments
    imports the real one, which then runs."""

    def __init__(self, name: str, sub: _SubApp) -> None:
        super().__init__(name, help=sub.help, short_help=sub.help)
        self.sub = sub

    def make_context(
        self,
        info_name: str | None,
        args: list[str],
        parent: Any = None,  # noqa: ANN401
        **extra: Any,  # noqa: ANN401 - click's own keyword arguments
    ) -> Any:  # noqa: ANN401
        # Importing the sub-app, then parsing (typer imports its converters, pydantic,
        # when it parses): with the stop signals held.
        real = import_held(self.load)
        return import_held(lambda: real.make_context(info_name, args, parent=parent, **extra))

    def load(self) -> Any:  # noqa: ANN401 - click's command, typer's private copy
        """The real sub-app (imported now)."""
        return _load(self.name or "", self.sub)


class _Root(TyperGroup):
    """The root command: a stop signal that reaches it (one before a command took the
    signals over: while typer parses the command line) is one line, not typer's
    silent 130: status 0 for a service, 130 for a one-shot command, as once they run
    (:func:`fieldchat._startup.stopped_before_start`)."""

    def list_commands(self, ctx: Any) -> list[str]:  # noqa: ANN401
        return sorted([*super().list_commands(ctx), *_SUB_APPS])

    def make_context(
        self,
        info_name: str | None,
        args: list[str],
        parent: Any = None,  # noqa: ANN401
        **extra: Any,  # noqa: ANN401 - click's own keyword arguments
    ) -> Any:  # noqa: ANN401
        """Parse with the stop signals held: typer imports its converters (pydantic)
        while parsing, and a signal then would end in typer's silent status 130."""
        parse = super().make_context
        return import_held(lambda: parse(info_name, args, parent=parent, **extra))

    def get_command(self, ctx: Any, cmd_name: str) -> Any:  # noqa: ANN401
        sub = _SUB_APPS.get(cmd_name)
        return _Lazy(cmd_name, sub) if sub else super().get_command(ctx, cmd_name)

    # ctx: click's Context, which typer vendors under a private module name.
    def invoke(self, ctx: Any) -> Any:  # noqa: ANN401
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            stopped_before_start()
        except typer.Exit:
            raise
        except Exception:
            if not stop_came():
                raise
            stopped_before_start()  # a stop a library turned into another error


app = typer.Typer(
    name="fieldchat",
    cls=_Root,
    help="End-to-end encrypted chat over MQTT for devices, field technicians and web users.",
    no_args_is_help=True,
    add_completion=False,
)


@app.callback()
def _root() -> None:
    """End-to-end encrypted chat over MQTT."""


DataDir = Annotated[Path, typer.Option(envvar="FIELDCHAT_DATA", help="Folder for all state.")]
Host = Annotated[str, typer.Option(envvar="FIELDCHAT_HOST", help="Address to listen on.")]
MqttPort = Annotated[
    int, typer.Option(envvar="FIELDCHAT_MQTT_PORT", help="MQTT port (0: any free one).")
]
HttpPort = Annotated[
    int, typer.Option(envvar="FIELDCHAT_HTTP_PORT", help="Web port (0: any free one).")
]


def _serve(main: Coroutine[Any, Any, None], stopped: str) -> None:
    """Run a stack until SIGINT or SIGTERM, the same clean stop: the gateway and the
    broker close, ``stopped`` is printed, status 0. A FieldchatError is one line and
    status 1."""
    import asyncio  # noqa: PLC0415 - the device commands' cold start does without these

    from fieldchat.schemas import tracing  # noqa: PLC0415
    from fieldchat.schemas.errors import FieldchatError  # noqa: PLC0415
    from fieldchat.schemas.signals import until_stopped  # noqa: PLC0415

    try:
        tracing.configure(tracing.TraceSettings.from_environ(os.environ))  # docs/tracing.md
        asyncio.run(until_stopped(main))
    except KeyboardInterrupt:  # a signal before until_stopped took them over
        pass
    except FieldchatError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    finally:
        tracing.shutdown()
    typer.echo(stopped)


@app.command()
def up(
    data_dir: DataDir = Path("fieldchat-data"),
    host: Host = "127.0.0.1",
    mqtt_port: MqttPort = 1883,
    http_port: HttpPort = 8080,
) -> None:
    """Run the embedded broker and the gateway (SQLite) until Ctrl-C or SIGTERM."""
    stack = _import_server("up", "fieldchat.stack")
    options = _options(stack, data_dir, host, mqtt_port, http_port)
    _serve(
        stack.run_stack(options, typer.echo), "fieldchat stopped: gateway and broker state saved."
    )


@app.command()
def demo(
    data_dir: Annotated[
        Path,
        typer.Option(
            envvar="FIELDCHAT_DEMO_DATA",
            help="Folder for the demo's state: its own, never one `up` uses.",
        ),
    ] = Path("fieldchat-demo"),
    host: Host = "127.0.0.1",
    mqtt_port: MqttPort = 1883,
    http_port: HttpPort = 8080,
    local: Annotated[
        bool, typer.Option("--local", help="No network: walk through the protocol in-process.")
    ] = False,
    pause: Annotated[float, typer.Option(help="With --local: seconds between messages.")] = 0.0,
) -> None:
    """The stack plus two devices chatting; web users who register are invited at once."""
    if local:
        from fieldchat.device.demo import run_local_demo  # noqa: PLC0415 - device only

        run_local_demo(typer.echo, pause=pause)
        return
    stack = _import_server("demo", "fieldchat.stack")
    demos = _import_server("demo", "fieldchat.demo")
    options = _options(stack, data_dir, host, mqtt_port, http_port)
    _serve(demos.run_demo(options, typer.echo), "fieldchat demo stopped.")


def _import_server(command: str, module: str) -> Any:  # noqa: ANN401 - a module
    """Import a module of the server stack, or say which extra installs it."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name not in _EXTRA_MODULES["server"]:
            raise
        _needs_extra(command, "server", exc)


def _options(
    stack: Any,  # noqa: ANN401 - the fieldchat.stack module
    data_dir: Path,
    host: str,
    mqtt_port: int,
    http_port: int,
) -> StackOptions:
    options: StackOptions = stack.StackOptions(
        data_dir=data_dir, host=host, mqtt_port=mqtt_port, http_port=http_port
    )
    return options

"""``fieldchat``: the root command. Each package contributes a sub-app; this only composes."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Coroutine
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from broker.cli import broker_app
from device.cli import device_app
from device.demo import run_local_demo
from fieldchat.demo import run_demo
from fieldchat.stack import StackOptions, run_stack
from gateway._cli import gateway_app
from schemas import tracing
from schemas.errors import FieldchatError
from schemas.signals import until_stopped


class _Root(TyperGroup):
    """The root command: a stop signal that reaches it (one before a command took the
    signals over: while typer parses the command line) is a clean stop, one line and
    status 0, not typer's silent 130. Long-running commands stop the same way
    themselves; device one-shots say they were interrupted (status 130)."""

    # ctx: click's Context, which typer vendors under a private module name.
    def invoke(self, ctx: Any) -> Any:  # noqa: ANN401
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            typer.echo("fieldchat stopped.", err=True)
            raise typer.Exit(0) from None


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
    options = StackOptions(data_dir=data_dir, host=host, mqtt_port=mqtt_port, http_port=http_port)
    _serve(run_stack(options, typer.echo), "fieldchat stopped: gateway and broker state saved.")


@app.command()
def demo(
    data_dir: DataDir = Path("fieldchat-data"),
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
        run_local_demo(typer.echo, pause=pause)
        return
    options = StackOptions(data_dir=data_dir, host=host, mqtt_port=mqtt_port, http_port=http_port)
    _serve(run_demo(options, typer.echo), "fieldchat demo stopped.")


app.add_typer(broker_app, name="broker")
app.add_typer(device_app, name="device")
app.add_typer(gateway_app, name="gateway")

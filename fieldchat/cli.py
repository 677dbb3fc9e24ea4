"""``fieldchat``: the root command. Each package contributes a sub-app; this only composes."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated

import typer

from broker.cli import broker_app
from device.cli import device_app
from device.demo import run_local_demo
from fieldchat.stack import StackOptions, run_stack
from gateway._cli import gateway_app
from schemas.errors import FieldchatError

app = typer.Typer(
    name="fieldchat",
    help="End-to-end encrypted chat over MQTT for devices, field technicians and web users.",
    no_args_is_help=True,
    add_completion=False,
)


@app.callback()
def _root() -> None:
    """End-to-end encrypted chat over MQTT."""


@app.command()
def up(
    data_dir: Annotated[
        Path, typer.Option(envvar="FIELDCHAT_DATA", help="Folder for all state.")
    ] = Path("fieldchat-data"),
    host: Annotated[str, typer.Option(envvar="FIELDCHAT_HOST", help="Address to listen on.")] = (
        "127.0.0.1"
    ),
    mqtt_port: Annotated[
        int, typer.Option(envvar="FIELDCHAT_MQTT_PORT", help="MQTT port (0: any free one).")
    ] = 1883,
    http_port: Annotated[
        int, typer.Option(envvar="FIELDCHAT_HTTP_PORT", help="Web port (0: any free one).")
    ] = 8080,
) -> None:
    """Run the embedded broker and the gateway (SQLite) until Ctrl-C."""
    options = StackOptions(data_dir=data_dir, host=host, mqtt_port=mqtt_port, http_port=http_port)
    try:
        asyncio.run(run_stack(options, typer.echo))
    except KeyboardInterrupt:
        typer.echo("fieldchat stopped.")
    except FieldchatError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None


@app.command()
def demo(
    pause: Annotated[float, typer.Option(help="Seconds to wait between messages.")] = 0.0,
) -> None:
    """Walk through the protocol locally: three participants, no network, bytes shown."""
    run_local_demo(typer.echo, pause=pause)


app.add_typer(broker_app, name="broker")
app.add_typer(device_app, name="device")
app.add_typer(gateway_app, name="gateway")

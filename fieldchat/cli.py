"""``fieldchat``: the root command. Each package contributes a sub-app; this only composes."""

from __future__ import annotations

from typing import Annotated

import typer

from broker.cli import broker_app
from device.cli import device_app
from device.demo import run_local_demo
from gateway._cli import gateway_app

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
def demo(
    pause: Annotated[float, typer.Option(help="Seconds to wait between messages.")] = 0.0,
) -> None:
    """Walk through the protocol locally: three participants, no network, bytes shown."""
    run_local_demo(typer.echo, pause=pause)


app.add_typer(broker_app, name="broker")
app.add_typer(device_app, name="device")
app.add_typer(gateway_app, name="gateway")

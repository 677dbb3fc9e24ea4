"""``fieldchat device …``: the participant CLI. It parses options, builds settings and
calls :class:`device.client.Device`; every :class:`~schemas.FieldchatError` becomes
one line on stderr and an exit code from the one table, :mod:`fieldchat.schemas.exits`
(docs/device.md, "Exit codes"). SIGINT and SIGTERM are the same stop
(:mod:`fieldchat.schemas.signals`): the device closes (parks its reserved steps, saves
its state, disconnects); ``listen`` and ``chat`` then say they stopped and exit 0, a
one-shot command says it was interrupted and exits 130.

Cold start: importing this module loads typer and the standard library only (no
pydantic, cryptography, paho or asyncio), so ``--help`` costs about as much as
importing paho. A command imports the device stack when it opens a state file
(:func:`~fieldchat.device.cli_common.load_stack`), with a stop signal held meanwhile.

This module is the command table: the group's options, and which command (each in
the module of its job: ``cli_identity``, ``cli_conv``, ``cli_send``, ``cli_listen``)
answers which name with which exit codes, in the order ``--help`` lists them.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

from fieldchat.device.cli_common import (
    INTERRUPTED,
    LOCAL,
    NOT_YET,
    OK,
    ONLINE,
    REFUSED,
    SERVICE,
    UNAVAILABLE,
    USAGE,
    device_for,
    failures,
    options,
)
from fieldchat.device.cli_conv import conv_create, conv_invite, conv_leave, conv_list, conv_remove
from fieldchat.device.cli_identity import init, verify, whoami
from fieldchat.device.cli_listen import chat, listen
from fieldchat.device.cli_send import outbox, send
from fieldchat.schemas.exits import epilog

__all__ = ["device_app"]

device_app = typer.Typer(
    name="device",
    help="A fieldchat participant: identity, conversations, sending and listening.",
    no_args_is_help=True,
)
conv_app = typer.Typer(help="Create, change and list conversations.", no_args_is_help=True)
device_app.add_typer(conv_app, name="conv")


@device_app.callback()
def _device(
    state: Annotated[
        Path | None,
        typer.Option(envvar="FIELDCHAT_STATE", help="State file (identity, keys, outbox)."),
    ] = None,
    broker: Annotated[
        str | None,
        typer.Option(
            envvar="FIELDCHAT_BROKER",
            help="mqtt://host:port or mqtts://host:port; several, comma-separated, for the "
            "nodes of a cluster (tried in turn when one cannot be reached).",
        ),
    ] = None,
    credential: Annotated[
        str | None,
        typer.Option(
            envvar="FIELDCHAT_CREDENTIAL",
            help="From `fieldchat broker enroll PID`.",
            show_default=False,
        ),
    ] = None,
    gateway: Annotated[
        str | None,
        typer.Option(
            envvar="FIELDCHAT_GATEWAY",
            help="http(s)://host:port of the gateway, for history (what was sent while away).",
        ),
    ] = None,
    config: Annotated[
        Path | None, typer.Option(envvar="FIELDCHAT_CONFIG", help="TOML file with these settings.")
    ] = None,
    prefix: Annotated[
        str | None, typer.Option(envvar="FIELDCHAT_PREFIX", help="Topic prefix (default fc/v1).")
    ] = None,
    protocol: Annotated[
        str | None, typer.Option(envvar="FIELDCHAT_PROTOCOL", help="auto, 5 or 3.1.1.")
    ] = None,
    ca_file: Annotated[
        Path | None, typer.Option(envvar="FIELDCHAT_CA_FILE", help="CA certificate for TLS.")
    ] = None,
    cert_file: Annotated[
        Path | None, typer.Option(envvar="FIELDCHAT_CERT_FILE", help="Client certificate for TLS.")
    ] = None,
    key_file: Annotated[
        Path | None, typer.Option(envvar="FIELDCHAT_KEY_FILE", help="Client key for TLS.")
    ] = None,
    low_bandwidth: Annotated[
        bool | None,
        typer.Option(
            "--low-bandwidth/--normal-bandwidth",
            envvar="FIELDCHAT_LOW_BANDWIDTH",
            help="Tune the link for slow links (rare pings, batched receipts).",
        ),
    ] = None,
    power_safe: Annotated[
        bool | None,
        typer.Option(
            "--power-safe/--crash-safe",
            envvar="FIELDCHAT_POWER_SAFE",
            help="send returns once a power cut cannot lose the message (an fsync each).",
        ),
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log the link.")] = False,
) -> None:
    """A fieldchat participant. Settings: flags, FIELDCHAT_* variables, a TOML file."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        stream=sys.stderr,
        format="%(levelname)s %(message)s",
    )
    options.config = config
    options.settings = None
    options.flags = {
        "state": state,
        "broker": broker,
        "credential": credential,
        "gateway": gateway,
        "prefix": prefix,
        "protocol": protocol,
        "ca_file": ca_file,
        "cert_file": cert_file,
        "key_file": key_file,
        "low_bandwidth": low_bandwidth,
        "power_safe": power_safe,
    }


# -- the daemon --------------------------------------------------------------------------


def run(
    tcp: Annotated[
        str | None,
        typer.Option(
            help="Also serve the control socket on loopback TCP HOST:PORT (127.0.0.1:PORT; "
            "clients present the token the daemon writes to STATE.token).",
        ),
    ] = None,
) -> None:
    """Run the device as a service: it owns the state file, stays connected, and serves
    a JSON-RPC control socket (STATE.sock) that the other device commands then use.
    SIGTERM or Ctrl-C stops it cleanly."""
    from fieldchat.device import daemon  # noqa: PLC0415 - only this command serves

    with failures():
        daemon.run(device_for, tcp=tcp)


# -- the command table (the order of --help) ---------------------------------------------

device_app.command(epilog=ONLINE)(init)
device_app.command(epilog=LOCAL)(whoami)
device_app.command(epilog=ONLINE)(verify)
device_app.command(epilog=epilog(OK, REFUSED, USAGE, UNAVAILABLE, NOT_YET, INTERRUPTED))(send)
device_app.command(epilog=SERVICE)(listen)
device_app.command(epilog=SERVICE)(chat)
device_app.command(epilog=LOCAL)(outbox)
device_app.command()(run)
conv_app.command("create", epilog=ONLINE)(conv_create)
conv_app.command("invite", epilog=ONLINE)(conv_invite)
conv_app.command("remove", epilog=ONLINE)(conv_remove)
conv_app.command("leave", epilog=ONLINE)(conv_leave)
conv_app.command("list", epilog=LOCAL)(conv_list)

"""``fieldchat gateway …``: declares options, builds settings, calls one library function."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Annotated

import typer

from fieldchat.gateway._accounts import MAX_PASSWORD, MIN_PASSWORD
from fieldchat.gateway._archiver import mqtt_tls
from fieldchat.gateway._run import bootstrap_admin, migrate, serve
from fieldchat.gateway._settings import GatewaySettings, load_settings
from fieldchat.schemas.errors import FieldchatError

__all__ = ["gateway_app"]

gateway_app = typer.Typer(
    help="The gateway: encrypted history archive, history API, accounts, WebSocket bridge.",
    no_args_is_help=True,
)

ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config", envvar="FIELDCHAT_GATEWAY_CONFIG", help="TOML file with gateway settings."
    ),
]
DbOpt = Annotated[
    str | None,
    typer.Option(
        "--database-url", help="sqlite:///path.db (default) or postgresql://user@host/db."
    ),
]


def _settings(config: Path | None, **flags: object) -> GatewaySettings:
    try:
        return load_settings(config, **flags)
    except FieldchatError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


@gateway_app.command()
def run(
    config: ConfigOpt = None,
    host: Annotated[str | None, typer.Option(help="Listen address.")] = None,
    port: Annotated[int | None, typer.Option(help="Listen port.")] = None,
    database_url: DbOpt = None,
    mqtt_url: Annotated[str | None, typer.Option(help="mqtt://host:port of the broker.")] = None,
    mqtt_username: Annotated[str | None, typer.Option(help="Broker user (gateway role).")] = None,
    mqtt_client_id: Annotated[
        str | None, typer.Option(help="MQTT client id: unique per gateway, stable across restarts.")
    ] = None,
    topic_prefix: Annotated[str | None, typer.Option(help="Topic prefix (fc/v1).")] = None,
    share_group: Annotated[
        str | None,
        typer.Option(help="Share envelope archiving with other gateways ($share/GROUP/…)."),
    ] = None,
    tls_certfile: Annotated[Path | None, typer.Option(help="TLS certificate (PEM).")] = None,
    tls_keyfile: Annotated[Path | None, typer.Option(help="TLS private key (PEM).")] = None,
    mqtt_ca_file: Annotated[
        Path | None, typer.Option(help="CA (PEM) of the broker's TLS certificate, for mqtts://.")
    ] = None,
) -> None:
    """Serve the gateway. The broker password comes from FIELDCHAT_GATEWAY_MQTT_PASSWORD
    or the TOML file, never from a flag (flags show in process lists)."""
    settings = _settings(
        config,
        host=host,
        port=port,
        database_url=database_url,
        mqtt_url=mqtt_url,
        mqtt_username=mqtt_username,
        mqtt_client_id=mqtt_client_id,
        topic_prefix=topic_prefix,
        share_group=share_group,
        tls_certfile=tls_certfile,
        tls_keyfile=tls_keyfile,
        mqtt_ca_file=mqtt_ca_file,
    )
    try:
        mqtt_tls(settings)  # a bad CA file is one line now, not a failed startup later
    except FieldchatError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    # SIGINT or SIGTERM: uvicorn's graceful shutdown, then this line and status 0.
    with contextlib.suppress(KeyboardInterrupt):  # one before the server handles them
        serve(settings)
    typer.echo("fieldchat gateway stopped: what it acknowledged is archived.", err=True)


@gateway_app.command("migrate")
def migrate_command(config: ConfigOpt = None, database_url: DbOpt = None) -> None:
    """Create or upgrade the history database schema."""
    settings = _settings(config, database_url=database_url)
    try:
        version = migrate(settings)
    except FieldchatError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"schema version {version}")


@gateway_app.command("create-admin")
def create_admin(
    username: Annotated[str, typer.Option(help="The administrator's user name.")],
    config: ConfigOpt = None,
    database_url: DbOpt = None,
    password_stdin: Annotated[
        bool, typer.Option("--password-stdin", help="Read the password from standard input.")
    ] = False,
) -> None:
    """Create an administrator account (bootstrap). Prompts for the password."""
    settings = _settings(config, database_url=database_url)
    if password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = typer.prompt("Password", hide_input=True, confirmation_prompt=True)
    if not MIN_PASSWORD <= len(password) <= MAX_PASSWORD:
        typer.echo(
            f"error: the password needs {MIN_PASSWORD} to {MAX_PASSWORD} characters", err=True
        )
        raise typer.Exit(2)
    try:
        account_id = bootstrap_admin(settings, username, password)
    except FieldchatError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"administrator {username!r} created (id {account_id})")

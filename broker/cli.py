"""``fieldchat broker …``: run the embedded broker, manage accounts, write Mosquitto config.

Only parses options, builds settings and calls the library; a
:class:`~schemas.errors.FieldchatError` becomes one line on stderr and exit code 1.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import tomllib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from pydantic import ValidationError

from fieldchat.broker._config import BrokerConfig
from fieldchat.broker._mosquitto import write_mosquitto_config
from fieldchat.broker._server import EmbeddedBroker
from fieldchat.broker._store import Store
from fieldchat.schemas import tracing
from fieldchat.schemas.errors import ConfigError, FieldchatError
from fieldchat.schemas.signals import until_stopped

__all__ = ["broker_app"]

T = TypeVar("T")

broker_app = typer.Typer(
    name="broker",
    help="The embedded MQTT broker: run it, enroll participants, write Mosquitto config.",
    no_args_is_help=True,
    add_completion=False,
)

DataDir = Annotated[
    Path,
    typer.Option("--data-dir", envvar="FIELDCHAT_BROKER_DATA", help="Broker state directory."),
]
JsonOut = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
_DEFAULT_DATA = Path("fieldchat-data/broker")


@contextmanager
def _errors() -> Iterator[None]:
    try:
        yield
    except FieldchatError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None


def _with_store(data_dir: Path, fn: Callable[[Store], T]) -> T:
    with _errors(), Store(data_dir / "broker.sqlite3") as store:
        return fn(store)


@broker_app.command()
def run(
    data_dir: DataDir = _DEFAULT_DATA,
    config_file: Annotated[
        Path | None, typer.Option("--config", help="TOML file with BrokerConfig fields.")
    ] = None,
    host: Annotated[str | None, typer.Option(envvar="FIELDCHAT_BROKER_HOST")] = None,
    port: Annotated[
        int | None,
        typer.Option(envvar="FIELDCHAT_BROKER_PORT", help="MQTT port (default 1883; 0: any)."),
    ] = None,
    tls_port: Annotated[int | None, typer.Option(help="TLS listener port.")] = None,
    certfile: Annotated[Path | None, typer.Option(help="PEM certificate for TLS/WSS.")] = None,
    keyfile: Annotated[Path | None, typer.Option(help="PEM key for TLS/WSS.")] = None,
    ws_port: Annotated[int | None, typer.Option(help="WebSocket listener port.")] = None,
    ws_tls: Annotated[bool, typer.Option(help="Serve the WebSocket listener over TLS.")] = False,
    metrics_port: Annotated[int | None, typer.Option(help="Prometheus /metrics port.")] = None,
    prefix: Annotated[str | None, typer.Option(help="Topic prefix (default fc/v1).")] = None,
    log_level: Annotated[str, typer.Option(help="Python log level.")] = "INFO",
    trace: Annotated[
        bool,
        typer.Option(
            envvar="FIELDCHAT_TRACE",
            help="Export OpenTelemetry traces (OTLP/HTTP; the OTEL_* variables apply). "
            "Also on when OTEL_TRACES_EXPORTER or an OTLP endpoint is set. "
            "Needs fieldchat[tracing]; see docs/tracing.md.",
        ),
    ] = False,
) -> None:
    """Run the broker until SIGINT or SIGTERM (a clean stop: state saved, status 0)."""
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    with _errors():
        settings: dict[str, Any] = {}
        if config_file is not None:
            try:
                settings = tomllib.loads(config_file.read_text())
            except (OSError, tomllib.TOMLDecodeError) as exc:
                raise ConfigError(f"cannot read {config_file}: {exc}") from exc
        settings.setdefault("data_dir", data_dir)
        flags = {
            "host": host,
            "port": port,
            "ws_port": ws_port,
            "metrics_port": metrics_port,
            "prefix": prefix,
        }
        settings.update({k: v for k, v in flags.items() if v is not None})
        if ws_tls:
            settings["ws_tls"] = True
        if tls_port is not None or certfile is not None:
            tls = dict(settings.get("tls") or {})
            tls.update(
                {
                    k: v
                    for k, v in {"port": tls_port, "certfile": certfile, "keyfile": keyfile}.items()
                    if v is not None
                }
            )
            settings["tls"] = tls
        try:
            config = BrokerConfig.model_validate(settings)
        except ValidationError as exc:
            raise ConfigError(f"invalid broker configuration: {exc}") from None
        tracing.configure(tracing.TraceSettings.from_environ(os.environ, force=trace))
        try:
            asyncio.run(until_stopped(_serve(config)))
        except KeyboardInterrupt:  # a signal before until_stopped took them over
            pass
        finally:
            tracing.shutdown()
    typer.echo("fieldchat broker stopped: sessions, queues and retained messages saved.", err=True)


async def _serve(config: BrokerConfig) -> None:
    """Serve until cancelled (SIGINT or SIGTERM); leaving the block saves the state."""
    async with EmbeddedBroker(config) as broker:
        typer.echo("fieldchat broker listening on " + " ".join(broker.urls()), err=True)
        await asyncio.Event().wait()


@broker_app.command()
def enroll(pid: str, data_dir: DataDir = _DEFAULT_DATA, json_out: JsonOut = False) -> None:
    """Issue a participant's credential (printed once; only a hash is kept)."""
    credential = _with_store(data_dir, lambda s: s.enroll(pid))
    if json_out:
        typer.echo(json.dumps({"username": pid, "client_id": pid, "credential": credential}))
    else:
        typer.echo(credential)


@broker_app.command()
def gateway(name: str, data_dir: DataDir = _DEFAULT_DATA, json_out: JsonOut = False) -> None:
    """Issue a gateway replica's credential (username and client id gw-<name>)."""
    username, credential = _with_store(data_dir, lambda s: s.add_gateway(name))
    if json_out:
        typer.echo(
            json.dumps({"username": username, "client_id": username, "credential": credential})
        )
    else:
        typer.echo(f"{username} {credential}")


@broker_app.command()
def revoke(username: str, data_dir: DataDir = _DEFAULT_DATA) -> None:
    """Delete an account; a running broker disconnects it within a second."""
    _with_store(data_dir, lambda s: s.revoke(username))


@broker_app.command()
def allow(pid: str, cid: str, data_dir: DataDir = _DEFAULT_DATA) -> None:
    """Make pid a member of cid whatever the roster says."""
    _with_store(data_dir, lambda s: s.allow(pid, cid))


@broker_app.command()
def deny(pid: str, cid: str, data_dir: DataDir = _DEFAULT_DATA) -> None:
    """Exclude pid from cid whatever the roster says."""
    _with_store(data_dir, lambda s: s.deny(pid, cid))


@broker_app.command("mosquitto-config")
def mosquitto_config(
    out: Annotated[Path, typer.Option(help="Directory for mosquitto.conf, passwd, acl.")],
    data_dir: DataDir = _DEFAULT_DATA,
    port: int = 1883,
    host: str = "127.0.0.1",
    prefix: str = "fc/v1",
    tls_port: int | None = None,
    certfile: Path | None = None,
    keyfile: Path | None = None,
    ws_port: int | None = None,
    user: Annotated[str | None, typer.Option(help="User mosquitto runs as.")] = None,
) -> None:
    """Write a Mosquitto 2 configuration with the same rules.

    Then run ``mosquitto -c <out>/mosquitto.conf``; run this again and send SIGHUP
    after membership changes.
    """
    files = _with_store(
        data_dir,
        lambda s: write_mosquitto_config(
            s,
            out,
            port=port,
            host=host,
            prefix=prefix,
            tls_port=tls_port,
            certfile=certfile,
            keyfile=keyfile,
            ws_port=ws_port,
            user=user,
        ),
    )
    typer.echo(str(files.conf))

"""``fieldchat up``: the embedded broker and the gateway in one process, one data folder.

The broker and the gateway keep their own state under ``data_dir`` (``broker/`` and
``fieldchat.gateway.db``); the gateway's broker credential is issued once and kept in
``fieldchat.gateway.credential`` (mode 0600), so the gateway's persistent MQTT session and
queue survive restarts. Ctrl-C or SIGTERM (the same clean stop) stops the gateway
first (it acknowledges only what it committed to the archive), then the broker
(which persists sessions, queues and retained messages).
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import uvicorn
from fastapi import FastAPI
from pydantic import SecretStr

from fieldchat._command import command_name
from fieldchat.broker import BrokerConfig, EmbeddedBroker, PortInUse
from fieldchat.gateway import GatewayServer, GatewaySettings, create_app, uvicorn_options
from fieldchat.schemas.errors import ConfigError

__all__ = ["Stack", "StackOptions", "open_stack", "run_stack"]

GATEWAY_NAME = "up"


@dataclass(frozen=True, slots=True)
class StackOptions:
    """Where the stack listens and keeps its data."""

    data_dir: Path = Path("fieldchat-data")
    host: str = "127.0.0.1"
    mqtt_port: int = 1883
    http_port: int = 8080


def _check_http_port(host: str, port: int) -> None:
    """Fail early and clearly, before the broker starts, when the web port is taken."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise PortInUse(
                    f"web port {host}:{port} is already in use by another process; "
                    "pass --http-port with a free port (or 0 for any)"
                ) from None
            raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}") from None


def _gateway_credential(data_dir: Path, broker: EmbeddedBroker) -> tuple[str, str]:
    """The gateway's broker login, issued on first start and kept 0600 in the data folder."""
    path = data_dir / "gateway.credential"
    if path.exists():
        try:
            saved = json.loads(path.read_text())
            return str(saved["username"]), str(saved["credential"])
        except (ValueError, KeyError, TypeError):
            raise ConfigError(f"{path} is corrupt; delete it to issue a new one") from None
    username, credential = broker.add_gateway(GATEWAY_NAME)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump({"username": username, "credential": credential}, out)
    return username, credential


def _banner(web: str, mqtt: str, data_dir: Path) -> str:
    broker_dir = data_dir / "broker"
    state = "pi.db"
    fc = command_name()
    return "\n".join(
        [
            "fieldchat is up.",
            f"  web   {web}",
            f"  mqtt  {mqtt}",
            f"  data  {data_dir}/",
            "",
            "Enroll a device and send a first message (in another terminal):",
            f"  {fc} device --state {state} --broker {mqtt} --gateway {web} init",
            f'  {fc} device --state {state} --credential "$({fc} broker enroll'
            f' --data-dir {broker_dir} $({fc} device --state {state} whoami --pid))" init',
            f"  {fc} device --state {state} send $({fc} device --state {state}"
            ' conv create PEER_PID) "hello from the Pi"',
            "",
            "PEER_PID: another device's pid (`whoami --pid`) or a web user's, shown on its page.",
            "Ctrl-C (or SIGTERM) stops everything; nothing is lost.",
        ]
    )


@dataclass(frozen=True, slots=True)
class Stack:
    """A running stack: the broker (for admin calls), the URLs, the gateway's app."""

    broker: EmbeddedBroker
    mqtt_url: str
    web_url: str
    app: FastAPI
    serving: asyncio.Future[None]


@asynccontextmanager
async def open_stack(options: StackOptions) -> AsyncIterator[Stack]:
    """Start broker and gateway; stop them (gateway first) when the block ends.

    Raises:
        PortInUse: the MQTT or web port is taken (the message says which flag to pass).
        ConfigError: the data folder holds a corrupt gateway credential.
    """
    data_dir = options.data_dir
    data_dir.mkdir(parents=True, exist_ok=True)
    data_dir.chmod(0o700)  # accounts, sessions and credentials live here
    _check_http_port(options.host, options.http_port)
    config = BrokerConfig(data_dir=data_dir / "broker", host=options.host, port=options.mqtt_port)
    async with AsyncExitStack() as stack:
        try:
            broker = await stack.enter_async_context(EmbeddedBroker(config))
        except PortInUse:
            raise PortInUse(
                f"MQTT port {options.host}:{options.mqtt_port} is already in use by another"
                " process (a system Mosquitto holds 1883 on many machines); pass --mqtt-port"
                " with a free port, or 0 for any"
            ) from None
        username, credential = _gateway_credential(data_dir, broker)
        mqtt_url = f"mqtt://{options.host}:{broker.port}"
        settings = GatewaySettings(
            host=options.host,
            port=options.http_port,
            database_url=f"sqlite:///{(data_dir / 'gateway.db').resolve()}",
            mqtt_url=mqtt_url,
            mqtt_username=username,
            mqtt_password=SecretStr(credential),
            mqtt_client_id=username,
            mqtt_protocol="5",  # falls back to 3.1.1 if a broker refuses it
            mqtt_fallback_311=True,
        )
        app = create_app(settings)
        # The process owner handles the signals (run_stack: cancel, then this block's
        # exit stops the gateway, then the broker); uvicorn must not.
        server = GatewayServer(
            uvicorn.Config(
                app,
                host=options.host,
                port=options.http_port,
                log_level="warning",
                # as `gateway run`: WebSocket message limit, proxy headers only from
                # FIELDCHAT_GATEWAY_FORWARDED_ALLOW_IPS (unset: none; issue 13)
                **uvicorn_options(settings),
            ),
            handle_signals=False,
        )
        serving = asyncio.ensure_future(server.serve())
        try:
            while not server.started and not serving.done():
                await asyncio.sleep(0.05)
            if serving.done():
                await serving  # startup failed: its error, not a hang
                raise ConfigError("the gateway stopped during startup")
            port = server.servers[0].sockets[0].getsockname()[1]
            yield Stack(broker, mqtt_url, f"http://{options.host}:{port}/", app, serving)
        finally:
            server.should_exit = True
            await serving


async def run_stack(options: StackOptions, echo: Callable[[str], None] = print) -> None:
    """Run broker and gateway until cancelled: :func:`schemas.signals.until_stopped`
    cancels it on SIGINT or SIGTERM, and leaving :func:`open_stack` stops the gateway,
    then the broker.

    Raises:
        PortInUse: the MQTT or web port is taken (the message says which flag to pass).
        ConfigError: the data folder holds a corrupt gateway credential.
    """
    async with open_stack(options) as stack:
        echo(_banner(stack.web_url, stack.mqtt_url, options.data_dir))
        await asyncio.shield(stack.serving)

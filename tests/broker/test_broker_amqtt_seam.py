"""The broker's seam with aMQTT (broker/_amqtt.py): one module, checked loudly (issue 15 item 5).

If one of these fails after an upgrade of amqtt or websockets, the message names the
attribute that changed: adapt broker/_amqtt.py, or keep amqtt==0.12.1.
"""

from __future__ import annotations

import ast
import asyncio
import ssl
from pathlib import Path

import amqtt.broker
import pytest
import websockets
from websockets.asyncio.server import ServerConnection

from fieldchat.broker import BrokerConfig, EmbeddedBroker, TlsConfig
from fieldchat.broker._amqtt import WS_TRANSPORT, AmqttChanged, abort_websocket, check, tls_context
from fieldchat.schemas.errors import ConfigError
from tests._tls import self_signed

BROKER = Path(__file__).resolve().parents[2] / "broker"


def test_the_amqtt_internals_the_broker_uses_are_there():
    check()  # raises AmqttChanged naming the attribute


def test_a_changed_amqtt_fails_loudly_naming_the_attribute(monkeypatch, tmp_path):
    certfile, keyfile = self_signed(tmp_path)
    monkeypatch.delattr(amqtt.broker.Broker, "_create_ssl_context")
    with pytest.raises(AmqttChanged, match=r"amqtt\.broker\.Broker\._create_ssl_context"):
        check()
    with pytest.raises(AmqttChanged, match=r"amqtt==0\.12\.1"):
        tls_context(certfile, keyfile)


def test_only_the_seam_imports_amqtt():
    importers = []
    for path in sorted(BROKER.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            if any(name.split(".")[0] == "amqtt" for name in names):
                importers.append(path.name)
    assert sorted(set(importers)) == ["_amqtt.py"]


def test_the_tls_context_is_amqtts_server_context(tmp_path):
    certfile, keyfile = self_signed(tmp_path)
    context = tls_context(certfile, keyfile)
    assert context.verify_mode is ssl.CERT_OPTIONAL  # aMQTT's choice: client certs optional
    assert not context.check_hostname


async def test_a_missing_certificate_is_a_config_error_and_nothing_stays_bound(tmp_path):
    # Before: aMQTT's FileNotFoundError escaped EmbeddedBroker.start (no FieldchatError,
    # so `fieldchat broker run` printed a traceback).
    missing = tmp_path / "nowhere.pem"
    tls = TlsConfig(certfile=missing, keyfile=missing, port=0)
    config = BrokerConfig(data_dir=tmp_path / "broker", port=0, tls=tls)
    with pytest.raises(ConfigError, match=r"nowhere\.pem"):
        async with EmbeddedBroker(config):
            pass
    async with EmbeddedBroker(config.model_copy(update={"tls": None})) as broker:
        assert broker.port  # the state and the default port were released


async def test_a_websocket_is_aborted_through_its_transport():
    seen: asyncio.Future[bool] = asyncio.get_running_loop().create_future()

    async def handler(ws: ServerConnection) -> None:
        seen.set_result(hasattr(ws, WS_TRANSPORT.name))
        abort_websocket(ws)  # the TCP connection closes now, without a closing handshake
        await ws.wait_closed()

    async with websockets.serve(handler, "127.0.0.1", 0) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        async with websockets.connect(f"ws://127.0.0.1:{port}") as client:
            async with asyncio.timeout(5):
                assert await seen, f"{WS_TRANSPORT.owner}.{WS_TRANSPORT.name} is gone"
                await client.wait_closed()
            assert client.close_code == 1006  # abnormal closure: no handshake happened

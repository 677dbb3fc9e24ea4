"""The archiver over ``mqtts://`` to a broker whose certificate a private CA signed
(``mqtt_ca_file``), and the clear errors when that setting is wrong."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from fieldchat.broker import TlsConfig
from fieldchat.broker.testing import embedded_broker, make_config  # noqa: F401 - fixture
from fieldchat.cli import app
from fieldchat.gateway import GatewaySettings
from fieldchat.gateway._archiver import mqtt_tls
from fieldchat.schemas import Topics
from fieldchat.schemas.errors import ConfigError
from tests._tls import self_signed
from tests.gateway._support import Party, converse, eventually, serve_gateway
from tests.gateway.test_embedded_broker import _all, _publish_tls, gateway_settings


@pytest.fixture
def certificate(tmp_path):
    return self_signed(tmp_path)


@pytest.fixture
def broker_config(tmp_path, certificate):
    certfile, keyfile = certificate
    tls = TlsConfig(certfile=certfile, keyfile=keyfile, port=0)
    return make_config(tmp_path / "broker").model_copy(update={"tls": tls})


async def test_archive_over_tls_with_a_private_ca(embedded_broker, tmp_path, certificate):  # noqa: F811
    broker = embedded_broker
    certfile, _ = certificate
    topics = Topics(broker.config.prefix)
    settings = gateway_settings(
        broker,
        "archive-tls",
        tmp_path,
        mqtt_url=f"mqtts://127.0.0.1:{broker.tls_port}",
        mqtt_ca_file=certfile,
    )
    device, peer = Party(topics), Party(topics)
    conv = converse(topics, [device, peer])
    async with serve_gateway(settings) as gw:
        await eventually(gw.state.archiver.connected.is_set, "the archiver over TLS")
        sealed = [conv.seal(device, f"over tls {i}") for i in range(3)]
        items = [  # a device may publish everything but another participant's bundle
            (p.topic, p.payload, p.retain)
            for p in conv.publications
            if p.topic != topics.bundle(peer.pid)
        ]
        items += [(topics.msg(conv.cid), s, False) for s in sealed]
        await _publish_tls(broker, device, broker.enroll(device.pid), items, certfile)
        rows = await eventually(lambda: _all(gw, conv.cid, 3), "the envelopes sent over TLS")
        assert sorted(r.data for r in rows) == sorted(sealed)


def test_a_ca_file_needs_mqtts_and_must_be_readable(tmp_path, certificate):
    certfile, _ = certificate
    with pytest.raises(ConfigError, match="not mqtts"):
        mqtt_tls(GatewaySettings(mqtt_url="mqtt://127.0.0.1:1883", mqtt_ca_file=certfile))
    missing = tmp_path / "nowhere.pem"
    with pytest.raises(ConfigError, match="cannot read the MQTT CA file"):
        mqtt_tls(GatewaySettings(mqtt_url="mqtts://127.0.0.1:8883", mqtt_ca_file=missing))
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    with pytest.raises(ConfigError, match="cannot read the MQTT CA file"):
        mqtt_tls(GatewaySettings(mqtt_url="mqtts://127.0.0.1:8883", mqtt_ca_file=garbage))
    assert mqtt_tls(GatewaySettings(mqtt_url="mqtt://127.0.0.1:1883")) is None


def test_gateway_run_reports_a_bad_ca_file_in_one_line(tmp_path):
    result = CliRunner().invoke(
        app,
        [
            "gateway",
            "run",
            "--mqtt-url",
            "mqtts://127.0.0.1:8883",
            "--mqtt-ca-file",
            str(tmp_path / "nowhere.pem"),
            "--database-url",
            f"sqlite:///{tmp_path / 'h.db'}",
        ],
    )
    assert result.exit_code == 2
    assert "cannot read the MQTT CA file" in result.output
    assert "Traceback" not in result.output

"""The archiver against the embedded broker (hardened aMQTT, MQTT 3.1.1, gateway role
with its own credential): what devices publish is archived, and a browser's envelope
goes out through the gateway's credential."""

from __future__ import annotations

import aiomqtt

from fieldchat.broker.testing import broker_config, embedded_broker  # noqa: F401 - fixtures
from fieldchat.gateway import GatewaySettings
from fieldchat.schemas import TextMessage, Topics
from tests.device._mesh import text_of
from tests.gateway._support import FAST_ARGON2, Party, converse, eventually, login, serve_gateway
from tests.gateway.test_ws import Browser


def gateway_settings(broker, name: str, tmp_path, **overrides) -> GatewaySettings:
    """A gateway of its own role on ``broker`` (MQTT 3.1.1), SQLite in ``tmp_path``."""
    user, credential = broker.add_gateway(name)
    fields = {
        "mqtt_url": f"mqtt://127.0.0.1:{broker.port}",
        "mqtt_protocol": "3.1.1",
        "mqtt_username": user,
        "mqtt_password": credential,
        "mqtt_client_id": user,
        "topic_prefix": broker.config.prefix,
        "database_url": f"sqlite:///{tmp_path / 'h.db'}",
        "feed_poll_s": 0.2,
        **FAST_ARGON2,
    }
    return GatewaySettings(**(fields | overrides))


async def _publish_as(broker, party: Party, credential: str, items, **client_kw) -> None:
    async with aiomqtt.Client(
        "127.0.0.1",
        client_kw.pop("port", broker.port),
        identifier=party.pid,
        username=party.pid,
        password=credential,
        protocol=aiomqtt.ProtocolVersion.V311,
        **client_kw,
    ) as client:
        for topic, payload, retain in items:
            await client.publish(topic, payload, qos=1, retain=retain)


async def _publish_tls(broker, party: Party, credential: str, items, cafile) -> None:
    """``_publish_as`` over the broker's TLS listener, trusting exactly ``cafile``."""
    tls = aiomqtt.TLSParameters(ca_certs=str(cafile))
    await _publish_as(broker, party, credential, items, port=broker.tls_port, tls_params=tls)


async def test_archive_through_the_embedded_broker(embedded_broker, tmp_path):  # noqa: F811
    broker = embedded_broker
    topics = Topics(broker.config.prefix)
    settings = gateway_settings(broker, "archive-1", tmp_path, pending_retry_s=1.0)
    device, web = Party(topics), Party(topics)
    conv = converse(topics, [device, web])
    async with serve_gateway(settings) as gw:
        http = await login(gw, "webuser", web)  # also publishes web's bundle via the gateway
        try:
            # everything but the browser's bundle, which the gateway published at
            # registration (a device may not publish on another participant's p/…)
            await _publish_as(
                broker,
                device,
                broker.enroll(device.pid),
                [
                    (p.topic, p.payload, p.retain)
                    for p in conv.publications
                    if p.topic != topics.bundle(web.pid)
                ],
            )
            sealed = [conv.seal(device, f"n{i}") for i in range(5)]
            await _publish_as(
                broker,
                device,
                broker.enroll(device.pid),
                [(topics.msg(conv.cid), s, False) for s in sealed],
            )
            rows = await eventually(lambda: _all(gw, conv.cid, 5), "the device's envelopes")
            assert sorted(r.data for r in rows) == sorted(sealed)
            # the browser's own sealed envelope, published by the gateway for it
            mine = web.engine.seal(conv.cid, TextMessage(sent_at=1, text="from the web"))
            async with Browser(gw, http) as socket:
                await socket.next("caught_up")
                assert (await socket.publish("msg", mine, cid=conv.cid))["op"] == "ack"
            rows = await eventually(lambda: _all(gw, conv.cid, 6), "the browser's envelope")
            assert mine in [r.data for r in rows]
            assert text_of(device.engine.open(conv.cid, mine)) == "from the web"
        finally:
            await http.aclose()


async def _all(gw, cid, n):
    rows = await gw.state.store.history(cid, after=0, limit=100)
    return rows if len(rows) >= n else None

"""One trace per envelope across device, embedded broker and gateway: ``publish`` (the
root), ``route``, ``archive`` and ``ws deliver``; a browser's envelope gets its root
from the gateway that publishes it. No span carries the message (the gateway's hooks:
``_archiver``, ``_hub`` and ``_ws``, docs/tracing.md)."""

from __future__ import annotations

from types import SimpleNamespace

import aiomqtt

from fieldchat.broker import EmbeddedBroker
from fieldchat.broker.testing import make_config
from fieldchat.schemas import Envelope, TextMessage, Topics, tracing
from tests._otlp import ReceivedSpan, traced_process
from tests.gateway._support import Party, converse, login, make_settings, serve_gateway
from tests.gateway.test_ws import Browser

SECRET = "pangolin-harmonica-5820"


def trace_of(cid: str, data: bytes) -> tracing.TraceIds:
    env = Envelope.from_bytes(data)
    return tracing.trace_ids(cid, env.epoch, env.sender, env.chain, env.step)


def names(spans: list[ReceivedSpan], ids: tracing.TraceIds) -> set[str]:
    return {s.name for s in spans if s.trace_id == ids.trace_hex}


async def test_device_and_browser_envelopes_are_traced_to_the_websocket(tmp_path, monkeypatch):
    with traced_process(monkeypatch) as otlp:
        async with EmbeddedBroker(make_config(tmp_path / "broker")) as broker:
            topics = Topics(broker.config.prefix)
            user, credential = broker.add_gateway("archive-1")
            url = SimpleNamespace(url=f"mqtt://127.0.0.1:{broker.port}")
            settings = make_settings(
                url,  # the embedded broker where make_settings expects Mosquitto
                topics.prefix,
                f"sqlite:///{tmp_path / 'h.db'}",
                mqtt_protocol="3.1.1",
                mqtt_username=user,
                mqtt_password=credential,
                mqtt_client_id=user,
            )
            device, web = Party(topics), Party(topics)
            conv = converse(topics, [device, web])
            async with serve_gateway(settings) as gw:
                http = await login(gw, "webuser", web)
                try:
                    async with Browser(gw, http) as socket:
                        await socket.next("caught_up")
                        sealed = conv.seal(device, SECRET)
                        async with aiomqtt.Client(
                            "127.0.0.1",
                            broker.port,
                            identifier=device.pid,
                            username=device.pid,
                            password=broker.enroll(device.pid),
                            protocol=aiomqtt.ProtocolVersion.V311,
                        ) as client:
                            for p in conv.publications:
                                if p.topic != topics.bundle(web.pid):
                                    await client.publish(p.topic, p.payload, qos=1, retain=p.retain)
                            # this client stands in for a device: its root span, then the bytes
                            device_tracer = tracing.tracer("device")
                            assert device_tracer is not None
                            device_tracer.publish(topics.msg(conv.cid), sealed)
                            await client.publish(topics.msg(conv.cid), sealed, qos=1)
                        frame = await socket.next("envelope")
                        assert frame["cid"] == conv.cid
                        mine = web.engine.seal(conv.cid, TextMessage(sent_at=1, text=SECRET))
                        assert (await socket.publish("msg", mine, cid=conv.cid))["op"] == "ack"
                        await socket.next("envelope")
                    ids, web_ids = trace_of(conv.cid, sealed), trace_of(conv.cid, mine)
                    whole = {"publish", "route", "archive", "ws deliver"}
                    spans = otlp.wait_for(
                        lambda got: names(got, ids) >= whole and names(got, web_ids) >= whole
                    )
                finally:
                    await http.aclose()

    for trace, root_service in ((ids, "fieldchat-device"), (web_ids, "fieldchat-gateway")):
        of_trace = [s for s in spans if s.trace_id == trace.trace_hex]
        (root,) = [s for s in of_trace if not s.parent_span_id]
        assert (root.name, root.service) == ("publish", root_service)
        assert root.span_id == f"{trace.root_span_id:016x}"
        children = [s for s in of_trace if s.parent_span_id]
        assert {(s.name, s.service, s.parent_span_id) for s in children} == {
            ("route", "fieldchat-broker", root.span_id),
            ("archive", "fieldchat-gateway", root.span_id),
            ("ws deliver", "fieldchat-gateway", root.span_id),
        }
        (deliver,) = [s for s in children if s.name == "ws deliver"]
        assert deliver.attributes["fieldchat.ws.subscribers"] == 1
        assert all(s.start_ns <= s.end_ns for s in children)
    forbidden = [SECRET, device.pid, web.pid, credential, sealed.hex(), mine.hex(), "webuser"]
    assert [x for s in spans for x in s.strings() for f in forbidden if f in x] == []

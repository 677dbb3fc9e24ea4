"""A device's ``publish`` span is the root of its envelope's trace; the embedded
broker's ``route`` span joins it as a child, with nothing of the message in either
(the device's hook: ``Outbound.pump``, docs/tracing.md)."""

from __future__ import annotations

from fieldchat.schemas import tracing
from tests._otlp import traced_process
from tests.device.conftest import Devices, Embedded, texts, wait_until

SECRET = "wombat-lantern-4471"


def test_device_publish_is_the_root_and_the_broker_route_its_child(tmp_path, monkeypatch):
    with traced_process(monkeypatch) as otlp:
        broker = Embedded(tmp_path / "embedded").start()  # made after tracing is on
        devices = Devices(tmp_path, broker)
        try:
            alice, bob = devices.make("alice"), devices.make("bob")
            cid = alice.create_conversation([bob.pid])
            wait_until(lambda: bob.engine.is_member(cid), 10, "bob joins")
            sent = alice.send(cid, SECRET)
            wait_until(lambda: texts(bob, cid) == [SECRET], 10, "bob receives")
            sender = alice.engine.roster(cid).index_of(alice.pid)
            ids = tracing.trace_ids(cid, sent.epoch, sender, sent.chain, sent.step)
            spans = otlp.wait_for(
                lambda got: (
                    {s.name for s in got if s.trace_id == ids.trace_hex} >= {"publish", "route"}
                )
            )
        finally:
            devices.close()
            broker.stop()
    mine = [s for s in spans if s.trace_id == ids.trace_hex]
    (root,) = [s for s in mine if s.name == "publish" and not s.parent_span_id]
    routes = [s for s in mine if s.name == "route"]  # more than one if the device resent it
    assert routes
    assert {(s.service, s.parent_span_id) for s in routes} == {("fieldchat-broker", root.span_id)}
    assert all(s.attributes["fieldchat.broker.fanout"] >= 1 for s in routes)
    resends = [s for s in mine if s.name == "publish" and s.parent_span_id]
    assert all(s.attributes["fieldchat.resend"] is True for s in resends)
    forbidden = [SECRET, alice.pid, bob.pid]
    assert [x for s in spans for x in s.strings() for f in forbidden if f in x] == []

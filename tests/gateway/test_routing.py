"""The broker keeps routing to the archiver (issue 14, item 1), on a real Mosquitto with
persistence: after a restart the archiver is back and subscribed within its short
reconnect delay, and a shared subscription the broker lost is found by the canary and
made again."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
import uuid
from functools import partial

import aiomqtt
import pytest

from fieldchat.gateway._routing import (
    CANARY_CID,
    RECONNECT_FIRST_S,
    RECONNECT_MAX_S,
    Backoff,
    Canary,
)
from fieldchat.gateway._schema import canaries
from fieldchat.schemas import Topics
from tests.gateway._support import (
    Mosquitto,
    Party,
    converse,
    eventually,
    make_settings,
    publish_all,
    pubs,
    serve_gateway,
)

pytestmark = pytest.mark.mosquitto

DOWN_S = 3.5  # the broker is away long enough for the old backoff to reach 3.2 s
PUBLISH_S = 4.0  # a device publishes every 0.1 s for this long after the restart
GRACE_S = 1.5  # what is published this long after the restart must be archived


@pytest.fixture
def persistent_mosquitto(tmp_path):
    broker = Mosquitto(tmp_path / "mosquitto", persistence=True).start()
    yield broker
    broker.stop()


async def _archived(gw, cid: str) -> set[bytes]:
    return {r.data for r in await gw.state.store.history(cid, after=0, limit=500)}


async def _publish_for(url: str, topic: str, items: list[bytes], every_s: float):
    """Publish at QoS 1 as soon as the broker takes a connection, one item every
    ``every_s``; returns (seconds after the first try, item) for each."""
    host, port = url.removeprefix("mqtt://").split(":")
    start = time.monotonic()
    while True:
        try:
            client = aiomqtt.Client(host, int(port), identifier=f"dev-{uuid.uuid4().hex[:8]}")
            await client.__aenter__()
            break
        except aiomqtt.MqttError:
            await asyncio.sleep(0.02)
    sent = []
    try:
        for item in items:
            at = time.monotonic() - start
            await client.publish(topic, item, qos=1)
            sent.append((at, item))
            await asyncio.sleep(every_s)
    finally:
        await client.__aexit__(None, None, None)
    return sent


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGKILL], ids=["clean", "killed"])
async def test_what_is_published_soon_after_a_mosquitto_restart_is_archived(
    persistent_mosquitto, prefix, tmp_path, stop
):
    broker = persistent_mosquitto
    topics = Topics(prefix)
    settings = make_settings(
        broker, prefix, f"sqlite:///{tmp_path / 'h.db'}", share_group="archive"
    )
    async with serve_gateway(settings) as gw:
        archiver = gw.state.archiver
        a, b = Party(topics), Party(topics)
        conv = converse(topics, [a, b])
        await publish_all(broker.url, pubs(conv.publications))
        first = conv.seal(a, "before")
        await publish_all(broker.url, [(topics.msg(conv.cid), first, False)])
        await eventually(lambda: _archived(gw, conv.cid), "the first envelope archived")

        broker.stop(stop)  # SIGTERM: a clean stop, the state saved; SIGKILL: a crash
        await eventually(lambda: not archiver.connected.is_set(), "the archiver to notice")
        await asyncio.sleep(DOWN_S)
        broker.start()
        count = int(PUBLISH_S / 0.1)
        sealed = [conv.seal(a, f"after {i}") for i in range(count)]
        sent = await _publish_for(broker.url, topics.msg(conv.cid), sealed, 0.1)
        due = {item for at, item in sent if at >= GRACE_S}

        async def all_due() -> bool:
            return due <= await _archived(gw, conv.cid)

        try:
            await eventually(all_due, "what was published after the grace archived", 10)
        except AssertionError:
            got = await _archived(gw, conv.cid)
            lost = [round(at, 1) for at, item in sent if item in due and item not in got]
            raise AssertionError(f"lost, published at (s after the restart): {lost}") from None
        if stop == signal.SIGTERM:
            # Mosquitto said the session was there (after a SIGKILL it may have died
            # before its autosave); its $share subscription was not, and the archiver
            # subscribed again anyway
            assert archiver.session_present is True


# -- the canary ---------------------------------------------------------------------------


def test_reconnect_delays_start_at_once_and_never_exceed_the_cap():
    for r in (0.0, 0.5, 0.999):
        b = Backoff(rand=partial(float, r))  # always draws r
        delays = [b.next() for _ in range(40)]
        assert delays[0] <= RECONNECT_FIRST_S
        assert max(delays) <= RECONNECT_MAX_S
        assert min(delays[5:]) >= RECONNECT_MAX_S / 2  # equal jitter: never a storm
        b.reset()
        assert b.next() <= RECONNECT_FIRST_S


def test_a_canary_is_recognised_only_under_the_shared_key():
    one, other = Canary(b"k" * 32), Canary(b"j" * 32)
    nonce, payload = one.make()
    assert len(payload) == 32
    assert one.nonce_of(payload) == nonce
    assert Canary(b"k" * 32).nonce_of(payload) == nonce  # another replica, same key
    assert other.nonce_of(payload) is None
    assert one.nonce_of(payload[:-1] + bytes([payload[-1] ^ 1])) is None
    assert one.nonce_of(payload + b"x") is None
    assert one.nonce_of(b"") is None


def _unsubscribe(topic_filter: str) -> bytes:
    """An MQTT 5 UNSUBSCRIBE (§3.10) of one filter, packet id 0x7777."""
    name = topic_filter.encode()
    body = b"\x77\x77" + b"\x00" + len(name).to_bytes(2, "big") + name
    return bytes([0xA2, len(body)]) + body


def _sample(gw, name: str) -> float:
    return gw.state.metrics.registry.get_sample_value(name) or 0.0


async def test_a_lost_shared_subscription_is_found_by_the_canary_and_made_again(
    mosquitto, prefix, tmp_path, caplog
):
    caplog.set_level(logging.INFO, logger="fieldchat.gateway.archiver")
    topics = Topics(prefix)
    settings = make_settings(
        mosquitto,
        prefix,
        f"sqlite:///{tmp_path / 'h.db'}",
        share_group="archive",
        canary_interval_s=0.5,
        canary_timeout_s=2.0,
    )
    async with serve_gateway(settings) as gw:
        archiver = gw.state.archiver
        a, b = Party(topics), Party(topics)
        conv = converse(topics, [a, b])
        await publish_all(mosquitto.url, pubs(conv.publications))
        await eventually(lambda: gw.state.store.bundle(b.pid), "the bundles")
        await eventually(
            lambda: _sample(gw, "fieldchat_gateway_canary_seconds_count") >= 1, "a first canary"
        )
        # The broker drops the archiver's shared subscription while it stays connected
        # (what Mosquitto does to a restored session; here without the restart). The
        # archiver is not told: only the canary can notice.
        shared = f"$share/archive/{topics.all_msgs()}"
        archiver._client._transport.write(_unsubscribe(shared))
        await eventually(
            lambda: _sample(gw, "fieldchat_gateway_canary_failures_total") >= 1,
            "the canary to miss",
            timeout=10,
        )
        after = conv.seal(a, "after the repair")
        await eventually(
            lambda: (
                _sample(gw, "fieldchat_gateway_canary_failures_total")
                < _sample(gw, "fieldchat_gateway_canary_seconds_count") - 1
            ),
            "a canary back after the failure",
            timeout=10,
        )
        await publish_all(mosquitto.url, [(topics.msg(conv.cid), after, False)])
        await eventually(
            lambda: _contains(gw, conv.cid, after), "an envelope archived again", timeout=10
        )
        lost_lines = [r for r in caplog.records if "routing canary not back" in r.getMessage()]
        assert len(lost_lines) == 1  # logged once, counted every time
        assert any("routing canary back" in r.getMessage() for r in caplog.records)
        assert archiver.connected.is_set()  # repaired by subscribing again, not reconnecting


async def _contains(gw, cid: str, data: bytes) -> bool:
    return data in await _archived(gw, cid)


async def test_junk_on_the_canary_topic_is_refused_and_never_archived(mosquitto, prefix, tmp_path):
    topics = Topics(prefix)
    settings = make_settings(
        mosquitto, prefix, f"sqlite:///{tmp_path / 'h.db'}", canary_interval_s=0.3
    )
    async with serve_gateway(settings) as gw:
        topic = topics.msg(CANARY_CID)
        await publish_all(mosquitto.url, [(topic, b"x" * 32, False), (topic, b"junk", False)])
        await eventually(
            lambda: gw.state.metrics.rejected_count("mqtt", "canary") == 2, "the junk refused"
        )
        await eventually(
            lambda: _sample(gw, "fieldchat_gateway_canary_seconds_count") >= 3, "canaries"
        )
        assert _sample(gw, "fieldchat_gateway_canary_failures_total") == 0
        assert await gw.state.store.history(CANARY_CID, after=0) == []
        assert await gw.state.store.max_seq() == 0  # no canary is ever archived


@pytest.mark.postgres
async def test_replicas_of_a_share_group_find_each_others_canaries(mosquitto, prefix, pg_url):
    settings = [
        make_settings(mosquitto, prefix, pg_url, share_group="archive", canary_interval_s=0.2)
        for _ in range(2)
    ]
    async with serve_gateway(settings[0]) as one, serve_gateway(settings[1]) as two:

        def rounds(gw) -> float:
            return _sample(gw, "fieldchat_gateway_canary_seconds_count")

        await eventually(lambda: rounds(one) >= 8 and rounds(two) >= 8, "canaries both ways")
        assert _sample(one, "fieldchat_gateway_canary_failures_total") == 0
        assert _sample(two, "fieldchat_gateway_canary_failures_total") == 0
        # the broker split them: some came back through the other replica and the database
        noted = await one.state.store.db.read(
            "reading canaries", lambda conn: conn.execute(canaries.select()).all()
        )
        assert noted

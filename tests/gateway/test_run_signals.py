"""``fieldchat gateway run`` stopped by a real SIGTERM mid-stream (issue 14): status 0,
one "stopped" line, and after a restart every envelope is archived exactly once (it
acknowledges only what it committed; the broker keeps the rest for its session).
uvicorn used to raise SIGTERM again after its graceful shutdown: status 143."""

from __future__ import annotations

import asyncio
import signal
import uuid

import pytest

from fieldchat.gateway import open_store
from fieldchat.gateway._hub import Hub
from fieldchat.gateway._metrics import GatewayMetrics
from tests.gateway._support import (
    FAST_ARGON2,
    GatewayProcess,
    Party,
    converse,
    eventually,
    publish_all,
    pubs,
)

pytestmark = pytest.mark.mosquitto

COUNT = 3000


async def _archived(store, cid: str) -> list[bytes]:
    rows, after = [], 0
    while page := await store.history(cid, after=after, limit=500):
        rows += [r.data for r in page]
        after = page[-1].seq
    return rows


async def test_sigterm_mid_stream_stops_cleanly_and_loses_nothing(mosquitto, prefix, tmp_path):
    from fieldchat.schemas import Topics

    topics = Topics(prefix)
    url = f"sqlite:///{tmp_path / 'history.db'}"
    gw = GatewayProcess(
        tmp_path / "gw",
        mqtt_url=mosquitto.url,
        topic_prefix=prefix,
        database_url=url,
        mqtt_client_id=f"gw-term-{uuid.uuid4().hex[:6]}",
        feed_poll_s=0.2,
        pending_retry_s=1.0,
        batch_max=50,
        **FAST_ARGON2,
    ).start()
    store = open_store(url)
    try:
        await gw.healthy()
        a, b = Party(topics), Party(topics)
        conv = converse(topics, [a, b])
        await publish_all(mosquitto.url, pubs(conv.publications))
        await eventually(lambda: store.roster(conv.cid, 0), "the roster")
        sealed = [conv.seal(a if i % 2 else b, f"t{i}") for i in range(COUNT)]
        msg = topics.msg(conv.cid)
        publishing = asyncio.create_task(
            publish_all(mosquitto.url, [(msg, s, False) for s in sealed])
        )

        async def some_archived() -> bool:
            return len(await store.history(conv.cid, limit=100)) >= 100

        await eventually(some_archived, "the first envelopes", timeout=60)
        assert gw.proc is not None
        gw.proc.send_signal(signal.SIGTERM)  # mid-stream: envelopes keep arriving
        assert await asyncio.to_thread(gw.proc.wait, 30) == 0, gw.tail()
        assert gw.tail().strip().splitlines()[-1] == (
            "fieldchat gateway stopped: what it acknowledged is archived."
        )
        archived_at_stop = len(await _archived(store, conv.cid))
        await publishing
        assert archived_at_stop < COUNT  # it was stopped in the middle of the stream
        gw.start()  # same client id: the broker kept its session and queue
        await gw.healthy()

        async def everything() -> list[bytes] | None:
            rows = await _archived(store, conv.cid)
            return rows if len(rows) >= COUNT else None

        rows = await eventually(everything, "every envelope", timeout=120)
        assert sorted(rows) == sorted(sealed)  # each exactly once
    finally:
        gw.stop()
        await store.close()


async def test_the_live_feed_stops_when_cancelled_as_it_wakes(tmp_path):
    """The stop cancels the hub while a commit wakes it (the common case under load);
    it used to lose that cancellation (asyncio.wait_for on Python 3.11) and run on,
    and the gateway's shutdown waited for it forever."""
    store = open_store(f"sqlite:///{tmp_path / 'history.db'}")
    try:
        await store.migrate()
        hub = Hub(store, GatewayMetrics(), poll_s=60, queue_max=10)
        for _ in range(20):
            task = asyncio.create_task(hub.run())
            await asyncio.sleep(0)  # the hub waits to be woken
            hub.committed(1, 0)  # an archive commit wakes it ...
            await asyncio.sleep(0)
            task.cancel()  # ... as the stop cancels it
            done, _ = await asyncio.wait([task], timeout=5)
            assert done, "the hub went on after it was cancelled"
    finally:
        await store.close()

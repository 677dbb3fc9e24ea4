"""Gateways as separate processes (``fieldchat gateway run``): two of them sharing the
archive through ``$share/`` on Mosquitto and one PostgreSQL, and one SIGKILLed
mid-stream and restarted. Every envelope is archived exactly once."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import uuid

import httpx
import pytest
from websockets.asyncio.client import connect

from fieldchat.gateway import open_store
from tests.gateway._support import (
    FAST_ARGON2,
    GatewayProcess,
    Party,
    claim,
    converse,
    eventually,
    publish_all,
    pubs,
)

pytestmark = [pytest.mark.mosquitto, pytest.mark.slow]

N_SHARED = 300
N_KILL = 1500


def _settings(mosquitto, prefix, database_url, client_id, **kw):
    return {
        "mqtt_url": mosquitto.url,
        "topic_prefix": prefix,
        "database_url": database_url,
        "mqtt_client_id": client_id,
        "feed_poll_s": 0.2,
        "pending_retry_s": 1.0,
        **FAST_ARGON2,
        **kw,
    }


async def _archived_total(base: str) -> float:
    async with httpx.AsyncClient(timeout=5) as http:
        text = (await http.get(f"{base}/metrics")).text
    match = re.search(r"^fieldchat_gateway_envelopes_archived_total (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


async def _web_account(base: str, name: str, party: Party) -> None:
    async with httpx.AsyncClient(base_url=base, timeout=20) as http:
        password = "long enough password"
        r = await http.post("/v1/accounts", json={"username": name, "password": password})
        assert r.status_code == 201, r.text
        r = await http.post("/v1/session", json={"username": name, "password": password})
        assert r.status_code == 200, r.text
        r = await claim(http, party)
        assert r.status_code == 201, r.text


async def _collect(ws, count: int) -> set[bytes]:
    got: set[bytes] = set()
    try:
        while len(got) < count:
            frame = json.loads(await asyncio.wait_for(ws.recv(), 60))
            if frame["op"] == "envelope":
                got.add(base64.b64decode(frame["data"]))
    except TimeoutError:
        raise AssertionError(f"only {len(got)} of {count} envelopes reached the socket") from None
    return got


@pytest.mark.postgres
async def test_two_gateways_share_the_archive_exactly_once(mosquitto, prefix, pg_url, tmp_path):
    from fieldchat.schemas import Topics

    topics = Topics(prefix)
    gws = [
        GatewayProcess(
            tmp_path / f"gw{i}",
            **_settings(
                mosquitto,
                prefix,
                pg_url,
                f"gw-{i}-{uuid.uuid4().hex[:6]}",
                share_group="archive",
            ),
        ).start()
        for i in (1, 2)
    ]
    try:
        await asyncio.gather(*(g.healthy() for g in gws))
        device = Party(topics)
        web1, web2 = Party(topics), Party(topics)
        await _web_account(gws[0].base, "web-one", web1)
        await _web_account(gws[1].base, "web-two", web2)
        conv = converse(topics, [device, web1, web2])
        await publish_all(mosquitto.url, pubs(conv.publications))
        store = open_store(pg_url)
        ws1 = ws2 = None
        try:
            await eventually(lambda: store.roster(conv.cid, 0), "the roster")
            ws1 = await _socket(gws[0], "web-one")
            ws2 = await _socket(gws[1], "web-two")
            sealed = [conv.seal(device, f"m{i}") for i in range(N_SHARED)]
            await publish_all(mosquitto.url, [(topics.msg(conv.cid), s, False) for s in sealed])
            rows = await eventually(
                lambda: _all(store, conv.cid, N_SHARED), "every envelope archived", timeout=120
            )
            assert sorted(r.data for r in rows) == sorted(sealed)  # each exactly once
            totals = [await _archived_total(g.base) for g in gws]
            assert sum(totals) == N_SHARED
            assert all(t > 0 for t in totals), totals  # the work was shared
            got1, got2 = await asyncio.gather(_collect(ws1, N_SHARED), _collect(ws2, N_SHARED))
            assert got1 == got2 == set(sealed)  # web clients on both gateways see everything
        finally:
            await store.close()
            for ws in (ws1, ws2):
                if ws is not None:
                    await ws.close()
    finally:
        for g in gws:
            g.stop()


async def _socket(gw: GatewayProcess, name: str):
    async with httpx.AsyncClient(base_url=gw.base, timeout=20) as http:
        r = await http.post(
            "/v1/session", json={"username": name, "password": "long enough password"}
        )
        assert r.status_code == 200
        cookie = http.cookies.get("fc_session")
    return await connect(
        f"ws://127.0.0.1:{gw.port}/ws",
        additional_headers={"Cookie": f"fc_session={cookie}"},
        max_queue=None,
    )


async def _all(store, cid: str, n: int):
    rows = []
    after = 0
    while True:
        page = await store.history(cid, after=after, limit=500)
        rows += page
        if len(page) < 500:
            break
        after = page[-1].seq
    return rows if len(rows) >= n else None


async def test_sigkill_mid_stream_then_restart_archives_everything_once(
    mosquitto, prefix, tmp_path
):
    from fieldchat.schemas import Topics

    topics = Topics(prefix)
    url = f"sqlite:///{tmp_path / 'history.db'}"
    settings = _settings(mosquitto, prefix, url, f"gw-kill-{uuid.uuid4().hex[:6]}", batch_max=50)
    gw = GatewayProcess(tmp_path / "gw", **settings).start()
    store = open_store(url)
    try:
        await gw.healthy()
        a, b = Party(topics), Party(topics)
        conv = converse(topics, [a, b])
        await publish_all(mosquitto.url, pubs(conv.publications))
        await eventually(lambda: store.roster(conv.cid, 0), "the roster")
        sealed = [conv.seal(a if i % 2 else b, f"k{i}") for i in range(N_KILL)]
        msg = topics.msg(conv.cid)
        half = N_KILL // 2
        await publish_all(mosquitto.url, [(msg, s, False) for s in sealed[:half]])

        async def some_archived() -> bool:
            return len(await store.history(conv.cid, limit=500)) >= 100

        await eventually(some_archived, "the first envelopes", timeout=60)
        gw.kill()  # SIGKILL: no shutdown, whatever batch was in flight
        # the rest of the stream arrives while it is dead: the broker queues it
        await publish_all(mosquitto.url, [(msg, s, False) for s in sealed[half:]])
        gw.start()  # same client id: the broker kept its session and queue
        await gw.healthy()
        rows = await eventually(
            lambda: _all(store, conv.cid, N_KILL), "every envelope", timeout=120
        )
        assert len(rows) == N_KILL
        assert sorted(r.data for r in rows) == sorted(sealed)
        assert await store.pending_count() == 0
    finally:
        gw.stop()
        await store.close()

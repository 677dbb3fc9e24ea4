"""The NGINX recipe (``deploy/nginx/fieldchat.conf``) with Debian's real nginx in front of
two ``fieldchat gateway run`` replicas that share archiving through ``$share/`` on
Mosquitto and one PostgreSQL database: TLS termination, the WebSocket upgrade,
requests spread over both replicas, and one replica SIGKILLed while the service keeps
answering through the other."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.typing import Origin

from fieldchat.gateway import open_store
from fieldchat.schemas import Topics
from tests._tls import client_context, self_signed
from tests.deploy._nginx import NGINX, Nginx, render
from tests.gateway._support import (
    FAST_ARGON2,
    GatewayProcess,
    Party,
    claim,
    converse,
    eventually,
    free_port,
    publish_all,
    pubs,
)

pytestmark = [
    pytest.mark.mosquitto,
    pytest.mark.postgres,
    pytest.mark.slow,
    pytest.mark.skipif(
        not os.access(NGINX, os.X_OK), reason="nginx is not installed (apt-get install nginx)"
    ),
]

PASSWORD = "long enough password"
N_BEFORE = 20
N_AFTER = 20


def _replica(workdir: Path, mosquitto: Any, prefix: str, pg_url: str, name: str) -> GatewayProcess:
    # What the recipe sets on each replica: its own stable client id, one share group,
    # Secure cookies although the replica itself speaks plain HTTP behind the proxy, and
    # trust in the proxy's X-Forwarded-For/-Proto (the client's address for the limits,
    # https for the origin that participant claims are bound to).
    return GatewayProcess(
        workdir / name,
        forwarded_allow_ips="127.0.0.1",
        mqtt_url=mosquitto.url,
        topic_prefix=prefix,
        database_url=pg_url,
        mqtt_client_id=f"{name}-{uuid.uuid4().hex[:6]}",
        share_group="archive",
        cookie_secure=True,
        feed_poll_s=0.2,
        pending_retry_s=1.0,
        **FAST_ARGON2,
    )


def _route_count(metrics: str, route: str) -> float:
    pattern = (
        r'^fieldchat_gateway_http_request_seconds_count\{[^}]*route="'
        + re.escape(route)
        + r'"[^}]*status="200"[^}]*\} (\S+)$'
    )
    return sum(float(m) for m in re.findall(pattern, metrics, re.M))


async def _direct_metrics(gw: GatewayProcess) -> str:
    async with httpx.AsyncClient(timeout=5) as http:
        return (await http.get(f"{gw.base}/metrics")).text


async def _socket(
    base: str, ssl_ctx: Any, cookie: str, cursor: int | None = None
) -> ClientConnection:
    query = "" if cursor is None else f"?cursor={cursor}"
    ws = await connect(
        base.replace("https://", "wss://") + f"/ws{query}",
        ssl=ssl_ctx,
        origin=Origin(base),
        additional_headers={"Cookie": f"fc_session={cookie}"},
        max_queue=None,
    )
    hello = json.loads(await asyncio.wait_for(ws.recv(), 20))
    assert hello["op"] == "hello", hello
    return ws


async def _envelopes(ws: ClientConnection, want: set[bytes], seqs: list[int]) -> set[bytes]:
    """Read frames until every envelope in ``want`` arrived (bounded: 60 s of silence)."""
    got: set[bytes] = set()
    try:
        while not want <= got:
            frame = json.loads(await asyncio.wait_for(ws.recv(), 60))
            if frame["op"] == "envelope":
                got.add(base64.b64decode(frame["data"]))
                seqs.append(frame["seq"])
    except TimeoutError:
        raise AssertionError(f"{len(want - got)} envelopes never reached the socket") from None
    return got


async def test_two_replicas_behind_nginx_with_tls(mosquitto, prefix, pg_url, tmp_path):
    cert, key = self_signed(tmp_path)
    ssl_ctx = client_context(cert)
    gws = [_replica(tmp_path, mosquitto, prefix, pg_url, name) for name in ("gw-a", "gw-b")]
    http_port, https_port = free_port(), free_port()
    nginx = Nginx(
        tmp_path / "nginx",
        render(
            http_port=http_port,
            https_port=https_port,
            upstreams=[g.port for g in gws],
            cert=cert,
            key=key,
        ),
    )
    checked = nginx.check()
    assert checked.returncode == 0, checked.stderr
    base = f"https://127.0.0.1:{https_port}"
    topics = Topics(prefix)
    store = open_store(pg_url)
    sockets: list[ClientConnection] = []
    try:
        for g in gws:
            g.start()
        await asyncio.gather(*(g.healthy() for g in gws))
        nginx.start(https_port)

        # Plain HTTP only redirects to HTTPS.
        async with httpx.AsyncClient(timeout=10) as plain:
            r = await plain.get(f"http://127.0.0.1:{http_port}/v1/me")
            assert r.status_code == 301
            assert r.headers["location"].startswith("https://")

        # Registration and login through the proxy: the Origin check sees the browser's
        # Host, and the session cookie is Secure although the replicas speak plain HTTP.
        web = Party(topics)
        async with httpx.AsyncClient(
            base_url=base, verify=ssl_ctx, timeout=20, headers={"Origin": base}
        ) as http:
            r = await http.post("/v1/accounts", json={"username": "ops", "password": PASSWORD})
            assert r.status_code == 201, r.text
            r = await http.post("/v1/session", json={"username": "ops", "password": PASSWORD})
            assert r.status_code == 200, r.text
            set_cookie = r.headers["set-cookie"].lower()
            assert "secure" in set_cookie
            assert "httponly" in set_cookie
            assert r.headers["strict-transport-security"].startswith("max-age=")
            cookie = http.cookies["fc_session"]
            r = await claim(http, web)  # signed for https://…: the origin the proxy serves
            assert r.status_code == 201, r.text
            # A forged Origin is still refused behind the proxy.
            r = await http.post(
                "/v1/me/participants",
                headers={"Origin": "https://evil.example"},
                json={"bundle": base64.b64encode(web.bundle).decode()},
            )
            assert r.status_code == 403

            # Requests are spread over both replicas; the server-side session is valid on
            # each (one database), so no sticky sessions are needed.
            for _ in range(10):
                r = await http.get("/v1/me")
                assert r.status_code == 200, r.text
            served = [_route_count(await _direct_metrics(g), "/v1/me") for g in gws]
            assert sum(served) == 10
            assert all(n > 0 for n in served), served
            assert (await http.get("/metrics")).status_code == 404  # not exposed publicly
            r = await http.get("/healthz")
            assert r.json() == {"broker": True, "database": True}

        # A device and the web participant share a conversation; the WebSocket through
        # the proxy receives what the device publishes, live.
        device = Party(topics)
        conv = converse(topics, [device, web])
        await publish_all(mosquitto.url, pubs(conv.publications))
        await eventually(lambda: store.roster(conv.cid, 0), "the roster to be archived")
        ws = await _socket(base, ssl_ctx, cookie)
        sockets.append(ws)
        first = [conv.seal(device, f"before {i}") for i in range(N_BEFORE)]
        await publish_all(mosquitto.url, [(topics.msg(conv.cid), s, False) for s in first])
        seqs: list[int] = []
        assert await _envelopes(ws, set(first), seqs) == set(first)
        await ws.close()

        # One replica dies. Every request still gets an answer through the other (NGINX
        # retries a refused connection on the next upstream).
        gws[0].kill()
        async with httpx.AsyncClient(
            base_url=base, verify=ssl_ctx, timeout=20, headers={"Origin": base}
        ) as http:
            http.cookies.set("fc_session", cookie)
            for _ in range(6):
                r = await http.get("/v1/me")
                assert r.status_code == 200, r.text
            r = await http.post("/v1/session", json={"username": "ops", "password": PASSWORD})
            assert r.status_code == 200, r.text
            r = await http.get(f"/v1/conversations/{conv.cid}/envelopes", params={"limit": 50})
            assert r.status_code == 200
            assert len(r.json()["items"]) == N_BEFORE

        # The socket resumes from its cursor on the survivor. Mosquitto 2.0 keeps handing
        # the dead replica's session its share of the envelopes (queued for its return):
        # live delivery continues for the survivor's share at once …
        ws = await _socket(base, ssl_ctx, cookie, cursor=max(seqs))
        sockets.append(ws)
        after = [conv.seal(device, f"after {i}") for i in range(N_AFTER)]
        await publish_all(mosquitto.url, [(topics.msg(conv.cid), s, False) for s in after])
        frame = json.loads(await asyncio.wait_for(ws.recv(), 60))
        while frame["op"] != "envelope":
            frame = json.loads(await asyncio.wait_for(ws.recv(), 60))
        assert base64.b64decode(frame["data"]) in set(after)
        # … and the rest arrives when the replica comes back under the same client id.
        gws[0].start()
        await gws[0].healthy()
        rest = set(after) - {base64.b64decode(frame["data"])}
        assert await _envelopes(ws, rest, seqs) >= rest
        rows = await eventually(
            lambda: _history(store, conv.cid, N_BEFORE + N_AFTER),
            "every envelope archived",
            timeout=60,
        )
        assert sorted(r.data for r in rows) == sorted(first + after)  # each exactly once
    finally:
        for ws in sockets:
            await ws.close()
        nginx.stop()
        for g in gws:
            g.stop()
        await store.close()


async def _history(store: Any, cid: str, n: int) -> list[Any] | None:
    rows = await store.history(cid, after=0, limit=500)
    return rows if len(rows) >= n else None

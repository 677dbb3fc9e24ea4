"""The HTTP API: accounts, sessions, CSRF, login limits, bad queries, admin bootstrap,
health and metrics."""

from __future__ import annotations

import asyncio
import base64

import httpx
import pytest
import uvicorn
from typer.testing import CliRunner

from fieldchat.cli import app as cli
from fieldchat.gateway import GatewaySettings, create_app
from fieldchat.schemas import Topics
from tests.gateway._support import (
    FAST_ARGON2,
    Party,
    claim,
    converse,
    eventually,
    free_port,
    login,
    make_settings,
    publish_all,
    pubs,
    serve_gateway,
)

pytestmark = pytest.mark.mosquitto


async def test_session_cookie_is_httponly_strict_and_secure_with_tls(gateway):
    async with gateway.client() as http:
        await http.post("/v1/accounts", json={"username": "carol", "password": "long enough pw"})
        r = await http.post("/v1/session", json={"username": "carol", "password": "long enough pw"})
        assert r.status_code == 200
        cookie = r.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie
        assert "secure" not in cookie  # plain HTTP in this test
        assert (await http.get("/v1/me")).json()["username"] == "carol"
        assert (await http.delete("/v1/session")).status_code == 204
        assert (await http.get("/v1/me")).status_code == 401


async def test_secure_cookie_when_configured(mosquitto, prefix, tmp_path):
    settings = make_settings(
        mosquitto, prefix, f"sqlite:///{tmp_path / 'h.db'}", cookie_secure=True
    )
    async with serve_gateway(settings) as gw, gw.client() as http:
        await http.post("/v1/accounts", json={"username": "dave", "password": "long enough pw"})
        r = await http.post("/v1/session", json={"username": "dave", "password": "long enough pw"})
        assert "secure" in r.headers["set-cookie"].lower()


async def test_wrong_passwords_at_a_high_rate_are_limited(gateway):
    async with gateway.client() as http:
        await http.post("/v1/accounts", json={"username": "erin", "password": "the real one!"})
        codes = [
            (
                await http.post(
                    "/v1/session", json={"username": "erin", "password": f"guess {i:04d}"}
                )
            ).status_code
            for i in range(12)
        ]
        assert codes[:5] == [401] * 5
        assert set(codes[5:]) == {429}
        limited = await http.post(
            "/v1/session", json={"username": "erin", "password": "the real one!"}
        )
        assert limited.status_code == 429  # even the right password waits
        assert int(limited.headers["retry-after"]) >= 1
    m = gateway.state.metrics
    assert (
        m.registry.get_sample_value("fieldchat_gateway_logins_total", {"outcome": "limited"}) >= 7
    )


async def test_csrf_cross_origin_and_form_posts_are_refused(gateway, prefix):
    party = Party(Topics(prefix), post_quantum=False)
    http = await login(gateway, "frank")
    try:
        challenge = (await http.post("/v1/me/participants/challenge", json={})).json()
        body = party.prove(challenge, gateway.base)
        r = await http.post(
            "/v1/me/participants", json=body, headers={"origin": "https://evil.example"}
        )
        assert r.status_code == 403
        r = await http.post(
            "/v1/me/participants",
            content=b"bundle=x",
            headers={"content-type": "application/x-www-form-urlencoded"},
        )
        assert r.status_code == 415
        r = await http.post("/v1/me/participants", json=body, headers={"origin": gateway.base})
        assert r.status_code == 201
        assert (await http.get("/v1/me")).json()["pids"] == [party.pid]
    finally:
        await http.aclose()


async def test_bad_queries_get_clear_errors(gateway, mosquitto, prefix):
    topics = Topics(prefix)
    a, b = Party(topics), Party(topics)
    conv = converse(topics, [a, b])
    await publish_all(mosquitto.url, pubs(conv.publications))
    await eventually(lambda: gateway.state.store.bundle(a.pid), "a's bundle")
    path = f"/v1/conversations/{conv.cid}/envelopes"
    async with gateway.client() as http:
        for query, status in [
            ("before=-1", 422),
            ("after=abc", 422),
            ("before=99999999999999999999999", 422),
            ("limit=1000000", 422),
            ("limit=0", 422),
            ("before=1&after=1", 400),
            ("from_epoch=1", 400),
            ("after=0&from_epoch=-1", 422),
            ("after=0&from_epoch=abc", 422),
        ]:
            r = await http.get(
                f"{path}?{query}", headers=a.sign_request("GET", path, query, host=gateway.host)
            )
            assert r.status_code == status, (query, r.text)
            assert "error" in r.json() or "detail" in r.json()
        r = await http.get(
            "/v1/conversations/not-an-id/envelopes",
            headers=a.sign_request(
                "GET", "/v1/conversations/not-an-id/envelopes", host=gateway.host
            ),
        )
        assert r.status_code == 422
        assert (await http.get(path)).status_code == 401  # no credentials
        forged = a.sign_request("GET", path, host=gateway.host)
        forged["x-fieldchat-pid"] = b.pid  # a's signature, b's name
        assert (await http.get(path, headers=forged)).status_code == 401
        stale = a.sign_request("GET", path, host=gateway.host)
        stale["x-fieldchat-time"] = "1000"
        assert (await http.get(path, headers=stale)).status_code == 401
        assert (
            await http.get(path, headers=a.sign_request("GET", path, host=gateway.host))
        ).status_code == 200
        query = "after=0&from_epoch=7"  # an epoch not begun yet: nothing, cursor kept
        r = await http.get(
            f"{path}?{query}", headers=a.sign_request("GET", path, query, host=gateway.host)
        )
        assert r.status_code == 200
        assert (r.json()["items"], r.json()["next_after"]) == ([], 0)


async def test_another_accounts_cookie_cannot_read_a_conversation(gateway, mosquitto, prefix):
    topics = Topics(prefix)
    alice, bob, mallory = (Party(topics) for _ in range(3))
    conv = converse(topics, [alice, bob])
    await publish_all(mosquitto.url, pubs(conv.publications))
    await publish_all(mosquitto.url, [(topics.msg(conv.cid), conv.seal(alice, "hi"), False)])
    await eventually(lambda: gateway.state.store.history(conv.cid), "the envelope")
    bob_http = await login(gateway, "bob", bob)
    mallory_http = await login(gateway, "mallory", mallory)
    try:
        path = f"/v1/conversations/{conv.cid}/envelopes"
        assert (await bob_http.get(path)).status_code == 200
        r = await mallory_http.get(path)
        assert r.status_code == 403
        assert r.json()["error"] == "forbidden"
        assert (await mallory_http.get(f"/v1/conversations/{conv.cid}/rosters")).status_code == 403
        assert (await mallory_http.get("/v1/conversations")).json()["conversations"] == {}
        assert conv.cid in (await bob_http.get("/v1/conversations")).json()["conversations"]
        # mallory cannot claim bob's participant either: she cannot sign for it, and
        # bob's other account, which can, finds it taken
        challenge = (await mallory_http.post("/v1/me/participants/challenge", json={})).json()
        forged = mallory.prove(challenge, gateway.base)  # her signature, bob's bundle
        forged["bundle"] = base64.b64encode(bob.bundle).decode()
        r = await mallory_http.post("/v1/me/participants", json=forged)
        assert r.status_code == 403 and r.json()["error"] == "claim_refused"
        bob_again = await login(gateway, "bob2")
        try:
            assert (await claim(bob_again, bob)).status_code == 409
        finally:
            await bob_again.aclose()
    finally:
        await bob_http.aclose()
        await mallory_http.aclose()


async def test_admin_bootstrap_from_the_cli(mosquitto, prefix, tmp_path):
    url = f"sqlite:///{tmp_path / 'admin.db'}"
    args = [
        "gateway",
        "create-admin",
        "--username",
        "root-admin",
        "--database-url",
        url,
        "--password-stdin",
    ]
    result = await asyncio.to_thread(CliRunner().invoke, cli, args, input="admin password 1\n")
    assert result.exit_code == 0, result.output
    assert "admin password" not in result.output
    again = await asyncio.to_thread(CliRunner().invoke, cli, args, input="admin password 1\n")
    assert again.exit_code == 1 and "taken" in again.output
    settings = make_settings(mosquitto, prefix, url, allow_registration=False)
    async with serve_gateway(settings) as gw, gw.client() as http:
        assert (
            await http.post("/v1/accounts", json={"username": "x" * 5, "password": "y" * 10})
        ).status_code == 403
        r = await http.post(
            "/v1/session", json={"username": "root-admin", "password": "admin password 1"}
        )
        assert r.status_code == 200 and r.json()["is_admin"]
        r = await http.post(
            "/v1/admin/accounts", json={"username": "worker", "password": "worker password"}
        )
        assert r.status_code == 201
        names = [a["username"] for a in (await http.get("/v1/admin/accounts")).json()]
        assert names == ["root-admin", "worker"]
    async with serve_gateway(settings) as gw, gw.client() as http:
        await http.post("/v1/session", json={"username": "worker", "password": "worker password"})
        assert (await http.get("/v1/admin/accounts")).status_code == 403


async def test_health_metrics_and_openapi(gateway):
    async with gateway.client() as http:
        r = await http.get("/healthz")
        assert r.status_code == 200 and r.json() == {"broker": True, "database": True}
        text = (await http.get("/metrics")).text
        for name in (
            "fieldchat_gateway_envelopes_archived_total",
            "fieldchat_gateway_ws_clients",
            "fieldchat_gateway_archive_lag_seconds",
            "fieldchat_gateway_http_request_seconds_bucket",
        ):
            assert name in text
        paths = (await http.get("/openapi.json")).json()["paths"]
        assert "/v1/conversations/{cid}/envelopes" in paths and "/v1/grants" in paths


async def test_health_reports_an_unreachable_broker(tmp_path, prefix):
    settings = GatewaySettings(
        mqtt_url=f"mqtt://127.0.0.1:{free_port()}",
        topic_prefix=prefix,
        database_url=f"sqlite:///{tmp_path / 'h.db'}",
        **FAST_ARGON2,
    )
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings), host="127.0.0.1", port=0, log_level="warning")
    )
    task = asyncio.create_task(server.serve())
    await eventually(lambda: server.started, "uvicorn")
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        async with httpx.AsyncClient() as http:
            r = await http.get(f"http://127.0.0.1:{port}/healthz")
        assert r.status_code == 503 and r.json() == {"broker": False, "database": True}
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 30)

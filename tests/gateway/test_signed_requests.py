"""Participant-signed requests (``fieldchat-http-v2``) are bound to the gateway's host
and accepted once: a recorded request replayed to the same gateway, to another replica
on the same database, or to another gateway is refused (issue 13, item 1)."""

from __future__ import annotations

import asyncio

import pytest

from fieldchat.device.history import GatewayHistory
from fieldchat.gateway import TooManyRequests
from fieldchat.gateway._auth import ReplayGuard
from tests.gateway._support import (
    archived_conversation,
    eventually,
    make_settings,
    serve_gateway,
)

pytestmark = pytest.mark.mosquitto


async def test_a_replayed_signed_request_is_refused(gateway, mosquitto, prefix):
    a, conv = await archived_conversation(gateway, mosquitto, prefix)
    path = f"/v1/conversations/{conv.cid}/envelopes"
    headers = a.sign_request("GET", path, host=gateway.host)
    async with gateway.client() as http:
        assert (await http.get(path, headers=headers)).status_code == 200
        r = await http.get(path, headers=headers)  # recorded and replayed
        assert r.status_code == 401
        assert (await http.get(path, headers=headers)).status_code == 401
        assert (
            await http.get(path, headers=a.sign_request("GET", path, host=gateway.host))
        ).status_code == 200
        unsigned_nonce = a.sign_request("GET", path, host=gateway.host)
        del unsigned_nonce["x-fieldchat-nonce"]
        assert (await http.get(path, headers=unsigned_nonce)).status_code == 401
    metrics = gateway.state.metrics
    assert metrics.rejected_count("http", "replay") == 2
    assert metrics.rejected_count("http", "nonce") == 1


async def test_a_request_signed_for_another_host_is_refused(gateway, mosquitto, prefix):
    a, conv = await archived_conversation(gateway, mosquitto, prefix)
    path = f"/v1/conversations/{conv.cid}/envelopes"
    async with gateway.client() as http:
        for host in ("other.example", "127.0.0.1:1", "127.0.0.1"):
            r = await http.get(path, headers=a.sign_request("GET", path, host=host))
            assert r.status_code == 401, host
        # the Host header is what counts when public_origin is unset
        r = await http.get(
            path,
            headers={**a.sign_request("GET", path, host="other.example"), "host": "other.example"},
        )
        assert r.status_code == 200
    assert gateway.state.metrics.rejected_count("http", "auth") == 3


async def test_with_a_public_origin_its_host_is_signed_whatever_the_host_header(
    mosquitto, prefix, tmp_path
):
    settings = make_settings(
        mosquitto, prefix, f"sqlite:///{tmp_path / 'h.db'}", public_origin="https://chat.example"
    )
    async with serve_gateway(settings) as gw:
        a, conv = await archived_conversation(gw, mosquitto, prefix)
        path = f"/v1/conversations/{conv.cid}/envelopes"
        async with gw.client() as http:  # Host: 127.0.0.1:port, as a proxy might rewrite it
            r = await http.get(path, headers=a.sign_request("GET", path, host="chat.example"))
            assert r.status_code == 200
            r = await http.get(path, headers=a.sign_request("GET", path, host=gw.host))
            assert r.status_code == 401


@pytest.mark.postgres
async def test_a_replay_to_another_replica_is_refused(mosquitto, prefix, pg_url):
    """Two gateways on one PostgreSQL behind one public name: a request accepted by one
    is refused by the other (the nonce table is shared)."""
    shared = {"public_origin": "https://chat.example"}
    first = make_settings(mosquitto, prefix, pg_url, **shared)
    second = make_settings(mosquitto, prefix, pg_url, **shared)
    async with serve_gateway(first) as gw1, serve_gateway(second) as gw2:
        a, conv = await archived_conversation(gw1, mosquitto, prefix)
        await eventually(lambda: gw2.state.store.bundle(a.pid), "the bundle on the second")
        path = f"/v1/conversations/{conv.cid}/envelopes"
        headers = a.sign_request("GET", path, host="chat.example")
        async with gw1.client() as one, gw2.client() as two:
            assert (await one.get(path, headers=headers)).status_code == 200
            assert (await two.get(path, headers=headers)).status_code == 401
        assert gw2.state.metrics.rejected_count("http", "replay") == 1


async def test_the_device_client_signs_what_the_gateway_checks(gateway, mosquitto, prefix):
    a, conv = await archived_conversation(gateway, mosquitto, prefix)
    history = GatewayHistory(gateway.base + "/", a.engine.identity)
    envelopes, cursor, more = await asyncio.to_thread(history.since, conv.cid, 0, 50)
    assert len(envelopes) == 1 and cursor > 0 and not more
    envelopes, _, _ = await asyncio.to_thread(
        history.since, conv.cid, 0, 50
    )  # a new nonce each time
    assert len(envelopes) == 1


async def test_the_replay_guard_is_bounded_per_participant_and_in_time(store):
    """``per_pid`` unexpired nonces per participant (then 429 until the oldest expire);
    the memory map refuses a replay at once and the database refuses one the memory
    forgot (another replica's, or after eviction)."""
    now = [1_800_000_000.0]
    guard = ReplayGuard(store, per_pid=3, max_in_memory=3, clock=lambda: now[0])
    pid, other = "a" * 26, "b" * 26
    for n in range(3):
        assert await guard.check(pid, f"nonce-{n:012d}", now[0] + 300)
    assert not await guard.check(pid, "nonce-000000000000", now[0] + 300)  # replay
    with pytest.raises(TooManyRequests) as full:
        await guard.check(pid, "nonce-000000000003", now[0] + 300)
    assert 299 <= full.value.retry_after <= 300
    assert await guard.check(other, "nonce-000000000000", now[0] + 300)  # others unaffected
    # memory holds 3: the other's nonce pushed pid's out of it; the database still refuses
    assert not await guard.check(pid, "nonce-000000000001", now[0] + 300)
    fresh = ReplayGuard(store, per_pid=3, clock=lambda: now[0])  # another replica
    assert not await fresh.check(other, "nonce-000000000000", now[0] + 300)
    now[0] += 301  # every TIME has left the window
    assert await guard.check(pid, "nonce-000000000003", now[0] + 300)
    assert await fresh.check(other, "nonce-000000000000", now[0] + 300)  # may be reused

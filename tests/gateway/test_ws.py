"""The WebSocket bridge: a browser participant (the real engine without ML-KEM) sends
what it sealed and receives its conversations live, resumes from a cursor, and bad
frames are refused and counted."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import time
import uuid
from typing import Any

import aiomqtt
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from fieldchat.schemas import Envelope, TextMessage, Topics
from tests.gateway._support import (
    Party,
    converse,
    eventually,
    login,
    publish_all,
    pubs,
)

pytestmark = pytest.mark.mosquitto


class Browser:
    """A WebSocket client with the account's session cookie."""

    def __init__(
        self,
        gw,
        http,
        cursor: int | None = None,
        grant_cursor: int | None = None,
        *,
        batch: bool = False,
    ):
        query = ["batch=1"] if batch else []
        if cursor is not None:
            query.append(f"cursor={cursor}")
        if grant_cursor is not None:
            query.append(f"grant_cursor={grant_cursor}")
        self.url = f"{gw.ws_base}/ws" + ("?" + "&".join(query) if query else "")
        self.headers = {"Cookie": f"fc_session={http.cookies.get('fc_session')}"}
        self.ws: ClientConnection | None = None
        # frames that came before the ack a publish waited for
        self.early: list[dict[str, Any]] = []

    async def __aenter__(self):
        self.ws = await connect(self.url, additional_headers=self.headers)
        return self

    async def __aexit__(self, *exc):
        assert self.ws is not None
        await self.ws.close()

    async def next(self, op: str | None = None, timeout: float = 20) -> dict[str, Any]:
        for i, frame in enumerate(self.early):
            if op is None or frame["op"] == op:
                del self.early[: i + 1]  # as next() would have skipped the others
                return frame
        self.early.clear()
        assert self.ws is not None
        end = time.monotonic() + timeout
        while True:
            frame = json.loads(await asyncio.wait_for(self.ws.recv(), end - time.monotonic()))
            if op is None or frame["op"] == op:
                return frame

    async def publish(self, kind: str, data: bytes, **fields) -> dict[str, Any]:
        ref = uuid.uuid4().hex[:8]
        assert self.ws is not None
        await self.ws.send(
            json.dumps(
                {
                    "op": "publish",
                    "id": ref,
                    "kind": kind,
                    "data": base64.b64encode(data).decode(),
                    **fields,
                }
            )
        )
        while True:
            frame = json.loads(await asyncio.wait_for(self.ws.recv(), 20))
            if frame.get("id") == ref and frame["op"] in ("ack", "error"):
                return frame
            # An envelope may be archived and fanned out before the broker's PUBACK
            # reaches the gateway (a fast SQLite commit): keep it for next().
            self.early.append(frame)


async def setup(gateway, mosquitto, prefix):
    topics = Topics(prefix)
    device = Party(topics)
    browser = Party(topics)  # a browser: WebCrypto ML-KEM-768 (PROTOCOL.md §2.1)
    http = await login(gateway, f"web{uuid.uuid4().hex[:6]}", browser)
    conv = converse(topics, [device, browser])
    await publish_all(mosquitto.url, pubs(conv.publications))
    await eventually(
        lambda: gateway.state.store.conversations_of([browser.pid]), "the roster to be archived"
    )
    return topics, device, browser, http, conv


async def test_browser_sends_sealed_envelopes_and_receives_live(gateway, mosquitto, prefix):
    topics, device, browser, http, conv = await setup(gateway, mosquitto, prefix)
    host, port = mosquitto.url.removeprefix("mqtt://").split(":")
    try:
        async with (
            aiomqtt.Client(host, int(port)) as listener,
            Browser(gateway, http, grant_cursor=0) as web,
        ):
            await listener.subscribe(topics.msg(conv.cid), qos=1)
            hello = await web.next("hello")
            assert hello["pids"] == [browser.pid]
            assert sorted(hello["conversations"][conv.cid]) == sorted([device.pid, browser.pid])
            grant = await web.next("grant")  # the device's chain, for the browser
            assert browser.engine.handle_grant(base64.b64decode(grant["data"])).cid == conv.cid
            await web.next("caught_up")

            # a device's message arrives live, with its cursor
            await publish_all(
                mosquitto.url, [(topics.msg(conv.cid), conv.seal(device, "hello web"), False)]
            )
            frame = await web.next("envelope")
            opened = browser.engine.open(conv.cid, base64.b64decode(frame["data"]))
            assert opened is not None and opened.message.text == "hello web"
            assert frame["seq"] > 0 and frame["sender_pid"] == device.pid

            # the browser sends what it sealed; the gateway publishes it for it
            sealed = browser.engine.seal(conv.cid, TextMessage(sent_at=1, text="hello device"))
            assert (await web.publish("msg", sealed, cid=conv.cid))["op"] == "ack"
            async for message in listener.messages:
                if message.payload == sealed:
                    break
            opened = device.engine.open(conv.cid, sealed)
            assert opened is not None and opened.message.text == "hello device"
            echoed = await web.next("envelope")  # archived, then fanned out (own echo)
            assert base64.b64decode(echoed["data"]) == sealed
            assert echoed["seq"] > frame["seq"]

            # presence of the device
            await publish_all(mosquitto.url, [(topics.status(device.pid), b"online", True)])
            presence = await web.next("presence")
            assert presence == {
                "op": "presence",
                "pid": device.pid,
                "status": base64.b64encode(b"online").decode(),
            }
    finally:
        await http.aclose()
    await eventually(
        lambda: gateway.state.metrics.ws_clients._value.get() == 0, "the socket to be unsubscribed"
    )


async def test_resume_from_a_cursor_misses_nothing(gateway, mosquitto, prefix):
    topics, device, browser, http, conv = await setup(gateway, mosquitto, prefix)
    msg = topics.msg(conv.cid)
    try:
        async with Browser(gateway, http) as web:
            await web.next("caught_up")
            await publish_all(mosquitto.url, [(msg, conv.seal(device, "one"), False)])
            cursor = (await web.next("envelope"))["seq"]
        missed = [conv.seal(device, f"missed {i}") for i in range(3)]
        await publish_all(mosquitto.url, [(msg, m, False) for m in missed])
        await eventually(lambda: _count(gateway, conv.cid, 4), "the missed envelopes")
        async with Browser(gateway, http, cursor=cursor) as web:
            assert (await web.next("hello"))["cursor"] == cursor
            got = [base64.b64decode((await web.next("envelope"))["data"]) for _ in missed]
            assert got == missed
            assert (await web.next("caught_up"))["cursor"] > cursor
            live = conv.seal(device, "after resume")
            await publish_all(mosquitto.url, [(msg, live, False)])
            assert base64.b64decode((await web.next("envelope"))["data"]) == live
    finally:
        await http.aclose()


async def _count(gw, cid, n):
    return len(await gw.state.store.history(cid, after=0, limit=100)) >= n


async def test_bad_frames_and_forged_envelopes_are_refused(gateway, mosquitto, prefix):
    topics, device, browser, http, conv = await setup(gateway, mosquitto, prefix)
    m = gateway.state.metrics
    try:
        async with Browser(gateway, http) as web:
            await web.next("caught_up")
            theirs = conv.seal(device, "not yours to send")
            assert (await web.publish("msg", theirs, cid=conv.cid))["reason"] == "forbidden"
            mine = Envelope.from_bytes(
                browser.engine.seal(conv.cid, TextMessage(sent_at=1, text="x"))
            )
            forged = dataclasses.replace(mine, step=mine.step + 50).to_bytes()
            assert (await web.publish("msg", forged, cid=conv.cid))["reason"] == "auth"
            unsigned = dataclasses.replace(mine, signature=None).to_bytes()
            assert (await web.publish("msg", unsigned, cid=conv.cid))["reason"] == "unsigned"
            assert (await web.publish("msg", b"\x07junk", cid=conv.cid))["reason"] == "version"
            assert (await web.publish("msg", mine.to_bytes(), cid="nope"))["reason"] == "invalid_id"
            assert (await web.publish("teleport", b"x"))["reason"] == "bad_frame"
            await web.ws.send("this is not json")
            assert (await web.next("error"))["reason"] == "bad_frame"
            await web.ws.send(b"\x00binary")
            assert (await web.next("error"))["reason"] == "bad_frame"
            await web.ws.send(json.dumps({"op": "publish", "kind": "msg", "data": "%%%"}))
            assert (await web.next("error"))["reason"] == "bad_frame"
            # nothing valid is lost: the real envelope still goes through
            good = browser.engine.seal(conv.cid, TextMessage(sent_at=2, text="still fine"))
            assert (await web.publish("msg", good, cid=conv.cid))["op"] == "ack"
            await eventually(lambda: _has(gateway, conv.cid, good), "the good envelope")
            # enough garbage closes the socket
            with pytest.raises(ConnectionClosed) as closed:
                await _send_garbage(web, 40)
            assert closed.value.rcvd is not None
            assert closed.value.rcvd.code == 1008
        for reason in ("forbidden", "auth", "unsigned", "bad_frame"):
            assert m.rejected_count("ws", reason) >= 1, reason
        assert await _count_exact(gateway, conv.cid) == 1  # only the good one was archived
    finally:
        await http.aclose()


async def _send_garbage(web, count):
    for _ in range(count):
        await web.ws.send("{]")
        await web.next("error")


async def _has(gw, cid, data):
    return any(e.data == data for e in await gw.state.store.history(cid, after=0, limit=100))


async def _count_exact(gw, cid):
    return len(await gw.state.store.history(cid, after=0, limit=100))


async def test_unauthenticated_and_cross_origin_sockets_are_refused(gateway):
    with pytest.raises(InvalidStatus) as refused:
        async with connect(f"{gateway.ws_base}/ws"):
            pass
    assert refused.value.response.status_code == 403
    http = await login(gateway, "olivia")
    try:
        headers = {
            "Cookie": f"fc_session={http.cookies.get('fc_session')}",
            "Origin": "https://evil.example",
        }
        with pytest.raises(InvalidStatus):
            async with connect(f"{gateway.ws_base}/ws", additional_headers=headers):
                pass
        with pytest.raises(InvalidStatus):
            async with connect(
                f"{gateway.ws_base}/ws?cursor=-5", additional_headers={"Cookie": headers["Cookie"]}
            ):
                pass
    finally:
        await http.aclose()
    m = gateway.state.metrics
    assert m.rejected_count("ws", "unauthenticated") == 1
    assert m.rejected_count("ws", "origin") == 1


async def test_a_batching_client_gets_a_burst_as_one_array_in_order(gateway, mosquitto, prefix):
    """``batch=1``: events that wait together for one socket leave as one JSON array
    (one send); every envelope still arrives once, in seq order."""
    topics, device, browser, http, conv = await setup(gateway, mosquitto, prefix)
    sealed = [conv.seal(device, f"burst {i}") for i in range(30)]
    try:
        async with Browser(gateway, http, batch=True) as web:
            await web.next("caught_up")
            await publish_all(mosquitto.url, [(topics.msg(conv.cid), s, False) for s in sealed])
            frames: list[dict[str, Any]] = []
            arrays = 0
            async with asyncio.timeout(30):
                while len([f for f in frames if f["op"] == "envelope"]) < len(sealed):
                    parsed = json.loads(await web.ws.recv())
                    if isinstance(parsed, list):
                        arrays += 1
                        frames += parsed
                    else:
                        frames.append(parsed)
            envelopes = [f for f in frames if f["op"] == "envelope"]
            assert [base64.b64decode(f["data"]) for f in envelopes] == sealed
            seqs = [f["seq"] for f in envelopes]
            assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
            assert arrays >= 1  # the burst did not take 30 sends
    finally:
        await http.aclose()


@pytest.mark.parametrize("size", [0, 125, 126, 65_535, 65_536])
def test_direct_frames_are_the_bytes_websockets_would_write(size):
    """The fan-out writes ready-made frames (``gateway._ws._wire``): they must be what the
    websockets library serialises for a server's text frame, at every length encoding."""
    from websockets.frames import OP_TEXT, Frame

    from fieldchat.gateway._ws import _wire

    text = "é" * (size // 2) + "x" * (size % 2)
    assert _wire(text) == Frame(OP_TEXT, text.encode()).serialize(mask=False)


async def test_a_closed_tab_goes_offline_when_its_last_socket_closes(gateway, mosquitto, prefix):
    topics, device, browser, http, conv = await setup(gateway, mosquitto, prefix)
    presence = gateway.state.hub.presence_of

    async def announce(web: Browser) -> None:
        await web.next("caught_up")
        assert (await web.publish("status", b"online", pid=browser.pid))["op"] == "ack"

    try:
        async with Browser(gateway, http) as first:
            await announce(first)
            async with Browser(gateway, http) as second:  # the same participant, two tabs
                await announce(second)
                await eventually(lambda: presence.get(browser.pid) == b"online", "online")
            await asyncio.sleep(0.5)  # one tab closed: the other still shows it online
            assert presence.get(browser.pid) == b"online"
    finally:
        await http.aclose()
    # the last tab closed: "offline", retained for whoever connects later
    await eventually(lambda: presence.get(browser.pid) == b"offline", "offline after close")
    host, port = mosquitto.url.removeprefix("mqtt://").split(":")
    async with aiomqtt.Client(host, int(port)) as late:
        await late.subscribe(topics.status(browser.pid), qos=1)
        async for message in late.messages:
            assert message.retain and message.payload == b"offline"
            break


async def test_a_peer_added_later_shows_its_presence_at_once(gateway, mosquitto, prefix):
    topics, device, browser, http, conv = await setup(gateway, mosquitto, prefix)
    newcomer = Party(topics)
    await publish_all(mosquitto.url, [(topics.status(newcomer.pid), b"online", True)])
    await eventually(
        lambda: gateway.state.hub.presence_of.get(newcomer.pid) == b"online", "newcomer status"
    )
    try:
        async with Browser(gateway, http) as web:
            await web.next("caught_up")
            # a new conversation with the newcomer while the browser stays connected
            later = converse(topics, [newcomer, browser])
            await publish_all(mosquitto.url, pubs(later.publications))
            frame = await web.next("presence")
            assert frame["pid"] == newcomer.pid
            assert base64.b64decode(frame["status"]) == b"online"
    finally:
        await http.aclose()

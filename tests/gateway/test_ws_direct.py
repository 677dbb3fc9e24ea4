"""The /ws fan-out's direct writes reach into uvicorn's websockets-sansio protocol
(gateway._ws._Direct): guarded in one place (issue 15 item 5).

If the first test fails after upgrading uvicorn (or websockets, which aMQTT pins), its
message names the attribute that changed: adapt gateway._ws.DIRECT_NEEDS and _Direct.
Until then the gateway still works (every frame through the ASGI send), only slower.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import types
from collections.abc import AsyncIterator
from typing import Any

import pytest
import uvicorn
import websockets

import fieldchat.gateway._ws as ws_module
from fieldchat.gateway._ws import DIRECT_NEEDS, _Direct, _wire, direct_missing


class _Probe:
    """A bare ASGI app: on each WebSocket, a frame written directly, then one through
    the ASGI send; it reports what :func:`direct_missing` found on the live protocol."""

    def __init__(self) -> None:
        self.found: asyncio.Future[tuple[list[str], bool]] | None = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        assert scope["type"] == "websocket"
        await receive()  # websocket.connect
        await send({"type": "websocket.accept"})
        missing = direct_missing(getattr(send, "__self__", None))
        wrote = _Direct(send).write(_wire("direct"))
        if not wrote:
            await send({"type": "websocket.send", "text": "direct"})
        await send({"type": "websocket.send", "text": "asgi"})
        assert self.found is not None
        self.found.set_result((missing, wrote))
        while (await receive())["type"] != "websocket.disconnect":
            pass


@contextlib.asynccontextmanager
async def _served(app: _Probe) -> AsyncIterator[int]:
    config = uvicorn.Config(
        app, host="127.0.0.1", port=0, ws="websockets-sansio", log_level="warning", lifespan="on"
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        async with asyncio.timeout(10):
            while not server.started:
                await asyncio.sleep(0.01)
        yield server.servers[0].sockets[0].getsockname()[1]
    finally:
        server.should_exit = True
        await task


async def test_uvicorn_still_has_what_the_direct_writer_reads():
    app = _Probe()
    app.found = asyncio.get_running_loop().create_future()
    async with _served(app) as port, websockets.connect(f"ws://127.0.0.1:{port}") as client:
        async with asyncio.timeout(10):
            missing, wrote = await app.found
            frames = [await client.recv(), await client.recv()]
    assert missing == [], (
        f"uvicorn {uvicorn.__version__} changed WebSocketsSansIOProtocol: no {missing} "
        f"(gateway._ws.DIRECT_NEEDS lists what _Direct reads: {sorted(DIRECT_NEEDS)})"
    )
    assert wrote  # the frame went straight to the transport…
    assert frames == ["direct", "asgi"]  # …and arrived as a frame, in order with the ASGI one


def test_a_changed_uvicorn_protocol_falls_back_to_the_asgi_send(monkeypatch, caplog):
    sansio = ws_module._SansIO  # type: ignore[attr-defined]  # uvicorn's class, as _ws got it
    assert sansio is not None
    bare = sansio.__new__(sansio)  # uvicorn's class, none of the attributes we read
    send = types.MethodType(lambda _self, _message: None, bare)
    monkeypatch.setattr(ws_module, "_warned_missing", False)
    with caplog.at_level(logging.WARNING, logger="fieldchat.gateway.ws"):
        direct = _Direct(send)
        _Direct(send)  # one warning per process, not per socket
    assert direct.write(b"\x81\x00") is False
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1
    assert "close_sent, handshake_complete, writable, transport" in warnings[0]


@pytest.mark.parametrize("raw_send", [None, object(), print])
def test_another_server_gets_every_frame_through_the_asgi_send(raw_send):
    assert direct_missing(getattr(raw_send, "__self__", None)) == ["WebSocketsSansIOProtocol"]
    assert _Direct(raw_send).write(b"\x81\x00") is False

"""device.history.GatewayHistory: signed requests, and clear errors for bad answers.

The end-to-end path (a device joins late and reads what was sent before) runs in
tests/fieldchat/test_up.py against the real gateway.
"""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest

from fieldchat.device.history import GatewayHistory
from fieldchat.device.identity import Identity
from fieldchat.gateway import signed_message
from fieldchat.schemas import ConfigError, NotAuthorized, TransportError, WireError
from fieldchat.schemas.crypto import ed25519_verify

CID = "a" * 26


class _Gateway(BaseHTTPRequestHandler):
    answers: ClassVar[list[tuple[int, bytes]]] = []
    seen: ClassVar[list[tuple[str, dict[str, str]]]] = []

    def do_GET(self) -> None:
        self.seen.append((self.path, dict(self.headers)))
        status, body = self.answers.pop(0)
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def gateway() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Gateway)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _Gateway.answers, _Gateway.seen = [], []
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def page(envelopes: list[bytes], next_after: int, more: bool) -> bytes:
    items = [{"envelope": base64.b64encode(e).decode()} for e in envelopes]
    return json.dumps({"items": items, "next_after": next_after, "more": more}).encode()


def test_pages_are_followed_signed_and_the_cursor_is_kept(gateway):
    me = Identity.generate(post_quantum=False)
    history = GatewayHistory(gateway, me, clock=lambda: 1_800_000_000)
    _Gateway.answers = [
        (200, page([b"one"], 7, True)),
        (200, page([b"two"], 9, False)),
        (200, page([], 9, False)),
    ]
    assert history.conversation(CID) == [b"one", b"two"]
    assert history.conversation(CID) == []
    paths = [path for path, _ in _Gateway.seen]
    assert paths[0].endswith("after=0&limit=500") and paths[2].endswith("after=9&limit=500")
    host = gateway.removeprefix("http://").rstrip("/")
    nonces = set()
    for path, headers in _Gateway.seen:
        assert headers["X-Fieldchat-Pid"] == me.pid
        assert headers["Host"] == host
        nonce = headers["X-Fieldchat-Nonce"]
        nonces.add(nonce)
        signature = base64.urlsafe_b64decode(headers["X-Fieldchat-Signature"] + "==")
        signed = f"fieldchat-http-v2\nGET\n{host}\n{path}\n1800000000\n{nonce}".encode()
        ed25519_verify(me.public, signature, signed)
        # the gateway's own spelling of the signed bytes agrees
        query = path.partition("?")[2]
        assert signed == signed_message(
            "GET", path.partition("?")[0], query, "1800000000", host=host, nonce=nonce
        )
    assert len(nonces) == 3  # a fresh nonce per request: the gateway accepts each once


def test_the_signed_host_leaves_out_the_default_port():
    me = Identity.generate(post_quantum=False)
    assert GatewayHistory("https://Chat.Example:443/x", me).host == "chat.example"
    assert GatewayHistory("http://chat.example:80", me).host == "chat.example"
    assert GatewayHistory("http://127.0.0.1:8080/", me).host == "127.0.0.1:8080"
    assert GatewayHistory("http://[::1]:8080/", me).host == "[::1]:8080"
    with pytest.raises(ConfigError):
        GatewayHistory("http://chat.example:http/", me)


def test_since_fetches_one_page_after_the_callers_cursor(gateway):
    """The device's tail checks keep the cursor themselves (in the state file)."""
    history = GatewayHistory(gateway, Identity.generate(post_quantum=False))
    _Gateway.answers = [(200, page([b"three"], 12, True)), (200, page([b"x"], 3, False))]
    assert history.since(CID, 11, 10_000) == ([b"three"], 12, True)
    assert history.since(CID, 2, 1) == ([b"x"], 3, False)
    paths = [path for path, _ in _Gateway.seen]
    assert paths[0].endswith("after=11&limit=500") and paths[1].endswith("after=2&limit=1")


def test_since_names_the_oldest_epoch_the_device_can_open(gateway):
    history = GatewayHistory(gateway, Identity.generate(post_quantum=False))
    _Gateway.answers = [(200, page([], 40, False)), (200, page([], 0, False))]
    assert history.since(CID, 0, 50, from_epoch=3) == ([], 40, False)
    assert history.since(CID, 0, 50, from_epoch=0) == ([], 0, False)
    paths = [path for path, _ in _Gateway.seen]
    assert paths[0].endswith("after=0&limit=50&from_epoch=3")
    assert paths[1].endswith("after=0&limit=50")  # epoch 0: everything, as before


@pytest.mark.parametrize(
    ("status", "body", "error"),
    [
        (403, b"{}", NotAuthorized),
        (500, b"{}", TransportError),
        (200, b"not json", WireError),
        (200, b'{"items": [{"envelope": "!!"}], "next_after": 1, "more": false}', WireError),
    ],
)
def test_bad_answers_are_typed_errors(gateway, status, body, error):
    history = GatewayHistory(gateway, Identity.generate(post_quantum=False))
    _Gateway.answers = [(status, body)]
    with pytest.raises(error):
        history.conversation(CID)


def test_unreachable_gateway_and_bad_urls():
    me = Identity.generate(post_quantum=False)
    with pytest.raises(TransportError):
        GatewayHistory("http://127.0.0.1:9/", me, timeout=2).conversation(CID)
    for url in ("ftp://x", "127.0.0.1:8080", "http://"):
        with pytest.raises(ConfigError):
            GatewayHistory(url, me)


def test_rosters_are_fetched_signed_in_epoch_order(gateway):
    """The chain a device verifies from epoch 0 (PROTOCOL.md §5.2): every archived
    roster, whatever order the gateway lists them in; a bad answer is a typed error."""
    me = Identity.generate(post_quantum=False)
    history = GatewayHistory(gateway, me, clock=lambda: 1_800_000_000)
    items = [
        {"cid": CID, "epoch": epoch, "members": [], "roster": base64.b64encode(data).decode()}
        for epoch, data in ((1, b"one"), (0, b"zero"))
    ]
    _Gateway.answers = [(200, json.dumps(items).encode()), (200, b'[{"epoch": 0}]')]
    assert history.rosters(CID, from_epoch=1) == [b"zero", b"one"]
    path, headers = _Gateway.seen[0]
    assert path == f"/v1/conversations/{CID}/rosters?from_epoch=1"
    signature = base64.urlsafe_b64decode(headers["X-Fieldchat-Signature"] + "==")
    host = gateway.removeprefix("http://").rstrip("/")
    signed = signed_message(
        "GET",
        path.partition("?")[0],
        path.partition("?")[2],
        "1800000000",
        host=host,
        nonce=headers["X-Fieldchat-Nonce"],
    )
    ed25519_verify(me.public, signature, signed)
    with pytest.raises(WireError):
        history.rosters(CID)

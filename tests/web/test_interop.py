"""The browser's engine and Python's exchange messages both ways: rosters, X25519-only
grants in both directions, sealing and opening, and rotation when a member is removed.
The bytes travel through the test process (no network), so a failure here is the
protocol's, not the transport's."""

from __future__ import annotations

from typing import Any

import pytest

from device.engine import Engine, Opened, Publication
from device.identity import Identity
from schemas import Grant, GrantMode, Roster, TextMessage, Topics
from schemas.errors import FieldchatError

pytestmark = pytest.mark.chromium
TOPICS = Topics()


class WebPeer:
    """The JS engine in a page, driven by hex strings."""

    def __init__(self, page: Any) -> None:
        self.page = page
        made = page.evaluate("async () => (await import('/_tests/peer.js')).create()")
        self.pid: str = made["pid"]
        self.bundle = bytes.fromhex(made["bundle"])

    def call(self, name: str, arg: Any = None) -> Any:
        return self.page.evaluate(f"async (a) => globalThis.peer.{name}(a)", arg)

    def learn(self, bundle: bytes) -> str:
        return str(self.call("learnBundle", bundle.hex()))

    def roster(self, data: bytes) -> list[dict[str, Any]]:
        return list(self.call("handleRoster", data.hex()))

    def grant(self, data: bytes) -> dict[str, Any]:
        return dict(self.call("handleGrant", data.hex()))

    def seal(self, cid: str, text: str) -> bytes:
        return bytes.fromhex(self.call("seal", [cid, text]))

    def open(self, cid: str, data: bytes) -> Any:
        """``{sender, text, kind}``, ``{error}`` or None (a duplicate or our own)."""
        return self.call("open", [cid, data.hex()])


@pytest.fixture
def page(browser, stack):
    page = browser.new_page()
    page.goto(f"{stack.base}/_tests/harness.html")
    yield page
    page.close()


def text(opened: Opened | None) -> str:
    assert opened is not None
    assert isinstance(opened.message, TextMessage)
    return opened.message.text


def route(pubs: list[Publication], engines: dict[str, Engine], web: WebPeer) -> None:
    """Deliver Python's grants to their recipients' inboxes (the browser's included)."""
    for p in pubs:
        where = TOPICS.parse(p.topic)
        assert where.kind == "inbox"
        if where.pid == web.pid:
            assert web.grant(p.payload)["installed"]
        else:
            result = engines[str(where.pid)].handle_grant(p.payload)
            assert result.installed or result.needs_roster  # held until its roster comes


def test_python_founds_and_both_sides_talk(page):
    web = WebPeer(page)
    device = Engine(Identity.generate())
    device.learn_bundle(web.bundle)
    assert web.learn(device.identity.bundle.to_bytes()) == "new"
    cid, pubs = device.create_conversation([web.pid])
    roster = Roster.from_bytes(pubs[0].payload)
    assert [m.pq for m in roster.members] == [True, False]  # the roster shows who is PQ
    grant_to_web = next(p for p in pubs if p.topic == TOPICS.inbox(web.pid))
    assert Grant.from_bytes(grant_to_web.payload).mode is GrantMode.X25519
    web_grants = web.roster(roster.to_bytes())
    assert len(web_grants) == 1
    assert web.call("grantMode", web_grants[0]["data"]) == GrantMode.X25519
    assert web.grant(grant_to_web.payload) == {"installed": True, "needsRoster": False}
    # Python accepts the browser's X25519-only grant: the roster says it has no ML-KEM.
    assert device.handle_grant(bytes.fromhex(web_grants[0]["data"])).installed

    for i in range(3):
        sealed = device.seal(cid, TextMessage(sent_at=1700000000 + i, text=f"from python {i} ✓"))
        assert web.open(cid, sealed) == {
            "sender": device.pid,
            "text": f"from python {i} ✓",
            "kind": 1,
        }
    sealed_by_web = [web.seal(cid, f"from the browser {i} <b>") for i in range(3)]
    for i, data in reversed(list(enumerate(sealed_by_web))):  # out of order, too
        opened = device.open(cid, data)
        assert opened is not None
        assert opened.sender == web.pid
        assert opened.message == TextMessage(sent_at=1700000000, text=f"from the browser {i} <b>")
        assert opened.signed
    assert device.open(cid, sealed_by_web[0]) is None  # a replay opens nothing
    assert web.open(cid, sealed_by_web[0]) is None  # its own echo
    tampered = bytearray(device.seal(cid, TextMessage(sent_at=1, text="x")))
    tampered[7] ^= 1
    assert web.open(cid, bytes(tampered)) == {"error": "auth"}


def test_browser_founds_removes_and_the_removed_cannot_read(page):
    web = WebPeer(page)
    alice, bob = Engine(Identity.generate()), Engine(Identity.generate(post_quantum=False))
    engines = {alice.pid: alice, bob.pid: bob}
    for e in engines.values():
        e.learn_bundle(web.bundle)
        web.learn(e.identity.bundle.to_bytes())
        for other in engines.values():
            if other is not e:
                e.learn_bundle(other.identity.bundle.to_bytes())
    made = web.call("create", [alice.pid, bob.pid])
    cid = made["cid"]
    published = made["publications"]
    roster0 = bytes.fromhex(published[0]["data"])
    assert [m.pq for m in Roster.from_bytes(roster0).members] == [False, True, False]
    for e in engines.values():
        route(e.handle_roster(roster0), engines, web)
    for p in published[1:]:
        engines[p["recipient"]].handle_grant(bytes.fromhex(p["data"]))
    hello = web.seal(cid, "hello both")
    assert text(alice.open(cid, hello)) == "hello both"
    assert text(bob.open(cid, hello)) == "hello both"
    assert (
        web.open(cid, bob.seal(cid, TextMessage(sent_at=2, text="bob here")))["text"] == "bob here"
    )

    # The browser (admin) removes bob: a new epoch, new chains for alice and the browser.
    removal = web.call("remove", [cid, [bob.pid]])
    roster1 = bytes.fromhex(removal[0]["data"])
    assert Roster.from_bytes(roster1).pids == (web.pid, alice.pid)
    assert [p["recipient"] for p in removal[1:]] == [alice.pid]  # nothing for bob
    route(alice.handle_roster(roster1), engines, web)
    for p in removal[1:]:
        alice.handle_grant(bytes.fromhex(p["data"]))
    late = bob.seal(cid, TextMessage(sent_at=4, text="late"))  # before bob learns of it
    bob.handle_roster(roster1)
    assert not bob.is_member(cid)

    after = web.seal(cid, "bob must not read this")
    assert text(alice.open(cid, after)) == "bob must not read this"
    with pytest.raises(FieldchatError):
        bob.open(cid, after)
    from_alice = alice.seal(cid, TextMessage(sent_at=3, text="alice after removal"))
    assert web.open(cid, from_alice)["text"] == "alice after removal"
    with pytest.raises(FieldchatError):
        bob.open(cid, from_alice)
    # bob's envelopes of the old epoch are refused by the browser now (stale epoch).
    assert web.open(cid, late) == {"error": "stale_epoch"}

"""The chat page end to end: two people in Chromium and one Python device (paho, its own
SQLite state, ML-KEM) in one conversation through the embedded broker and the gateway."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from tests.web._stack import ARTIFACTS, Stack, wait_until
from tests.web._ui import PHONE, WebUser

pytestmark = pytest.mark.chromium

XSS = "<img src=x onerror=alert(1)>"


def device_texts(device, cid: str) -> list[str]:
    return [r.text for r in device.messages(cid) if r.text is not None]


class Chat:
    def __init__(self, stack: Stack, browser) -> None:
        self.stack = stack
        self.alice = WebUser(browser, stack.base, "alice").register()
        self.bob = WebUser(browser, stack.base, "bob").register()
        self.device = stack.device("pi")
        # The device founds the conversation (default policy: post-quantum members only;
        # both browsers have WebCrypto ML-KEM-768, so every grant is hybrid).
        self.cid = self.device.create_conversation([self.alice.pid, self.bob.pid], timeout=20)
        for user in (self.alice, self.bob):
            user.wait_conversation(self.cid)
            user.open(self.cid)

    def close(self) -> None:
        self.alice.close()
        self.bob.close()


@pytest.fixture
def chat(stack, browser):
    made = Chat(stack, browser)
    yield made
    made.close()


def test_three_participants_live_and_after_reload(chat, stack):
    alice, bob, device, cid = chat.alice, chat.bob, chat.device, chat.cid
    alice.send("hello from alice")
    bob.wait_texts(["hello from alice"])
    bob.send("hello from bob")
    alice.wait_texts(["hello from bob"])
    device.send(cid, "hello from the device ✓")
    expected = ["hello from alice", "hello from bob", "hello from the device ✓"]
    assert alice.wait_texts(expected) == expected
    assert bob.wait_texts(expected) == expected
    wait_until(lambda: device_texts(device, cid) == expected[:2], "the device to read both")
    assert device_texts(device, cid) == expected[:2]

    bob.reload()
    bob.open(cid)
    assert bob.wait_texts(expected) == expected
    alice.reload()
    alice.open(cid)
    assert alice.wait_texts(expected) == expected
    assert not alice.errors and not bob.errors
    alice.wait_state("hello from alice", "delivered")
    ARTIFACTS.mkdir(exist_ok=True)  # for people reviewing changes (gitignored)
    alice.page.screenshot(path=str(ARTIFACTS / "web-conversation.png"))
    assert (ARTIFACTS / "web-conversation.png").stat().st_size > 10_000


def test_markup_is_shown_as_text_and_runs_nothing(chat):
    chat.alice.send(XSS)
    chat.bob.wait_texts([XSS])
    chat.device.send(chat.cid, XSS + " from the device")
    for user in (chat.alice, chat.bob):
        assert user.wait_texts([XSS, XSS + " from the device"])[-2:] == [
            XSS,
            XSS + " from the device",
        ]
        assert user.page.query_selector("#messages img") is None
        assert user.page.evaluate("document.querySelectorAll('#messages *').length") > 0
        assert not user.dialogs
        assert not user.errors


def test_delivery_and_read_state(chat):
    alice, bob, device, cid = chat.alice, chat.bob, chat.device, chat.cid
    bob.page.click("#back")  # bob is not looking at the conversation
    alice.send("did you get this?")
    wait_until(lambda: "did you get this?" in device_texts(device, cid), "the device to get it")
    bob.page.wait_for_selector(f'#conversations li[data-cid="{cid}"] .unread')
    assert bob.unread(cid) == 1
    alice.wait_state("did you get this?", "delivered")  # both the device and bob's browser
    device.mark_read(cid)
    bob.open(cid)
    assert bob.unread(cid) == 0
    alice.wait_state("did you get this?", "read")


def test_presence_of_members(chat):
    # Presence of a member who said "online" before sharing a conversation with alice
    # reaches her when her bridge (re)connects; the gateway does not replay it when a
    # roster adds peers (reported to the gateway, see docs/web.md).
    chat.alice.reload()
    chat.alice.open(chat.cid)
    chat.alice.page.click("#members-toggle")
    row = f'#member-list li[data-pid="{chat.device.pid}"] .dot.online'
    chat.alice.page.wait_for_selector(row)
    chat.alice.page.wait_for_selector(f'#member-list li[data-pid="{chat.bob.pid}"] .dot.online')
    # The roster shows who is post-quantum protected: everyone here (both browsers have
    # WebCrypto ML-KEM-768; one without is shown "X25519 only", see below).
    badges = chat.alice.page.eval_on_selector_all(
        "#member-list li",
        "els => els.map(e => [e.dataset.pid, e.querySelector('.badge.pq') !== null"
        " && e.textContent.includes('post-quantum')])",
    )
    assert dict(badges) == {chat.device.pid: True, chat.alice.pid: True, chat.bob.pid: True}
    chat.device.close()
    chat.alice.page.wait_for_selector(row, state="detached")


def test_removed_member_cannot_read(chat):
    alice, bob, device, cid = chat.alice, chat.bob, chat.device, chat.cid
    alice.send("before the removal")
    bob.wait_texts(["before the removal"])
    device.remove(cid, [bob.pid])
    bob.page.wait_for_selector("#messages li.note")
    alice.page.wait_for_function(
        "n => document.querySelector('#conv-sub').textContent.startsWith(n + ' members')", arg=2
    )
    alice.send("after the removal, from alice")
    device.send(cid, "after the removal, from the device")
    alice.wait_texts(["after the removal, from the device"])
    wait_until(
        lambda: "after the removal, from alice" in device_texts(device, cid),
        "the device to read alice",
    )
    bob.reload()
    bob.open(cid)
    shown = bob.texts()
    assert "before the removal" in shown
    assert not [t for t in shown if "after the removal" in t]
    assert bob.page.is_hidden("#composer")


def test_browser_founds_invites_and_removes(stack, browser):
    alice = WebUser(browser, stack.base, "carol").register()
    bob = WebUser(browser, stack.base, "dave").register()
    eve = WebUser(browser, stack.base, "erin").register()
    try:
        cid = alice.create([bob.pid])
        bob.wait_conversation(cid)
        bob.open(cid)
        bob.send("hi carol")
        alice.wait_texts(["hi carol"])
        alice.page.click("#members-toggle")
        alice.page.fill("#invite-pid", eve.pid)
        alice.page.click("#invite button")
        eve.wait_conversation(cid)
        eve.open(cid)
        alice.send("welcome erin")
        eve.wait_texts(["welcome erin"])
        bob.wait_texts(["welcome erin"])
        alice.page.click(f'#member-list button[data-remove="{bob.pid}"]')
        alice.page.wait_for_selector(f'#member-list li[data-pid="{bob.pid}"]', state="detached")
        alice.send("dave is gone")
        eve.send("erin agrees")
        eve.wait_texts(["dave is gone"])
        alice.wait_texts(["erin agrees"])
        bob.page.wait_for_selector("#messages li.note")
        assert "dave is gone" not in bob.texts()
        assert "erin agrees" not in bob.texts()
        for user in (alice, bob, eve):
            assert not user.errors
    finally:
        for user in (alice, bob, eve):
            user.close()


def test_a_message_written_before_the_epochs_secret_leaves_when_it_comes(stack, browser):
    """A new epoch's roster reaches a member a hop before its secret (the delivery comes
    through the inbox); a message written in between waits for the secret, and the page
    takes the frame that brings it meanwhile. (The wait once held the page's frame queue:
    the delivery stayed behind it until the send gave up, 10 s later, unsent; on a loaded
    machine that is the order test_browser_founds_invites_and_removes met.)"""
    erin = WebUser(browser, stack.base, "erin", relay=True).register()
    try:
        pi = stack.device("pi")
        cid = pi.create_conversation([erin.pid], timeout=20)
        erin.wait_conversation(cid)
        erin.open(cid)
        pi.send(cid, "in epoch 0")
        erin.wait_texts(["in epoch 0"])
        erin.drop = lambda f: f.get("op") == "grant"  # epoch 1's secret, held back
        pi.invite(cid, [stack.device("pump").pid], timeout=20)
        erin.page.wait_for_function(  # erin's page took the roster of epoch 1
            "() => document.querySelector('#conv-sub').textContent.startsWith('3 members')"
        )
        erin.relay_until(lambda: erin.dropped, "the delivery of epoch 1's secret")
        erin.send("written before the secret came")
        erin.drop = lambda f: False
        for frame in erin.dropped:
            erin.inject(frame)
        erin.relay_until(
            lambda: "written before the secret came" in device_texts(pi, cid), "pi to read it"
        )
        assert "written before the secret came" in erin.texts()
        assert erin.page.input_value("#compose") == ""  # not handed back as unsent
        assert not erin.errors
    finally:
        erin.close()


def test_no_plaintext_in_the_database_or_on_the_wire(chat, stack):
    secrets = [
        "the vault code is tango-4711-kilo",
        "meet at the north gatehouse",
        "Grüße aus dem Feld ✓",
    ]
    chat.alice.send(secrets[0])
    chat.bob.send(secrets[1])
    chat.device.send(chat.cid, secrets[2])
    chat.alice.wait_texts(secrets)
    chat.bob.wait_texts(secrets)
    wait_until(lambda: set(secrets[:2]) <= set(device_texts(chat.device, chat.cid)), "the device")
    stored = b""
    for path in Path(stack.db_path).parent.glob(Path(stack.db_path).name + "*"):
        stored += path.read_bytes()
    with sqlite3.connect(stack.db_path) as db:  # and the rows as SQLite returns them
        for (table,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'"):
            for row in db.execute(f'SELECT * FROM "{table}"'):
                stored += repr(row).encode()
    wire = b"".join(chat.alice.wire_bytes() + chat.bob.wire_bytes())
    assert len(wire) > 1000  # the capture saw the traffic
    for secret in secrets:
        for needle in {secret.encode(), secret.encode("utf-16-le"), secret.split()[-1].encode()}:
            assert needle not in stored, secret
            assert needle not in wire, secret
    # the envelopes are there, as ciphertext
    with sqlite3.connect(stack.db_path) as db:
        count = db.execute("SELECT count(*) FROM envelopes").fetchone()[0]
    assert count >= 3


def test_offline_compose_is_delivered_once(chat):
    alice, bob, device, cid = chat.alice, chat.bob, chat.device, chat.cid
    bob.context.set_offline(True)
    bob.page.wait_for_selector("#banner.offline")
    bob.send("written while offline")
    bob.page.wait_for_selector('#messages li.mine .state[data-state="queued"]')
    alice.send("alice while bob is away")
    bob.context.set_offline(False)
    bob.page.wait_for_selector("#banner", state="hidden")
    alice.wait_texts(["written while offline"])
    bob.wait_texts(["alice while bob is away"])
    wait_until(lambda: "written while offline" in device_texts(device, cid), "the device")
    bob.wait_state("written while offline", "delivered")
    alice.reload()
    alice.open(cid)
    assert alice.wait_texts(["written while offline"]).count("written while offline") == 1
    assert device_texts(device, cid).count("written while offline") == 1
    assert bob.texts().count("written while offline") == 1


def test_history_scroll_back_and_screenshot(chat, stack, browser):
    cid = chat.cid
    texts = [f"report {i:03d}" for i in range(130)]
    chat.device.send_many(cid, texts)
    chat.alice.wait_texts(texts[-1:])
    wait_until(lambda: chat.device.undelivered(cid) == 0, "the device's messages to land")
    # A newcomer's browser has no local copies: the history comes from the gateway.
    phone = WebUser(browser, stack.base, "frank", viewport=PHONE).register()
    try:
        chat.device.invite(cid, [phone.pid], timeout=20)
        phone.wait_conversation(cid)
        phone.open(cid)  # before phone joined: nothing it can read, and nothing broken
        assert phone.texts() == []
        chat.device.send_many(cid, [f"for frank {i}" for i in range(3)])
        phone.wait_texts([f"for frank {i}" for i in range(3)])
        ARTIFACTS.mkdir(exist_ok=True)
        phone.page.screenshot(path=str(ARTIFACTS / "web-conversation-phone.png"))
    finally:
        phone.close()
    # Alice reloads and scrolls back through all of it, page by page.
    alice = chat.alice
    alice.reload()
    alice.open(cid)
    for _ in range(10):
        if alice.page.is_hidden("#older"):
            break
        alice.page.click("#older")
        alice.page.wait_for_timeout(200)
    shown = alice.wait_texts(texts)
    assert [t for t in shown if t.startswith("report")] == texts
    alice.page.screenshot(path=str(ARTIFACTS / "web-history.png"))


def test_a_browser_founds_a_post_quantum_conversation_with_a_device(stack, browser):
    """Hybrid both ways over the real stack: the page founds the conversation (default
    policy: post-quantum members only), its hybrid grant reaches the Python device
    through its inbox, the device's hybrid grant reaches the page; both read, and again
    after a reload, in a new epoch."""
    carol = WebUser(browser, stack.base, "carol").register()
    try:
        assert "ML-KEM-768" in str(carol.page.text_content("#me-kem"))
        assert carol.page.is_checked("#new-require-pq")
        device = stack.device("pi")
        cid = carol.create([device.pid])
        wait_until(lambda: device.engine.is_member(cid), "the device to join")
        roster = device.engine.roster(cid)
        assert roster.policy.require_pq
        assert all(m.pq for m in roster.members)
        carol.send("from the page, hybrid")
        wait_until(
            lambda: device_texts(device, cid) == ["from the page, hybrid"], "the device to read"
        )
        device.send(cid, "from the device, hybrid")
        carol.wait_texts(["from the page, hybrid", "from the device, hybrid"])
        # The ML-KEM private key persists in IndexedDB (a non-extractable CryptoKey):
        # after a reload the page opens the device's hybrid grant of a new epoch.
        carol.reload()
        assert "ML-KEM-768" in str(carol.page.text_content("#me-kem"))
        carol.open(cid)
        second = stack.device("pump")
        carol.page.click("#members-toggle")
        carol.page.fill("#invite-pid", second.pid)
        carol.page.click("#invite button")
        wait_until(lambda: second.engine.is_member(cid), "the second device to join")
        wait_until(lambda: device.engine.roster(cid).epoch == 1, "the device to enter epoch 1")
        device.send(cid, "epoch 1, after the reload")
        carol.wait_texts(
            ["from the page, hybrid", "from the device, hybrid", "epoch 1, after the reload"]
        )
        assert not carol.errors
    finally:
        carol.close()


def test_a_browser_without_mlkem_says_so_and_the_policy_keeps_it_out(stack, browser):
    """The fallback in the page: without WebCrypto ML-KEM the sidebar says X25519 only and
    "post-quantum members only" cannot be chosen; a device's default conversation refuses
    it; one whose admin turned the requirement off works, and the member list says
    "X25519 only"."""
    from fieldchat.schemas import Policy
    from fieldchat.schemas.errors import NotAMember

    erin = WebUser(browser, stack.base, "erin", mlkem=False).register()
    try:
        assert "X25519 only" in str(erin.page.text_content("#me-kem"))
        assert "x25519" in str(erin.page.get_attribute("#me-kem", "class"))
        assert not erin.page.is_checked("#new-require-pq")
        assert erin.page.is_disabled("#new-require-pq")
        device = stack.device("pi")
        with pytest.raises(NotAMember):
            device.create_conversation([erin.pid], timeout=20)
        cid = device.create_conversation([erin.pid], policy=Policy(require_pq=False), timeout=20)
        erin.wait_conversation(cid)
        erin.open(cid)
        device.send(cid, "to an X25519-only browser")
        erin.wait_texts(["to an X25519-only browser"])
        erin.page.click("#members-toggle")
        badge = f'#member-list li[data-pid="{erin.pid}"] .badge'
        erin.page.wait_for_selector(badge)
        assert "X25519 only" in erin.page.locator(badge).all_text_contents()
        assert not erin.errors
    finally:
        erin.close()

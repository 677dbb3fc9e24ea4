"""Delayed authentication between Python and the browser (issue 16, item 5;
PROTOCOL.md §6.5), both ways, through the page's own engine in Chromium; and what the
web client shows: pending → verified, and a member's forgery flagged.

With ``sign_every`` = 4 a member holds every other member's chain key, so it can seal
unsigned envelopes in their name; each signed envelope covers the unsigned ones before
it, so the forgery is flagged within 4 messages."""

from __future__ import annotations

import pytest

from fieldchat.device.engine import Engine
from fieldchat.device.identity import Identity
from fieldchat.schemas import Control, ControlOp, Policy, TextMessage, Topics
from tests.device.test_coverage import forge_as
from tests.web._stack import Stack, wait_until
from tests.web._ui import WebUser
from tests.web.test_interop import WebPeer, route

pytestmark = pytest.mark.chromium


@pytest.fixture
def page(browser, stack):
    page = browser.new_page()
    page.goto(f"{stack.base}/_tests/harness.html")
    yield page
    page.close()


def three(page) -> tuple[str, Engine, Engine, WebPeer]:
    """Python's alice founds a sign_every = 4 conversation with carol and the browser."""
    web = WebPeer(page)
    alice, carol = Engine(Identity.generate()), Engine(Identity.generate())
    for engine in (alice, carol):
        engine.learn_bundle(web.bundle)
        web.learn(engine.identity.bundle.to_bytes())
    alice.learn_bundle(carol.identity.bundle.to_bytes())
    carol.learn_bundle(alice.identity.bundle.to_bytes())
    cid, pubs = alice.create_conversation([web.pid, carol.pid], policy=Policy(sign_every=4))
    roster = pubs[0].payload
    web_grants = web.roster(roster)
    grants = [p for p in pubs if Topics().parse(p.topic).kind == "inbox"]
    for p in carol.handle_roster(roster):
        if Topics().parse(p.topic).pid == alice.pid:
            alice.handle_grant(p.payload)
    to_web = [p for p in grants if Topics().parse(p.topic).pid == web.pid]
    route([p for p in grants if p not in to_web], {carol.pid: carol, alice.pid: alice}, web)
    for p in to_web:
        # Keyed, the browser (new in epoch 0) seals its JOINED control, step 0 (§6.6).
        for joined in web.grant(p.payload)["publications"]:
            for engine in (alice, carol):
                engine.open(cid, bytes.fromhex(joined["data"]))
    for g in web_grants:
        for engine in (alice, carol):
            if g["recipient"] == engine.pid:
                engine.handle_grant(bytes.fromhex(g["data"]))
    return cid, alice, carol, web


def text(i: int) -> TextMessage:
    return TextMessage(sent_at=1700000000, text=f"a{i}")


def test_python_to_browser_pending_then_verified_and_a_forgery_flagged(page):
    cid, alice, carol, web = three(page)
    sent = [alice.seal(cid, text(i)) for i in range(9)]
    pending = [web.call("pending", [cid, e.hex()]) for e in sent[:5]]
    assert pending == [False, True, True, True, False]
    assert web.call("takeSettled") == [[[1, 2, 3], "verified", True]]
    # Carol forges Alice's step 6 before it arrives: shown, pending; flagged at step 8.
    forged = forge_as(carol, cid, alice, 6, "from alice: trust carol")
    for e in (sent[5], forged, sent[6], sent[7], sent[8]):
        web.open(cid, e)
    assert web.call("takeSettled") == [[[5, 7], "verified", True], [[6], "forged", True]]
    counters = web.call("counters")
    assert counters["coverage_forged"] == 1
    assert counters["candidate_kept"] == 1


def test_browser_to_python_pending_then_verified(page):
    cid, alice, _, web = three(page)
    # Steps 1-5: the browser's step 0 was its JOINED control (signed, covering nothing).
    sealed = [web.seal(cid, f"w{i}") for i in range(5)]
    opened = [alice.open(cid, e) for e in sealed]
    assert [o.pending for o in opened if o] == [True, True, True, False, True]
    assert [(s.steps, s.verdict.value) for s in alice.take_settled()] == [((1, 2, 3), "verified")]


def test_the_web_client_shows_pending_verified_and_forged(stack: Stack, browser):
    web = WebUser(browser, stack.base, "web").register()
    alice, carol = stack.device("alice"), stack.device("carol")
    cid = alice.create_conversation([web.pid, carol.pid], policy=Policy(sign_every=4), timeout=20)
    web.wait_conversation(cid)
    web.open(cid)
    wait_until(lambda: len(carol.engine._convs[cid].recv) == 2, "carol holds the chains")
    alice.send(cid, "a0 signed")
    web.wait_texts(["a0 signed"])
    alice.send(cid, "a1 unsigned")
    web.wait_texts(["a1 unsigned"])
    assert trust_of(web, "a1 unsigned") == "pending"
    kept = carol.engine._convs[cid].recv[(0, 0, 0)]
    wait_until(lambda: kept.step == 2, "carol opened alice's step 1")
    publish_as(carol, Topics(prefix=stack.prefix).msg(cid), forge_carol(carol, cid, alice))
    web.wait_texts(["from alice: trust carol"])
    assert trust_of(web, "from alice: trust carol") == "pending"
    for i in range(2, 5):
        alice.send(cid, f"a{i}")
    wait_until(lambda: trust_of(web, "from alice: trust carol") == "forged", "flagged")
    wait_until(lambda: trust_of(web, "a1 unsigned") == "verified", "verified")
    assert trust_of(web, "a0 signed") is None  # signed: nothing to say
    notes = web.page.eval_on_selector_all(
        "#messages li.note .text", "els => els.map(e => e.textContent)"
    )
    assert any(n.startswith("⚠ FORGERY") for n in notes)


def publish_as(device, topic: str, payload: bytes) -> None:
    """Publish raw bytes on ``device``'s own connection: what a member's program can do."""
    connection = device._link.connection
    with connection.io:
        info = connection.client.publish(topic, payload, qos=1)
    info.wait_for_publish(5)


def forge_carol(carol, cid: str, alice) -> bytes:
    return forge_as(carol.engine, cid, alice.engine, 2, "from alice: trust carol")


def trust_of(user: WebUser, text: str) -> str | None:
    return user.page.evaluate(
        "t => { for (const li of document.querySelectorAll('#messages li:not(.note)')) {"
        " if (li.querySelector('.text').textContent === t) {"
        " const s = li.querySelector('.trust'); return s ? s.dataset.trust : null; } }"
        " return undefined; }",
        text,
    )


def test_a_flood_of_forged_candidates_costs_the_browser_bounded_state(page):
    cid, alice, carol, web = three(page)
    sent = [alice.seal(cid, text(i)) for i in range(5)]
    web.open(cid, sent[0])
    for n in range(40):  # every one authenticates: Carol holds Alice's chain key
        web.open(cid, forge_as(carol, cid, alice, 1, f"forged {n}"))
    for e in sent[1:]:
        web.open(cid, e)
    counters = web.call("counters")
    assert counters["candidate_kept"] == 16  # MAX_OTHERS; the rest are dropped
    # Alice's own step 1 came 41st, past the bound: the window is flagged, not pinpointed.
    assert web.call("takeSettled") == [[[1, 2, 3], "forged", False]]


def test_controls_are_signed_whatever_the_policy_and_unsigned_ones_ignored(page):
    """LEAVE, REKEY, ENDS and UPDATE make an admin change the roster or issue an epoch:
    under sign_every = 4 Carol could seal them unsigned in Alice's name, so the browser
    ignores (and counts) an unsigned one, and seals its own signed (§6.5)."""
    cid, alice, carol, web = three(page)
    for i in range(2):  # Alice's steps 0 (signed) and 1: her step 2 is an unsigned one
        alice.seal(cid, text(i))
    web.open(cid, forge_as(carol, cid, alice, 2, Control(op=ControlOp.REKEY)))
    assert web.call("counters").get("unsigned_control") == 1
    # The browser, no admin here, asks for a new epoch with an UPDATE: signed.
    (request,) = [p for p in web.call("update") if p["kind"] == "msg"]
    opened = alice.open(cid, bytes.fromhex(request["data"]))
    assert opened is not None and opened.signed
    assert isinstance(opened.message, Control) and opened.message.op is ControlOp.UPDATE

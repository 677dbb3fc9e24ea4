"""The page trusts rosters and envelopes only as far as the protocol lets it (issue 13;
PROTOCOL.md §5.2, §6.4), through its own receive path in Chromium, against the embedded
broker, the gateway and Python devices.

Where the attack needs a hostile network or gateway, the test stands in for it: the
page's ``/ws`` runs through the test (``WebUser(relay=True)``), which drops or adds
frames; the gateway is untrusted for all of this, so that is what a receiver must
withstand."""

from __future__ import annotations

import base64
import os

import httpx
import pytest

from fieldchat.schemas import Bundle, Grant, Policy
from fieldchat.schemas.delivery import Delivery, is_delivery
from fieldchat.schemas.envelope import EnvelopeKind, header_bytes, read_header
from tests.device.test_chain_ends import forge_as
from tests.web._stack import Stack, wait_until
from tests.web._ui import WebUser
from tests.web.test_interop import forged_epoch_1

pytestmark = pytest.mark.chromium


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def envelope_frame(cid: str, data: bytes, seq: int) -> dict[str, object]:
    """An ``envelope`` frame as gateway/_ws.py sends it."""
    _, _, epoch, sender, chain, step, _ = read_header(data)
    return {
        "op": "envelope",
        "seq": seq,
        "cid": cid,
        "epoch": epoch,
        "sender": sender,
        "sender_pid": "",
        "chain": chain,
        "step": step,
        "data": b64(data),
    }


def shown(user: WebUser, text: str) -> None:
    user.wait_texts([text])


def test_a_browser_invited_at_epoch_1_joins_through_the_chain_the_gateway_serves(
    stack: Stack, browser
):
    """Its first roster is epoch 1: the page fetches the conversation's rosters and the
    engine adopts epoch 0, then 1, before it grants anything; then both sides read."""
    web = WebUser(browser, stack.base, "web").register()
    pi = stack.device("pi")
    cid = pi.create_conversation([], timeout=20)
    pi.send(cid, "before the browser came")
    pi.invite(cid, [web.pid], timeout=20)
    web.wait_conversation(cid)
    web.open(cid)
    pi.send(cid, "welcome")
    shown(web, "welcome")
    assert any(f"/v1/conversations/{cid}/rosters" in url for url in web.requests)
    web.send("thanks")
    wait_until(lambda: "thanks" in [r.text for r in pi.messages(cid)], "the device to read it")
    assert "before the browser came" not in web.texts()  # epoch 0 is not ours to read
    web.close()


def test_an_unchained_roster_from_a_hostile_gateway_gets_nothing_granted(stack: Stack, browser):
    """Issue 13: Mallory, a member who is no admin, signs an epoch 1 of Alice's
    conversation listing the browser and an outsider; a gateway serves it as the
    conversation's rosters (as one that took a later epoch "as a base" did) and pushes
    it. The page must not join, and must send nothing for it (no delivery, no grant)."""
    web = WebUser(browser, stack.base, "web", relay=True).register()
    alice, mallory, outsider = (stack.device(n) for n in ("alice", "mallory", "outsider"))
    cid = alice.create_conversation([mallory.pid], timeout=20)
    wait_until(lambda: cid in [c.cid for c in mallory.conversations()], "mallory to join")
    roster0 = mallory.engine.roster(cid)
    web_bundle = httpx.get(f"{stack.base}/v1/participants/{web.pid}/bundle", timeout=10).json()
    web_key = Bundle.from_bytes(base64.b64decode(web_bundle["bundle"])).ed25519
    forged = forged_epoch_1(
        roster0, mallory.engine.identity, web_key, outsider.engine.identity.public
    )
    served = []

    def serve_forged(route) -> None:
        served.append(route.request.url)
        item = {
            "cid": cid,
            "epoch": 1,
            "members": list(forged.pids),
            "roster": b64(forged.to_bytes()),
        }
        route.fulfill(json=[item])

    web.page.route(f"**/v1/conversations/{cid}/rosters", serve_forged)
    # A conversation of its own with the outsider, to know when the page is past the frame.
    other = outsider.create_conversation([web.pid], timeout=20)
    web.wait_conversation(other)
    web.open(other)
    web.inject(
        {"op": "roster", "cid": cid, "epoch": 1, "members": [], "data": b64(forged.to_bytes())}
    )
    outsider.send(other, "after the forged roster")
    shown(web, "after the forged roster")
    assert served  # the page asked for the chain, and got the unchained roster again
    keys = [
        base64.b64decode(f["data"])
        for f in web.sent
        if f.get("op") == "publish" and f.get("kind") == "grant"
    ]
    cids = [Delivery.from_bytes(k).cid if is_delivery(k) else Grant.from_bytes(k).cid for k in keys]
    assert cid not in cids
    assert web.page.query_selector(f'#conversations li[data-cid="{cid}"]') is None
    web.close()


def test_a_removed_members_unsigned_old_epoch_forgery_is_not_shown(stack: Stack, browser):
    """Issue 13, item 4: Carol, removed, seals "from the pi" in epoch 0 with the pi's
    chain key she kept, past the step where the pi's chain ended, and a hostile relay
    delivers it. The page refuses it once the pi's signed ENDS control of epoch 1 states
    the end."""
    web = WebUser(browser, stack.base, "web", relay=True).register()
    pi, carol = stack.device("pi"), stack.device("carol")
    cid = pi.create_conversation([carol.pid, web.pid], policy=Policy(sign_every=0), timeout=20)
    web.wait_conversation(cid)
    web.open(cid)
    pi.send(cid, "before the removal")
    shown(web, "before the removal")
    wait_until(lambda: "before the removal" in [r.text for r in carol.messages(cid)], "carol")
    pi.remove(cid, [carol.pid])
    # The page took the removal (epoch 1): from now on epoch 0 is closed for it.
    web.page.wait_for_function("() => document.querySelector('#conv-sub').textContent[0] === '2'")
    with carol.engine._lock:
        forgery = forge_as(carol.engine, cid, pi.engine, 40, "from the pi: pay carol")
    web.inject(envelope_frame(cid, forgery, 10**6))
    pi.send(cid, "after the removal")
    shown(web, "after the removal")
    assert "from the pi: pay carol" not in web.texts()
    assert not web.errors
    web.close()


def test_unsigned_junk_beside_the_genuine_envelope_never_hides_it(stack: Stack, browser):
    """The archive keeps every unsigned candidate of a key (docs/gateway.md): junk first
    or last, the page shows the genuine envelope once and nothing of the junk."""
    web = WebUser(browser, stack.base, "web", relay=True).register()
    pi = stack.device("pi")
    cid = pi.create_conversation([web.pid], policy=Policy(sign_every=0), timeout=20)
    web.wait_conversation(cid)
    web.open(cid)
    web.drop = lambda f: f.get("op") == "envelope" and f.get("sender_pid") == pi.pid
    pi.send(cid, "one")
    web.relay_until(lambda: web.dropped, "the genuine envelope to be held back")
    web.drop = lambda f: False
    [genuine] = web.dropped
    web.inject({**genuine, "data": b64(junk_of(base64.b64decode(genuine["data"])))})
    web.inject(genuine)
    shown(web, "one")
    pi.send(cid, "two")
    shown(web, "two")
    two = [f for f in web.received if f.get("op") == "envelope" and f.get("sender_pid") == pi.pid][
        -1
    ]
    web.inject({**two, "data": b64(junk_of(base64.b64decode(two["data"])))})
    pi.send(cid, "three")
    shown(web, "three")
    assert web.texts() == ["one", "two", "three"]
    assert not web.errors
    web.close()


def junk_of(envelope: bytes) -> bytes:
    """Another candidate of the same key: the header kept, the rest random."""
    header_len = read_header(envelope)[6]
    return envelope[:header_len] + os.urandom(len(envelope) - header_len)


def test_an_honest_unsigned_sender_far_ahead_is_held_then_shown(stack: Stack, browser):
    """1,100 unsigned envelopes lost on the way (and junk 24,999 steps ahead first): the
    browser derives at most 512 steps per envelope before AES-GCM, holds the later ones
    out of reach, and shows them as the sender's next envelopes bring them within reach."""
    web = WebUser(browser, stack.base, "web", relay=True).register()
    pi = stack.device("pi")
    cid = pi.create_conversation([web.pid], policy=Policy(sign_every=0), timeout=20)
    web.wait_conversation(cid)
    web.open(cid)
    pi.send(cid, "first")
    shown(web, "first")
    far = header_bytes(EnvelopeKind.TEXT, 0, 0, 0, 24_999, signed=False) + os.urandom(40)
    web.inject(envelope_frame(cid, far, 10**6))
    web.drop = lambda f: f.get("op") == "envelope" and f.get("sender_pid") == pi.pid
    pi.send_many(cid, [f"lost {i}" for i in range(1_100)])
    web.relay_until(lambda: len(web.dropped) >= 1_100, "the burst to be lost")
    web.drop = lambda f: False
    after = [f"after {i}" for i in range(4)]
    for text in after:
        pi.send(cid, text)
    assert web.wait_texts(after)[-4:] == after
    assert not web.errors
    web.close()

"""The browser's engine and Python's exchange messages both ways: rosters, hybrid
(X25519 + ML-KEM-768) epoch-secret deliveries in both directions, and X25519-only ones
with a browser whose WebCrypto lacks ML-KEM, under the roster's post-quantum policy;
sealing and opening, and new epochs when a member is removed.
The bytes travel through the test process (no network), so a failure here is the
protocol's, not the transport's.

The trust rules of issue 13 both ways (PROTOCOL.md §5.2, §5.3, §6.4): a browser adopts a
roster only through a chain from epoch 0, takes a removed member's unsigned old-epoch
envelopes only below the end their sender stated (and states its own), and derives at
most 512 chain steps for an envelope nothing has authenticated."""

from __future__ import annotations

import os
from typing import Any

import pytest

from fieldchat.device.engine import Engine, Opened, Publication
from fieldchat.device.epochs import epoch_commit, make_delivery
from fieldchat.device.grants import make_grant
from fieldchat.device.identity import Identity
from fieldchat.schemas import (
    Bundle,
    ChainGrant,
    Control,
    ControlOp,
    GrantMode,
    Member,
    Policy,
    Roster,
    TextMessage,
    Topics,
)
from fieldchat.schemas.delivery import Delivery
from fieldchat.schemas.envelope import EnvelopeKind, header_bytes
from fieldchat.schemas.errors import FieldchatError, NotAMember
from fieldchat.schemas.ids import decode_id
from fieldchat.schemas.roster import is_roster
from tests.device.test_chain_ends import forge_as
from tests.web._stack import NO_MLKEM

pytestmark = pytest.mark.chromium
TOPICS = Topics()


class WebPeer:
    """The JS engine in a page, driven by hex strings."""

    def __init__(self, page: Any) -> None:
        self.page = page
        made = page.evaluate("async () => (await import('/_tests/peer.js')).create()")
        self.pid: str = made["pid"]
        self.bundle = bytes.fromhex(made["bundle"])
        self.post_quantum: bool = made["postQuantum"]

    def call(self, name: str, arg: Any = None) -> Any:
        return self.page.evaluate(f"async (a) => globalThis.peer.{name}(a)", arg)

    def learn(self, bundle: bytes) -> str:
        return str(self.call("learnBundle", bundle.hex()))

    def roster(self, data: bytes) -> list[dict[str, Any]]:
        return list(self.call("handleRoster", data.hex()))

    def grant(self, data: bytes) -> dict[str, Any]:
        """``{installed, needsRoster, publications}`` (publications: its ENDS, §6.5)."""
        return dict(self.call("handleGrant", data.hex()))

    def seal(self, cid: str, text: str) -> bytes:
        return bytes.fromhex(self.call("seal", [cid, text]))

    def open(self, cid: str, data: bytes) -> Any:
        """``{sender, text, kind}``, ``{error}`` or None (a duplicate or our own)."""
        return self.call("open", [cid, data.hex()])

    def try_roster(self, data: bytes) -> dict[str, Any]:
        """``{publications}`` or ``{error: reason}``."""
        return dict(self.call("tryRoster", data.hex()))

    def inbox(self, data: bytes) -> dict[str, Any]:
        """A roster: ``{publications}``; a grant: ``{installed, ends}``; or ``{error}``."""
        return dict(self.call("inbox", data.hex()))


@pytest.fixture
def page(browser, stack):
    page = browser.new_page()
    page.goto(f"{stack.base}/_tests/harness.html")
    yield page
    page.close()


@pytest.fixture
def page_without_mlkem(browser, stack):
    """A page whose WebCrypto has no ML-KEM (an older browser): the fallback."""
    page = browser.new_page()
    page.add_init_script(NO_MLKEM)
    page.goto(f"{stack.base}/_tests/harness.html")
    yield page
    page.close()


def text(opened: Opened | None) -> str:
    assert opened is not None
    assert isinstance(opened.message, TextMessage)
    return opened.message.text


def route(pubs: list[Publication], engines: dict[str, Engine], web: WebPeer) -> None:
    """Deliver Python's deliveries to their recipients' inboxes (the browser's included)."""
    for p in pubs:
        where = TOPICS.parse(p.topic)
        assert where.kind == "inbox"
        if where.pid == web.pid:
            assert web.grant(p.payload)["installed"]
        else:
            result = engines[str(where.pid)].handle_grant(p.payload)
            assert result.installed or result.needs_roster  # held until its roster comes


def test_python_founds_and_both_sides_talk(page):
    """Hybrid both ways: the browser publishes an ML-KEM-768 key (WebCrypto), Python's
    grant to it is hybrid and the browser opens it; the browser's grant to Python is
    hybrid and Python opens it. The default policy (require post-quantum) admits it."""
    web = WebPeer(page)
    assert web.post_quantum
    assert Bundle.from_bytes(web.bundle).post_quantum
    assert web.call("kemKey") == {
        "type": "private",
        "extractable": False,
        "algorithm": "ML-KEM-768",
    }
    device = Engine(Identity.generate())
    device.learn_bundle(web.bundle)
    assert web.learn(device.identity.bundle.to_bytes()) == "new"
    cid, pubs = device.create_conversation([web.pid])
    roster = Roster.from_bytes(pubs[0].payload)
    assert roster.policy.require_pq  # the default
    assert [m.pq for m in roster.members] == [True, True]  # the roster shows who is PQ
    to_web = next(p for p in pubs if p.topic == TOPICS.inbox(web.pid))
    delivery = Delivery.from_bytes(to_web.payload)
    assert delivery.mode is GrantMode.HYBRID and delivery.kem_ciphertext is not None
    assert web.call("grantMode", to_web.payload.hex()) == GrantMode.HYBRID
    assert web.roster(roster.to_bytes()) == []  # a member sends nothing: the admin keys it
    keyed = web.grant(to_web.payload)  # the browser decapsulates ML-KEM-768 (WebCrypto)
    assert keyed["installed"] and not keyed["needsRoster"]
    # Keyed, the browser (new in this epoch) says it listens: a JOINED control (§6.6).
    [joined] = keyed["publications"]
    assert (joined["kind"], joined["cid"]) == ("msg", cid)
    said = device.open(cid, bytes.fromhex(joined["data"]))
    assert said is not None and said.message == Control(op=ControlOp.JOINED)

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


def test_the_browser_accepts_a_gap_request_and_goes_on(page):
    """A device asks for steps it lacks with a receipt of type 3 (MISSING, PROTOCOL.md
    §4.1); the browser opens it like any receipt (it used to refuse the type as
    malformed) and opens what follows."""
    from fieldchat.schemas import Receipt, ReceiptRange, ReceiptType

    web = WebPeer(page)
    device = Engine(Identity.generate())
    device.learn_bundle(web.bundle)
    web.learn(device.identity.bundle.to_bytes())
    cid, pubs = device.create_conversation([web.pid])
    assert web.roster(pubs[0].payload) == []
    web.grant(next(p for p in pubs if p.topic == TOPICS.inbox(web.pid)).payload)
    ask = Receipt(
        type=ReceiptType.MISSING,
        ranges=(ReceiptRange(epoch=0, sender=1, chain=0, first=2, last=4),),
    )
    assert web.open(cid, device.seal(cid, ask)) == {"sender": device.pid, "text": None, "kind": 2}
    after = device.seal(cid, TextMessage(sent_at=1700000000, text="after the ask"))
    assert web.open(cid, after)["text"] == "after the ask"


def test_browser_founds_removes_and_the_removed_cannot_read(page):
    web = WebPeer(page)
    alice, bob = Engine(Identity.generate()), Engine(Identity.generate())
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
    assert [m.pq for m in Roster.from_bytes(roster0).members] == [True, True, True]
    for e in engines.values():
        route(e.handle_roster(roster0), engines, web)
    for p in published[1:]:
        # The browser's deliveries are hybrid (WebCrypto ML-KEM-768): Python decapsulates.
        assert Delivery.from_bytes(bytes.fromhex(p["data"])).mode is GrantMode.HYBRID
        assert engines[p["recipient"]].handle_grant(bytes.fromhex(p["data"])).installed
    hello = web.seal(cid, "hello both")
    assert text(alice.open(cid, hello)) == "hello both"
    assert text(bob.open(cid, hello)) == "hello both"
    assert (
        web.open(cid, bob.seal(cid, TextMessage(sent_at=2, text="bob here")))["text"] == "bob here"
    )

    # The browser (admin) removes bob: a new epoch, its secret delivered to alice alone.
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


def introduce(web: WebPeer, *engines: Engine) -> None:
    """Everyone learns everyone's bundle (as from the retained bundle topics)."""
    for e in engines:
        e.learn_bundle(web.bundle)
        web.learn(e.identity.bundle.to_bytes())
        for other in engines:
            if other is not e:
                e.learn_bundle(other.identity.bundle.to_bytes())


def found(admin: Engine, members: list[Engine], web: WebPeer | None, **policy: Any) -> str:
    """``admin`` founds a conversation with ``members`` (and the browser, when given);
    everyone takes the roster of epoch 0 and every grant."""
    engines = {e.pid: e for e in (admin, *members)}
    pids = [e.pid for e in members] + ([web.pid] if web else [])
    cid, pubs = admin.create_conversation(pids, policy=Policy(**policy))
    grants = list(pubs[1:])
    for e in members:
        grants += e.handle_roster(pubs[0].payload)
    if web is not None:
        for g in web.roster(pubs[0].payload):
            engines[g["recipient"]].handle_grant(bytes.fromhex(g["data"]))
    for p in grants:
        where = TOPICS.parse(p.topic)
        if web is not None and where.pid == web.pid:
            assert web.grant(p.payload)["installed"]
        else:
            engines[str(where.pid)].handle_grant(p.payload)
    return cid


def test_a_browser_invited_later_adopts_the_roster_only_through_the_chain(page):
    """The roster that invites the browser at epoch 1 comes first (the retained topic): it
    is held and nothing is granted until epoch 0, from the admin's inbox message, makes
    the chain verify; then the browser joins and reads."""
    web = WebPeer(page)
    alice, bob = Engine(Identity.generate()), Engine(Identity.generate())
    introduce(web, alice, bob)
    cid = found(alice, [bob], None)
    invite = alice.add_members(cid, [web.pid])
    bob.handle_roster(invite[0].payload)
    bob.handle_grant(next(p.payload for p in invite if p.topic == TOPICS.inbox(bob.pid)))
    to_web = [p.payload for p in invite if p.topic == TOPICS.inbox(web.pid)]
    history = [p for p in to_web if is_roster(p)]
    assert [Roster.from_bytes(r).epoch for r in history] == [0]

    assert web.try_roster(invite[0].payload) == {"error": "roster_pending"}
    assert web.call("conversations") == []
    assert web.inbox(history[0])["publications"] == []  # adopted; the admin keys the epoch
    for delivery in [p for p in to_web if not is_roster(p)]:
        keyed = web.inbox(delivery)
        assert (keyed["installed"], [p["kind"] for p in keyed["publications"]]) == (True, ["msg"])
        for engine in (alice, bob):  # its JOINED control
            engine.open(cid, bytes.fromhex(keyed["publications"][0]["data"]))
    hello = alice.seal(cid, TextMessage(sent_at=1, text="welcome"))
    assert web.open(cid, hello)["text"] == "welcome"
    assert text(bob.open(cid, web.seal(cid, "thanks"))) == "thanks"


def forged_epoch_1(roster0: Roster, signer: Identity, browser: bytes, outsider: bytes) -> Roster:
    """Epoch 1 after ``roster0``, naming it as prev, adding the browser and an outsider,
    signed by ``signer`` (a member who is no admin: it does not chain, §5.2)."""
    return Roster.create(
        cid=roster0.cid,
        epoch=1,
        nonce=b"",
        prev=roster0.digest(),
        members=(
            *roster0.members,
            Member(key=browser, admin=False, pq=True),
            Member(key=outsider, admin=False, pq=True),
        ),
        policy=roster0.policy,
        issued_at=roster0.issued_at,
        signer_key=signer.public,
        commit=bytes(32),
        sign=signer.sign,
    )


def test_a_roster_a_member_forged_is_not_adopted_and_gets_no_grant(page):
    """Issue 13: a member who is no admin signs an epoch 1 listing the browser and an
    outsider. Seen first, it is held (trusted for nothing); once epoch 0 arrives it does
    not chain and is dropped. Nothing is granted: the outsider reads nothing."""
    web = WebPeer(page)
    alice, mallory, outsider = (Engine(Identity.generate()) for _ in range(3))
    introduce(web, alice, mallory, outsider)
    cid, pubs = alice.create_conversation([mallory.pid])
    roster0 = Roster.from_bytes(pubs[0].payload)
    web_key = Bundle.from_bytes(web.bundle).ed25519
    forged = forged_epoch_1(roster0, mallory.identity, web_key, outsider.identity.public)

    assert web.try_roster(forged.to_bytes()) == {"error": "roster_pending"}
    assert web.try_roster(roster0.to_bytes()) == {"publications": []}  # not listed at 0
    assert web.call("conversations") == []
    assert web.call("counters")["roster"] == 1  # the forged epoch 1, dropped
    assert web.try_roster(forged.to_bytes()) == {"error": "roster"}  # and refused from now on


def test_a_removed_member_cannot_pass_unsigned_envelopes_off_as_a_remaining_one(page):
    """Issue 13, item 4, the browser receiving: Carol, removed at epoch 1, keeps Bob's
    epoch-0 chain key and seals "from Bob" at a step Bob never used. The browser holds
    that and Bob's genuine late envelope until Bob's signed ENDS control of epoch 1 states
    his end, then shows the genuine one and refuses the forgery."""
    web = WebPeer(page)
    alice, bob, carol = (Engine(Identity.generate()) for _ in range(3))
    introduce(web, alice, bob, carol)
    cid = found(alice, [bob, carol], web, sign_every=0)
    assert web.open(cid, bob.seal(cid, TextMessage(sent_at=1, text="b0")))["text"] == "b0"
    late = bob.seal(cid, TextMessage(sent_at=1, text="late, sealed before the removal"))

    removal = alice.remove_members(cid, [carol.pid])
    deliveries = {p.topic: p.payload for p in removal[1:] if TOPICS.parse(p.topic).kind == "inbox"}
    web.roster(removal[0].payload)
    assert web.grant(deliveries[TOPICS.inbox(web.pid)])["installed"]
    bob.handle_roster(removal[0].payload)
    (ends,) = bob.handle_grant(deliveries[TOPICS.inbox(bob.pid)]).publications
    carol.handle_roster(removal[0].payload)
    forgery = forge_as(carol, cid, bob, 3, "from bob: pay carol")  # 0: his JOINED

    assert web.open(cid, late) == {"error": "chain_end_unknown"}
    assert web.open(cid, forgery) == {"error": "chain_end_unknown"}
    assert ends.topic == TOPICS.msg(cid)
    assert web.open(cid, ends.payload) == {"sender": bob.pid, "text": None, "kind": 3}
    assert web.open(cid, late)["text"].startswith("late")
    assert web.open(cid, forgery) == {"error": "chain_closed"}
    # Signed envelopes and the new epoch are not affected.
    assert web.open(cid, bob.seal(cid, TextMessage(sent_at=2, text="epoch 1")))["text"] == "epoch 1"


def test_the_browser_states_where_its_chain_ended_and_python_refuses_past_it(page):
    """The other way: the browser's signed ENDS control of the new epoch states its epoch-0
    end, so a removed member's unsigned "from the browser" past it is refused by Python."""
    web = WebPeer(page)
    alice, carol = Engine(Identity.generate()), Engine(Identity.generate())
    introduce(web, alice, carol)
    made = web.call("createWith", [[alice.pid, carol.pid], {"sign_every": 0}])
    cid, published = made["cid"], made["publications"]
    for e in (alice, carol):
        e.handle_roster(bytes.fromhex(published[0]["data"]))
    for p in published[1:]:
        {alice.pid: alice, carol.pid: carol}[p["recipient"]].handle_grant(bytes.fromhex(p["data"]))
    first = web.seal(cid, "w0")
    assert text(alice.open(cid, first)) == text(carol.open(cid, first)) == "w0"
    late = web.seal(cid, "late")

    removal = web.call("remove", [cid, [carol.pid]])
    alice.handle_roster(bytes.fromhex(removal[0]["data"]))
    carol.handle_roster(bytes.fromhex(removal[0]["data"]))
    [delivery] = [p for p in removal if p["kind"] == "grant"]
    assert alice.handle_grant(bytes.fromhex(delivery["data"])).installed
    [ends] = [p for p in removal if p["kind"] == "msg"]
    assert ends["cid"] == cid
    alice.open(cid, bytes.fromhex(ends["data"]))
    assert text(alice.open(cid, late)) == "late"
    with pytest.raises(FieldchatError) as info:
        alice.open(cid, forge_as(carol, cid, web, 2, "from the browser: pay carol"))  # type: ignore[arg-type]
    assert info.value.reason == "chain_closed"


def junk(alice: Engine, cid: str, step: int, *, signed: bool = False, size: int = 40) -> bytes:
    """A well-formed envelope of Alice's epoch-0 chain at ``step`` that nobody sealed."""
    header = header_bytes(EnvelopeKind.TEXT, 0, 0, 0, step, signed=signed)
    return header + os.urandom(size) + (os.urandom(64) if signed else b"")


def test_an_unsigned_envelope_far_ahead_costs_the_browser_a_bounded_derivation(page, capsys):
    """Issue 13, item 5: 24,999 steps ahead used to cost 25,000 chain steps (WebCrypto
    HMACs) before AES-GCM refused it; now at most 513 for one envelope, and once the cache
    reaches that far at most 64. The times (this machine's) are printed for the record."""
    web = WebPeer(page)
    alice = Engine(Identity.generate())
    introduce(web, alice)
    cid = found(alice, [], web, sign_every=0)

    def cost(envelope: bytes) -> dict[str, Any]:
        return dict(web.call("openCounted", [cid, envelope.hex()]))

    first = cost(junk(alice, cid, 24_999))
    assert first["answer"] == {"error": "unsigned_jump"}
    assert first["steps"] <= 513
    again = [cost(junk(alice, cid, 24_999)) for _ in range(60)]
    assert {c["answer"]["error"] for c in again} <= {"unsigned_jump", "auth"}
    assert max(c["steps"] for c in again) <= 513
    cached = [cost(junk(alice, cid, s)) for s in (24_999, 12_345, 700)]
    assert [c["answer"] for c in cached] == [{"error": "auth"}] * 3
    assert max(c["steps"] for c in cached) <= 65
    bad_signature = cost(junk(alice, cid, 24_999, signed=True))
    assert (bad_signature["answer"], bad_signature["steps"]) == ({"error": "auth"}, 0)
    largest = cost(junk(alice, cid, 100, size=65_000))
    assert largest["answer"] == {"error": "auth"}
    worst = {
        "far unsigned, first": first["ms"],
        "far unsigned, worst of 60 more": max(c["ms"] for c in again),
        "cached, worst": max(c["ms"] for c in cached),
        "far signed, bad signature": bad_signature["ms"],
        "65 KB junk": largest["ms"],
    }
    with capsys.disabled():
        print("\nbrowser pre-auth ms:", ", ".join(f"{k} {v:.2f}" for k, v in worst.items()))
    # An honest envelope still opens: the junk moved nothing.
    assert web.open(cid, alice.seal(cid, TextMessage(sent_at=1, text="real")))["text"] == "real"


def test_an_honest_unsigned_sender_far_ahead_is_held_then_opened(page):
    """2,000 unsigned envelopes lost: each later one lets the browser derive 512 steps
    further, and what it held opens once within reach (as the page retries them)."""
    web = WebPeer(page)
    alice = Engine(Identity.generate())
    introduce(web, alice)
    cid = found(alice, [], web, sign_every=0)
    for i in range(2_000):
        alice.seal(cid, TextMessage(sent_at=1, text=f"lost {i}"))
    after = [alice.seal(cid, TextMessage(sent_at=1, text=f"after {i}")) for i in range(6)]
    held: dict[int, bytes] = {}
    shown = []
    for step, envelope in enumerate(after, start=2_000):
        answer = web.open(cid, envelope)
        if answer.get("error") == "unsigned_jump":
            held[step] = envelope
        else:
            shown.append(answer["text"])
        reach = web.call("reach", [cid, 0, 0, 0])
        for s in [s for s in sorted(held) if s <= reach]:
            shown.append(web.open(cid, held.pop(s))["text"])
    assert sorted(shown) == [f"after {i}" for i in range(6)]
    assert web.call("counters")["unsigned_jump"] == 3


def x25519_only(bundle: bytes) -> Bundle:
    """A bundle with its prekey's ML-KEM key stripped (what a downgrading sender seals to)."""
    b = Bundle.from_bytes(bundle)
    return b.model_copy(update={"prekey": b.prekey.model_copy(update={"mlkem768": None})})


def test_the_browser_refuses_an_x25519_only_delivery_from_a_post_quantum_member(page):
    """A downgrade: Alice (ML-KEM) seals a delivery and a grant to the browser by X25519
    only, as if it had no ML-KEM key. Her roster marks her post-quantum, so the browser
    refuses both before opening them."""
    web = WebPeer(page)
    alice = Engine(Identity.generate())
    introduce(web, alice)
    cid = found(alice, [], web)
    roster = alice.roster(cid)
    downgraded = make_delivery(b"\x05" * 32, x25519_only(web.bundle), cid, 0)
    assert downgraded.mode is GrantMode.X25519
    assert web.inbox(downgraded.to_bytes()) == {"error": "grant"}
    payload = ChainGrant(
        epoch=0, roster=roster.digest(), sender=0, chain=7, step=0, key=b"\x07" * 32
    )
    grant = make_grant(alice.identity, x25519_only(web.bundle), cid, payload)
    assert grant.mode is GrantMode.X25519
    assert web.inbox(grant.to_bytes()) == {"error": "grant"}


def test_a_browser_without_mlkem_is_x25519_only_and_the_policy_decides(page_without_mlkem):
    """The fallback: WebCrypto without ML-KEM. The browser's prekey has no ML-KEM key; the
    default policy (require post-quantum) keeps it out of conversations, its own and
    Python's; a conversation whose admin turned the requirement off works X25519 only,
    both ways (deliveries from Python's admin and from the browser's), and the roster
    says so."""
    web = WebPeer(page_without_mlkem)
    assert not web.post_quantum
    assert not Bundle.from_bytes(web.bundle).post_quantum
    assert web.call("mlkem") is False
    device = Engine(Identity.generate())
    introduce(web, device)

    with pytest.raises(NotAMember):  # Python's admin, default policy
        device.create_conversation([web.pid])
    refused = web.call("tryCreate", [device.pid])  # the browser's own, default policy
    assert refused["error"] == "not_member"
    assert "ML-KEM" in refused["message"]
    assert web.call("conversations") == []

    cid, pubs = device.create_conversation([web.pid], policy=Policy(require_pq=False))
    roster = Roster.from_bytes(pubs[0].payload)
    assert [m.pq for m in roster.members] == [True, False]
    to_web = next(p for p in pubs if p.topic == TOPICS.inbox(web.pid))
    assert Delivery.from_bytes(to_web.payload).mode is GrantMode.X25519
    assert web.roster(roster.to_bytes()) == []
    keyed = web.grant(to_web.payload)
    assert keyed["installed"]
    for p in keyed["publications"]:  # its JOINED control
        device.open(cid, bytes.fromhex(p["data"]))
    assert (
        web.open(cid, device.seal(cid, TextMessage(sent_at=1, text="x25519 only")))["text"]
        == "x25519 only"
    )
    assert text(device.open(cid, web.seal(cid, "back, x25519 only"))) == "back, x25519 only"

    # The browser as the admin: its delivery to Python's ML-KEM prekey is X25519 only,
    # which Python accepts because the roster marks the browser as not post-quantum.
    made = web.call("createWith", [[device.pid], {"require_pq": False}])
    roster0 = bytes.fromhex(made["publications"][0]["data"])
    device.handle_roster(roster0)
    (delivery,) = [bytes.fromhex(p["data"]) for p in made["publications"][1:]]
    assert Delivery.from_bytes(delivery).mode is GrantMode.X25519
    assert device.handle_grant(delivery).installed
    assert text(device.open(made["cid"], web.seal(made["cid"], "from x25519"))) == "from x25519"


def test_the_browser_keeps_an_epoch_that_requires_post_quantum_hybrid(page):
    """An admin's roster requires post-quantum members yet lists one without ML-KEM. The
    browser enforces the policy too: it refuses an X25519-only grant from that member,
    though the roster marks it as not post-quantum."""
    web = WebPeer(page)
    alice, old = Engine(Identity.generate()), Engine(Identity.generate(post_quantum=False))
    introduce(web, alice, old)
    cid = found(alice, [], web)
    roster0 = alice.roster(cid)
    secret = b"\x0b" * 32
    roster1 = Roster.create(
        cid=cid,
        epoch=1,
        nonce=b"",
        prev=roster0.digest(),
        members=(*roster0.members, Member(key=old.identity.public, admin=False, pq=False)),
        policy=roster0.policy,
        issued_at=roster0.issued_at,
        signer_key=alice.identity.public,
        commit=epoch_commit(secret, decode_id(cid), 1),
        sign=alice.identity.sign,
    )
    assert roster1.policy.require_pq
    assert web.roster(roster1.to_bytes()) == []
    bundle = Bundle.from_bytes(web.bundle)
    assert web.grant(make_delivery(secret, bundle, cid, 1).to_bytes())["installed"]
    payload = ChainGrant(
        epoch=1, roster=roster1.digest(), sender=2, chain=1, step=0, key=b"\x05" * 32
    )
    grant = make_grant(old.identity, x25519_only(web.bundle), cid, payload)
    assert web.inbox(grant.to_bytes()) == {"error": "grant"}

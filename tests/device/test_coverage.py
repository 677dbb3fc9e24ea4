"""Delayed authentication of unsigned steps (issue 16, item 5; PROTOCOL.md §6.5, §7).

With ``sign_every`` = N any member holds the chain keys of the others, so it can seal
an unsigned envelope in another member's name. Each signed envelope now covers the
unsigned envelopes of its chain since the previous signature: receivers show those as
pending, then verified, or flag the ones that are not the sender's.
The forgery test fails before the fix: nothing ever settles, the forgery stays shown
as the sender's.
"""

from __future__ import annotations

import time

import pytest

from fieldchat.device._coverage import MAX_OTHERS, MAX_WAITING, Verdict
from fieldchat.device.chains import step_keys
from fieldchat.device.engine import Engine
from fieldchat.device.state import DeviceState
from fieldchat.schemas import Control, ControlOp, Message, TextMessage
from fieldchat.schemas._codec import pack, unpack
from fieldchat.schemas.crypto import aead_seal
from fieldchat.schemas.envelope import header_bytes, read_header
from fieldchat.schemas.ids import decode_id
from fieldchat.schemas.messages import encode_plaintext, kind_of
from tests.device._mesh import Mesh, text_of


def text(s: str) -> TextMessage:
    return TextMessage(sent_at=1, text=s)


def forge_as(member: Engine, cid: str, sender: Engine, step: int, words: str | Message) -> bytes:
    """An unsigned envelope in ``sender``'s name at ``step``, sealed by ``member`` with
    the chain key of ``sender`` it holds as a member (it has not opened that step)."""
    message = text(words) if isinstance(words, str) else words
    conv = member._convs[cid]
    index = conv.rosters[conv.epoch].index_of(sender.pid)
    chain = conv.recv[(conv.epoch, index, 0)]
    ck = chain.key
    for _ in range(step - chain.step):
        ck = step_keys(ck)[1]
    header = header_bytes(kind_of(message), conv.epoch, index, 0, step, signed=False)
    plaintext, _, _ = encode_plaintext(message)
    return header + aead_seal(
        step_keys(ck)[0], step.to_bytes(12, "big"), plaintext, header + decode_id(cid)
    )


def three(sign_every: int = 4) -> tuple[Mesh, str, Engine, Engine, Engine]:
    mesh = Mesh("alice", "bob", "carol")
    # Bob, the sender of these tests, founds it: an issuer seals no JOINED control
    # (PROTOCOL.md §6.6), so his texts start at step 0.
    cid = mesh.create("bob", "alice", "carol", sign_every=sign_every)
    return mesh, cid, mesh["alice"], mesh["bob"], mesh["carol"]


def settled(engine: Engine) -> list[tuple[tuple[int, ...], Verdict, bool]]:
    return [(s.steps, s.verdict, s.pinpointed) for s in engine.take_settled()]


def test_honest_unsigned_messages_go_from_pending_to_verified():
    _, cid, alice, bob, _ = three()
    sent = [bob.seal(cid, text(f"b{i}")) for i in range(9)]
    covers = [read_header(e).cover(e) for e in sent]
    assert covers == [0, 0, 0, 0, 3, 0, 0, 0, 3]  # steps 4 and 8 cover the three before
    opened = [alice.open(cid, e) for e in sent[:4]]
    assert [o.pending for o in opened if o] == [False, True, True, True]
    assert settled(alice) == []
    signed = alice.open(cid, sent[4])
    assert signed is not None and not signed.pending
    assert settled(alice) == [((1, 2, 3), Verdict.VERIFIED, True)]
    for e in sent[5:]:
        alice.open(cid, e)
    assert settled(alice) == [((5, 6, 7), Verdict.VERIFIED, True)]
    assert alice.counters["coverage_verified"] == 6
    assert alice.counters["coverage_forged"] == 0


def test_a_member_forging_another_members_unsigned_step_is_flagged_within_n():
    _, cid, alice, bob, carol = three()
    sent = [bob.seal(cid, text(f"b{i}")) for i in range(5)]
    forgery = forge_as(carol, cid, bob, 2, "from bob: pay Carol")
    for e in (sent[0], sent[1], forgery):
        alice.open(cid, e)
    # Carol's envelope authenticates (she holds Bob's chain key): shown, pending.
    assert alice.open(cid, sent[2]) is None  # Bob's own step 2 comes second: kept aside
    assert alice.counters["candidate_kept"] == 1
    alice.open(cid, sent[3])
    assert settled(alice) == []
    assert text_of(alice.open(cid, sent[4])) == "b4"  # Bob's next signed envelope
    assert settled(alice) == [((1, 3), Verdict.VERIFIED, True), ((2,), Verdict.FORGED, True)]
    assert alice.counters["coverage_forged"] == 1


def test_a_forgery_whose_genuine_step_never_came_still_fails_coverage():
    _, cid, alice, bob, carol = three()
    sent = [bob.seal(cid, text(f"b{i}")) for i in range(5)]
    forgery = forge_as(carol, cid, bob, 3, "forged")
    for e in (*sent[:3], forgery, sent[4]):
        alice.open(cid, e)
    # The signature proves step 4 is Bob's; its tag does not match what was shown.
    assert settled(alice) == [((1, 2, 3), Verdict.FORGED, False)]


def test_missing_covered_envelopes_stay_pending_then_verify_when_repaired():
    _, cid, alice, bob, _ = three()
    sent = [bob.seal(cid, text(f"b{i}")) for i in range(5)]
    for e in (sent[0], sent[1], sent[3], sent[4]):  # step 2 lost on the way
        alice.open(cid, e)
    assert settled(alice) == []  # the signed one waits for step 2
    alice.open(cid, sent[2])  # gap repair or the archive brings it
    assert settled(alice) == [((1, 2, 3), Verdict.VERIFIED, True)]


def test_the_signed_envelope_first_then_the_covered_ones():
    _, cid, alice, bob, _ = three()
    sent = [bob.seal(cid, text(f"b{i}")) for i in range(5)]
    for e in (sent[0], sent[4], sent[3], sent[1]):
        alice.open(cid, e)
    assert settled(alice) == []
    alice.open(cid, sent[2])
    assert settled(alice) == [((1, 2, 3), Verdict.VERIFIED, True)]


def test_a_flood_of_forged_candidates_costs_bounded_state_and_work():
    _, cid, alice, bob, carol = three(sign_every=8)
    sent = [bob.seal(cid, text(f"b{i}")) for i in range(9)]
    alice.open(cid, sent[0])
    for step in range(1, 8):
        for n in range(40):  # 280 forged candidates, every one authenticates
            alice.open(cid, forge_as(carol, cid, bob, step, f"forged {step}.{n}"))
    for e in sent[1:8]:
        alice.open(cid, e)  # the genuine ones, last
    assert alice.counters["candidate_kept"] == MAX_OTHERS
    start = time.perf_counter()
    alice.open(cid, sent[8])
    elapsed = time.perf_counter() - start
    verdicts = {v for _, v, _ in settled(alice)}
    assert Verdict.FORGED in verdicts  # what was shown first was Carol's
    assert elapsed < 0.05  # ≤ MAX_COVER_TRIES tag checks, not 41^7


def test_sign_every_one_and_zero_show_nothing_pending():
    for every in (0, 1):
        _, cid, alice, bob, _ = three(sign_every=every)
        opened = [alice.open(cid, bob.seal(cid, text(str(i)))) for i in range(3)]
        assert [o.pending for o in opened if o] == [False, False, False]
        assert settled(alice) == []


def test_after_a_clean_restart_the_sender_s_next_signature_covers_what_came_before():
    """A clean stop (park) keeps the digests of our unsigned envelopes since our last
    signed one: the next start's signed envelope covers them too. Each standalone
    ``fieldchat device send`` is such a restart; before this, every message it sent
    unsigned stayed pending at the receivers for good."""
    mesh, cid, alice, bob, _ = three()
    before = [bob.seal(cid, text(f"b{i}")) for i in range(3)]  # 0 signed, 1-2 unsigned
    bob.flush()
    bob.park()
    bob = mesh.engines["bob"] = Engine(bob.identity, store=bob.store)
    assert bob.store.load_prefix("sentcover/") == {}  # consumed at load
    after = [bob.seal(cid, text(f"b{i}")) for i in range(3, 5)]
    assert read_header(after[1]).cover(after[1]) == 3  # step 4 covers steps 1-3
    for e in before + after:
        alice.open(cid, e)
    assert settled(alice) == [((1, 2, 3), Verdict.VERIFIED, True)]


def test_a_malformed_sent_cover_record_is_counted_and_dropped():
    _, cid, _, bob, _ = three()
    bob.seal(cid, text("b0"))
    bob.seal(cid, text("b1"))
    bob.park()
    (key,) = bob.store.load_prefix("sentcover/")
    bob.store.save({key: b"\x93\x00"})
    again = Engine(bob.identity, store=bob.store)
    assert again.counters["corrupt_record"] == 1
    assert again.store.load_prefix("sentcover/") == {}
    signed = [again.seal(cid, text(f"b{i}")) for i in range(2, 5)][-1]
    assert read_header(signed).cover(signed) == 2  # steps 2-3 only, as after a crash


def test_after_a_sender_crash_the_signature_covers_only_what_came_since():
    """Without a clean stop the sender's coverage memory is lost (§6.5): its next signed
    envelope covers the steps sealed since the restart; the earlier ones stay pending,
    never flagged as forged."""
    _, cid, alice, bob, _ = three()
    before = [bob.seal(cid, text(f"b{i}")) for i in range(3)]  # 0 signed, 1-2 unsigned
    bob._sealer._covering.clear()  # what a restart forgets
    after = [bob.seal(cid, text(f"b{i}")) for i in range(3, 5)]
    assert read_header(after[1]).cover(after[1]) == 1  # step 4 covers step 3 only
    for e in before + after:
        alice.open(cid, e)
    assert settled(alice) == [((3,), Verdict.VERIFIED, True)]
    assert alice.counters["coverage_forged"] == 0


def test_coverage_records_of_a_rolled_back_transaction_are_written_again(tmp_path):
    """The device flushes inside its transaction; if that rolls back, the coverage the
    engine holds in memory is written by the next flush instead of being lost."""
    mesh, cid, alice, bob, _ = three()
    state = DeviceState(tmp_path / "alice.sqlite3")
    try:
        state.save(alice.store.load_prefix(""))  # alice's records so far, now on file
        mesh.engines["alice"] = alice = Engine(alice.identity, store=state)
        sent = [bob.seal(cid, text(f"b{i}")) for i in range(5)]

        def failing_batch() -> None:
            with state.transaction():
                for e in sent[:4]:
                    alice.open(cid, e)
                alice.flush()
                raise RuntimeError("the batch failed after the flush")

        with pytest.raises(RuntimeError):
            failing_batch()
        assert list(state.load_prefix("covered/")) == []  # rolled back
        alice.flush()
        assert len(state.load_prefix("covered/")) == 3
        alice = reopen(mesh, "alice")
        alice.open(cid, sent[4])
        assert settled(alice) == [((1, 2, 3), Verdict.VERIFIED, True)]
    finally:
        state.close()


def test_too_many_waiting_signatures_on_disk_are_dropped_past_the_bound():
    mesh, cid, alice, bob, _ = three()
    sent = [bob.seal(cid, text(f"b{i}")) for i in range(5)]
    alice.open(cid, sent[0])
    alice.open(cid, sent[4])  # waits for steps 1..3
    alice.flush()
    ((key, raw),) = alice.store.load_prefix("covering/").items()
    fields = unpack(raw, "test")
    extra = {}
    for step in range(8, 8 + 4 * MAX_WAITING, 4):  # as if more had waited
        extra[key.rsplit("/", 1)[0] + f"/{step}"] = pack((*fields[:3], step, *fields[4:]))
    alice.store.save(extra)
    alice = reopen(mesh, "alice")
    assert alice.counters["corrupt_record"] == 1  # the oldest, step 4, beyond MAX_WAITING
    alice.flush()
    assert key not in alice.store.load_prefix("covering/")
    assert len(alice.store.load_prefix("covering/")) == MAX_WAITING


def reopen(mesh: Mesh, name: str) -> Engine:
    """``name``'s engine read back from its key store, as after a restart (the device
    flushes in the transaction of each batch of messages, and on close)."""
    old = mesh[name]
    old.flush()
    mesh.engines[name] = Engine(old.identity, store=old.store)
    return mesh[name]


def test_a_message_pending_before_a_restart_is_verified_after_it():
    mesh, cid, alice, bob, _ = three()
    sent = [bob.seal(cid, text(f"b{i}")) for i in range(5)]
    opened = [alice.open(cid, e) for e in sent[:4]]
    assert [o.pending for o in opened if o] == [False, True, True, True]
    alice = reopen(mesh, "alice")
    assert text_of(alice.open(cid, sent[4])) == "b4"
    assert settled(alice) == [((1, 2, 3), Verdict.VERIFIED, True)]
    alice.flush()
    assert list(alice.store.load_prefix("covered/")) == []  # settled: the records are gone


def test_a_forgery_shown_before_a_restart_is_flagged_after_it():
    mesh, cid, alice, bob, carol = three()
    sent = [bob.seal(cid, text(f"b{i}")) for i in range(9)]
    forgery = forge_as(carol, cid, bob, 2, "from bob: pay Carol")
    for e in (sent[0], sent[1], forgery, sent[2], sent[3]):
        alice.open(cid, e)  # Bob's own step 2, second, kept as a candidate
    alice = reopen(mesh, "alice")
    alice.open(cid, sent[4])
    assert settled(alice) == [((1, 3), Verdict.VERIFIED, True), ((2,), Verdict.FORGED, True)]
    # The next window: the signed envelope waits for a missing step across a restart.
    for e in (sent[5], sent[7], sent[8]):
        alice.open(cid, e)
    alice = reopen(mesh, "alice")
    forged = forge_as(carol, cid, bob, 6, "forged")
    alice.open(cid, forged)
    assert settled(alice) == [((5, 6, 7), Verdict.FORGED, False)]
    assert alice.counters["coverage_forged"] == 3


def test_corrupt_coverage_records_are_dropped_and_counted_at_load():
    mesh, cid, alice, bob, _ = three()
    sent = [bob.seal(cid, text(f"b{i}")) for i in range(5)]
    for e in sent[:4]:
        alice.open(cid, e)
    alice.flush()
    records = sorted(alice.store.load_prefix("covered/"))
    assert len(records) == 3  # steps 1, 2, 3: one record each
    alice.store.save(
        {
            records[1]: b"\x93not a record",  # step 2: msgpack junk
            records[2]: b"\x00" * 100_000,  # step 3: oversized
            f"covering/{cid}/0/0/0/4": b"\xc1",  # a waiting signature that does not parse
        }
    )
    alice = reopen(mesh, "alice")
    assert alice.counters["corrupt_record"] == 3
    alice.open(cid, sent[4])  # steps 2 and 3 are forgotten: the signature waits for them
    assert settled(alice) == []
    alice.flush()
    assert sorted(alice.store.load_prefix("covered/")) == records[:1]  # dropped from disk
    assert sorted(alice.store.load_prefix("covering/")) == [f"covering/{cid}/0/0/0/4"]
    assert reopen(mesh, "alice").counters["corrupt_record"] == 0


def test_controls_that_change_membership_or_keys_are_signed_and_forgeries_ignored():
    """LEAVE makes an admin remove the sender; UPDATE and REKEY make it issue an epoch
    for everyone. Under sign_every = 4 Carol could seal them unsigned in Alice's name,
    so they are always sealed signed and an unsigned one is ignored (and counted).
    Before this, Carol's forged LEAVE got Alice removed by Bob, the admin."""
    mesh, cid, alice, bob, carol = three(sign_every=4)
    assert bob.roster(cid).is_admin(bob.pid) and not bob.roster(cid).is_admin(alice.pid)
    send = alice._convs[cid].send
    assert send is not None
    while send.step % 4 == 0:  # Alice's next step is an unsigned one
        alice.seal(cid, text("a"))
    step = send.step
    for op in (ControlOp.REKEY, ControlOp.LEAVE):
        opened = bob.open(cid, forge_as(carol, cid, alice, step, Control(op=op)))
        assert opened is not None and not opened.signed  # it opens: a member sealed it
        step += 1
    assert bob.counters["unsigned_control"] == 2
    assert not bob.epoch_requests_due() and bob.answer_updates() == []
    # Alice's own controls are signed whatever the policy, and acted on (her envelopes
    # of the steps Carol used are not sent here: Bob would take them for duplicates).
    while send.step < step:
        alice.seal(cid, text("b"))
    opened = bob.open(cid, alice.request_epoch(cid))
    assert opened is not None and opened.signed
    assert bob.answer_updates(), "a signed REKEY is answered"
    leave = bob.open(cid, alice.leave(cid))
    assert leave is not None and leave.signed

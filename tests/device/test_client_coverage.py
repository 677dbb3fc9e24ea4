"""Delayed authentication on a real Mosquitto (issue 16, item 5; PROTOCOL.md §6.5).

Carol, a member of a ``sign_every`` = 4 conversation, publishes an unsigned envelope
in Alice's name at Alice's next step, before Alice sends it. Bob shows it as pending,
and when Alice's next signed envelope arrives (within 4 messages) he flags it as a
forgery: a ``ForgeryDetected`` event, the ``forgery`` counter, the row stored
``FORGED``, and the ``listen`` line marked. Alice's own messages go pending → verified.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from fieldchat.device.chains import step_keys
from fieldchat.device.cli_output import note, render
from fieldchat.device.client import Device
from fieldchat.device.events import Event, ForgeryDetected, MessageReceived, MessageVerified
from fieldchat.device.history import GatewayHistory
from fieldchat.device.rows import Trust
from fieldchat.schemas import Control, ControlOp, Policy, TextMessage, Topics
from fieldchat.schemas.crypto import aead_seal
from fieldchat.schemas.envelope import EnvelopeKind, header_bytes
from fieldchat.schemas.ids import decode_id
from fieldchat.schemas.messages import encode_plaintext, kind_of
from tests.device.conftest import FAST, STACK_QUEUE, Devices, Peer, texts, wait_until
from tests.device.test_client_trust import members, publish

pytestmark = pytest.mark.mosquitto


def test_a_members_forgery_is_flagged_within_n_messages(mosquitto_devices: Devices) -> None:
    devices = mosquitto_devices
    cid, (alice, bob, carol) = members(devices, Policy(sign_every=4), "alice", "bob", "carol")
    index = alice.engine.roster(cid).index_of(alice.pid)
    kept = carol.engine._convs[cid].recv[(0, index, 0)]  # Carol's copy of Alice's chain
    sent = 0
    while kept.step % 4 == 0:  # Carol forges an unsigned step: Alice's next is signed
        alice.send(cid, f"a{sent}")
        sent += 1
        wait_until(holds(carol, cid, sent), 10, "carol has it")
    step = kept.step
    header = header_bytes(EnvelopeKind.TEXT, 0, index, 0, step, signed=False)
    plaintext, _, _ = encode_plaintext(TextMessage(sent_at=1, text="from alice: trust carol"))
    forged = header + aead_seal(
        step_keys(kept.key)[0], step.to_bytes(12, "big"), plaintext, header + decode_id(cid)
    )
    publish(devices.broker, Topics().msg(cid), forged)
    wait_until(lambda: "from alice: trust carol" in texts(bob, cid), 10, "bob shows it")
    row = next(r for r in bob.messages(cid) if r.text == "from alice: trust carol")
    assert row.trust is Trust.PENDING
    assert render([row], json_out=False).endswith(b"from alice: trust carol [pending]\n")

    for i in range(4):  # Alice's next signed step comes within these four
        alice.send(cid, f"b{i}")
    events = devices.events[bob.pid]
    wait_until(
        lambda: any(isinstance(e, ForgeryDetected) for e in events), 30, "the forgery flagged"
    )
    flagged = next(e for e in events if isinstance(e, ForgeryDetected))
    assert (flagged.sender, flagged.steps, flagged.pinpointed) == (alice.pid, (step,), True)
    assert bob.counters["forgery"] == 1
    rows = {r.text: r for r in bob.messages(cid)}
    assert rows["from alice: trust carol"].trust is Trust.FORGED
    line = render([rows["from alice: trust carol"]], json_out=False)
    assert line.endswith(b"from alice: trust carol [FORGED]\n")
    # Alice's unsigned messages were pending, then verified; her signed one authentic.
    shown = [e for e in events if isinstance(e, MessageReceived) and e.text.startswith("b")]
    pending = {e.text for e in shown if e.pending}
    assert pending
    wait_until(
        lambda: all(bob.messages(cid) and rows_trust(bob, cid, t) for t in pending),
        15,
        "the pending ones verified",
    )
    assert any(isinstance(e, MessageVerified) for e in events)


def test_messages_pending_when_the_receiver_stops_are_verified_after_its_restart(
    mosquitto_devices: Devices,
) -> None:
    """Bob closes while Alice's unsigned messages are pending, and starts again before
    her next signed envelope: it settles them (the coverage state is in his state file,
    written with the messages). Before, they stayed pending for good."""
    devices = mosquitto_devices
    cid, (alice, bob) = members(devices, Policy(sign_every=4), "alice", "bob")
    events = devices.events[bob.pid]
    sent = 0
    while not (shown := received(events)) or not shown[-1].pending:
        alice.send(cid, f"a{sent}")
        sent += 1
        wait_until(holds(bob, cid, sent), 10, "bob has it")
        assert sent < 8, "no unsigned message in two windows"
    last_signed = max((e.step for e in shown if not e.pending), default=-1)
    pending = [e for e in shown if e.pending and e.step > last_signed]  # not settled yet
    assert all(r.trust is Trust.PENDING for r in bob.messages(cid) if r.step > last_signed)
    bob = devices.reopen(bob)
    bob.wait_connected(10)
    restart = len(events)
    for i in range(4):  # Alice's next signed step comes within these four
        alice.send(cid, f"b{i}")
    wait_until(
        lambda: all(rows_trust(bob, cid, e.text) for e in pending), 20, "the pending ones verified"
    )
    verified = {s for e in events[restart:] if isinstance(e, MessageVerified) for s in e.steps}
    assert {e.step for e in pending} <= verified
    assert bob.counters["forgery"] == 0


def test_messages_pending_when_the_receiver_is_killed_are_verified_after_its_restart(
    mosquitto_devices: Devices,
) -> None:
    """Bob's process is SIGKILLed (no flush, no clean stop) once it has stored Alice's
    unsigned messages: the coverage state was committed with them, so the restarted
    Bob settles them when her signed envelope comes."""
    devices = mosquitto_devices
    cid, (alice, bob) = members(devices, Policy(sign_every=4), "alice", "bob")
    path = bob.state.path
    devices.open.remove(bob)
    bob.close()
    peer = Peer(path, devices.broker, bob.pid, cid).start(expect=1_000, duration=60)  # runs on
    try:
        sent: list[str] = []
        while not sent or (alice.engine.sending_step(cid) or 0) % 4 == 1:
            sent.append(f"a{len(sent)}")  # until the last one sent is unsigned
            alice.send(cid, sent[-1])
            assert len(sent) < 8, "no unsigned step in two windows"
        # Bob receipts what he stored: then it is committed, coverage records included.
        wait_until(lambda: alice.undelivered(cid) == 0, 30, "bob stored them")
        peer.kill()
    finally:
        if peer.proc is not None:
            peer.kill()
    events: list[Event] = []
    bob = Device(path, devices.broker.options(bob.pid), link=FAST, on_event=events.append)
    devices.open.append(bob)
    bob.start().wait_connected(10)
    pending = [r.text or "" for r in bob.messages(cid) if r.trust is Trust.PENDING]
    assert pending, [(r.step, r.text, r.trust.name) for r in bob.messages(cid)]
    for i in range(4):  # Alice's next signed step comes within these four
        alice.send(cid, f"b{i}")
    wait_until(
        lambda: all(rows_trust(bob, cid, text) for text in pending), 20, "the pending verified"
    )
    assert any(isinstance(e, MessageVerified) for e in events)


def received(events: list[Event]) -> list[MessageReceived]:
    return [e for e in events if isinstance(e, MessageReceived)]


def test_a_members_forged_leave_removes_nobody(mosquitto_devices: Devices) -> None:
    """Carol seals an unsigned LEAVE in Bob's name (she holds his chain key). Alice, the
    admin, used to remove Bob on it; LEAVE is acted on only when signed (§6.5)."""
    devices = mosquitto_devices
    cid, (alice, bob, carol) = members(devices, Policy(sign_every=4), "alice", "bob", "carol")
    index = bob.engine.roster(cid).index_of(bob.pid)
    kept = carol.engine._convs[cid].recv[(0, index, 0)]  # Carol's copy of Bob's chain
    sent = 0
    while kept.step % 4 == 0:  # Carol forges an unsigned step
        bob.send(cid, f"b{sent}")
        sent += 1
        wait_until(holds(carol, cid, sent), 10, "carol has it")
    step = kept.step
    leave = Control(op=ControlOp.LEAVE)
    header = header_bytes(kind_of(leave), 0, index, 0, step, signed=False)
    plaintext, _, _ = encode_plaintext(leave)
    forged = header + aead_seal(
        step_keys(kept.key)[0], step.to_bytes(12, "big"), plaintext, header + decode_id(cid)
    )
    publish(devices.broker, Topics().msg(cid), forged)
    wait_until(lambda: alice.engine.counters["unsigned_control"] == 1, 10, "alice ignores it")
    assert alice.engine.roster(cid).epoch == 0 and bob.engine.is_member(cid)
    bob.send(cid, "at the step carol used")  # a second candidate of that step (§6.5)
    bob.send(cid, "still here")
    wait_until(lambda: "still here" in texts(alice, cid), 10, "bob's next text")
    assert alice.engine.roster(cid).epoch == 0


def holds(device: Device, cid: str, count: int) -> Callable[[], bool]:
    return lambda: len(texts(device, cid)) == count


def rows_trust(device, cid: str, text: str) -> bool:
    rows = [r for r in device.messages(cid) if r.text == text]
    return bool(rows) and rows[0].trust is Trust.VERIFIED


def test_messages_sent_one_process_at_a_time_are_verified(mosquitto_devices: Devices) -> None:
    """Each standalone ``fieldchat device send`` opens the state, sends one message and
    stops cleanly. The unsigned ones used to stay pending at the receivers for good:
    the sender forgot their digests at each stop. A clean stop keeps them (§6.5)."""
    devices = mosquitto_devices
    cid, (alice, bob) = members(devices, Policy(sign_every=4), "alice", "bob")
    for i in range(5):  # a new process for each message, as the CLI does
        alice.send(cid, f"one at a time {i}")
        assert alice.wait_drained(10)
        alice = devices.reopen(alice)
    wait_until(lambda: len(texts(bob, cid)) == 5, 15, "bob has them")
    wait_until(
        lambda: all(r.trust is not Trust.PENDING for r in bob.messages(cid)),
        15,
        "none left pending",
    )
    assert {r.trust for r in bob.messages(cid)} <= {Trust.VERIFIED, Trust.AUTHENTIC}
    assert bob.counters["forgery"] == 0


def test_the_cli_says_verified_quietly_and_forgery_loudly(
    capsys: pytest.CaptureFixture[str],
) -> None:
    verified = MessageVerified("c" * 22, "p" * 22, 0, 1, 0, (1, 2, 3))
    forged = ForgeryDetected("c" * 22, "p" * 22, 0, 1, 0, (2,), pinpointed=True)
    note(verified, json_out=False)
    note(forged, json_out=False)
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "-- verified: 3 pending message(s) from pppppppp (steps 1, 2, 3)"
    assert err[1].startswith(f"FORGERY: message(s) shown as from {'p' * 22} in {'c' * 22}")
    assert "steps 2) were NOT sent by them" in err[1]
    note(forged, json_out=True)
    out = json.loads(capsys.readouterr().out)
    assert (out["type"], out["steps"], out["pinpointed"]) == ("forgery", [2], True)


def test_a_device_reading_the_archive_flags_the_forgery_too(gateway_stack) -> None:
    """Bob is away while Carol forges Alice's next unsigned step and Alice sends on: his
    broker queue is full (Carol's messages in another conversation), so all of it comes
    from the gateway's archive, which keeps both candidates of the step. Reading it, Bob
    applies the same rule: Alice's own envelope is the other candidate, the forgery is
    flagged and named."""
    _, gateway, devices = gateway_stack
    alice, carol = devices.make("alice"), devices.make("carol")
    bob = devices.make("bob", start=False)
    bob.history = GatewayHistory(gateway.base, bob.engine.identity)
    bob.start().wait_connected(10)
    cid = alice.create_conversation([bob.pid, carol.pid], policy=Policy(sign_every=4))
    side = carol.create_conversation([bob.pid])
    wait_until(
        lambda: (
            all(
                cid in d.engine._convs and len(d.engine._convs[cid].recv) == 2
                for d in (alice, bob, carol)
            )
            and bob.engine.is_member(side)
        ),
        15,
        "everyone holds everyone's chain",
    )
    index = alice.engine.roster(cid).index_of(alice.pid)
    kept = carol.engine._convs[cid].recv[(0, index, 0)]
    sent = 0
    while kept.step % 4 == 0:
        alice.send(cid, f"a{sent}")
        sent += 1
        wait_until(holds(carol, cid, sent), 10, "carol has it")
    wait_until(lambda: len(texts(bob, cid)) == sent, 10, "bob has it")
    path, history = bob.state.path, bob.history
    bob.close()  # Mosquitto keeps his session and STACK_QUEUE of its messages
    devices.open.remove(bob)
    for i in range(STACK_QUEUE):  # one PUBLISH each: his queue fills
        carol.send(side, f"side {i}")
        assert carol.wait_drained(10)

    step = kept.step
    header = header_bytes(EnvelopeKind.TEXT, 0, index, 0, step, signed=False)
    plaintext, _, _ = encode_plaintext(TextMessage(sent_at=1, text="from alice: trust carol"))
    forged = header + aead_seal(
        step_keys(kept.key)[0], step.to_bytes(12, "big"), plaintext, header + decode_id(cid)
    )
    publish(devices.broker, Topics().msg(cid), forged)
    # Archived before Alice sends her own step: the archive serves the forgery first.
    assert history is not None
    wait_until(lambda: forged in history.since(cid, 0, 500)[0], 20, "the forgery archived")
    for i in range(4):
        alice.send(cid, f"b{i}")
        assert alice.wait_drained(10)
    wait_until(lambda: kept.step >= step + 4, 10, "carol got alice's signed step")
    alice_pid = alice.pid
    alice.close()  # nobody answers Bob's gap requests: the archive is his only source
    devices.open.remove(alice)

    bob = Device(path, devices.broker.options(bob.pid), link=FAST, history=history)
    events: list[Event] = []
    bob.on_event = events.append
    devices.open.append(bob)
    bob.start()

    try:
        wait_until(
            lambda: any(isinstance(e, ForgeryDetected) for e in events), 60, "the forgery flagged"
        )
    except AssertionError:
        rows = [(r.step, r.text, r.trust.name) for r in bob.messages(cid)]
        raise AssertionError(f"{rows} {dict(bob.counters)} {events}") from None
    flagged = next(e for e in events if isinstance(e, ForgeryDetected))
    assert (flagged.sender, flagged.steps, flagged.pinpointed) == (alice_pid, (step,), True)
    assert bob.counters["forgery"] == 1
    trust = {r.text: r.trust for r in bob.messages(cid)}
    assert trust["from alice: trust carol"] is Trust.FORGED
    assert Trust.VERIFIED in trust.values()

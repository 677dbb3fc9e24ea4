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
from tests.device.conftest import FAST, STACK_QUEUE, Devices, texts, wait_until
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

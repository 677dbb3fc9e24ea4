"""The ACL cases run against fieldchat's broker *and* real Mosquitto (same table).

World: alice founded conversation X with bob (signed epoch-0 roster, retained on
``c/X/roster``); carol is enrolled but not a member; ``gw-test`` is a gateway.

Rosters: no participant writes ``c/X/roster`` on Mosquitto (it cannot verify them;
members propose on ``c/X/propose`` and a gateway retains what chains), and ours
refuses anything that does not chain; proposals reach gateways only.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from fieldchat.broker.testing import found_roster, participant
from fieldchat.schemas.roster import Roster
from fieldchat.schemas.topics import Topics
from tests.broker._peers import Peer

T = Topics()
ALICE, BOB, CAROL = participant(1), participant(2), participant(3)
GATEWAY = "gw-test"
ROSTER_X: Roster = found_roster(ALICE, [BOB])
X = ROSTER_X.cid


RETAINED_ROSTER = "retained roster of X"
PROPOSAL = "X's roster proposed again by the observer"
SYS = "any $SYS message"


@dataclass(frozen=True)
class Case:
    """``actor`` may (not) ``action`` ``topic``.

    A publish is checked by its delivery to the observer. A subscription is checked
    by what it delivers: after subscribing, ``probe`` is published by the observer
    (or is X's retained roster, or X's current roster proposed again, which both
    brokers relay to gateways, or any ``$SYS`` message) and must arrive exactly when
    the subscription is allowed. Brokers differ in the SUBACK of a refused
    subscription (ours: 0x80; Mosquitto 2.0.11 grants it and delivers nothing), so
    that code is checked only with ``strict_suback``.
    """

    actor: str  # "alice" | "bob" | "carol" | "gateway"
    action: str  # "publish" | "subscribe"
    topic: str
    allowed: bool
    probe: str | None = None

    def __str__(self) -> str:
        verdict = "may" if self.allowed else "may not"
        return f"{self.actor} {verdict} {self.action} {self.topic}"


CASES: list[Case] = [
    # publish: own p/ topics, others' inboxes, conversations the roster lists
    Case("alice", "publish", T.bundle(ALICE.pid), True),
    Case("alice", "publish", T.status(ALICE.pid), True),
    Case("alice", "publish", T.bundle(BOB.pid), False),
    Case("alice", "publish", T.status(BOB.pid), False),
    Case("alice", "publish", T.inbox(BOB.pid), True),
    Case("carol", "publish", T.inbox(ALICE.pid), True),
    Case("alice", "publish", T.msg(X), True),
    Case("bob", "publish", T.msg(X), True),
    Case("carol", "publish", T.msg(X), False),
    Case("carol", "publish", T.roster(X), False),
    Case("bob", "publish", T.roster(X), False),  # members propose; only verifiers retain
    Case("gateway", "publish", T.msg(X), True),
    Case("gateway", "publish", T.inbox(CAROL.pid), True),
    # subscribe: own inbox, bundles/status, own conversations; no wildcards, no $SYS
    Case("alice", "subscribe", T.inbox(ALICE.pid), True, T.inbox(ALICE.pid)),
    Case("alice", "subscribe", T.inbox(BOB.pid), False, T.inbox(BOB.pid)),
    Case("alice", "subscribe", T.bundle(BOB.pid), True, T.bundle(BOB.pid)),
    Case("alice", "subscribe", T.status(BOB.pid), True, T.status(BOB.pid)),
    Case("alice", "subscribe", T.msg(X), True, T.msg(X)),
    Case("bob", "subscribe", T.roster(X), True, RETAINED_ROSTER),
    Case("carol", "subscribe", T.msg(X), False, T.msg(X)),
    Case("carol", "subscribe", T.roster(X), False, RETAINED_ROSTER),
    Case("carol", "subscribe", "#", False, T.msg(X)),
    Case("carol", "subscribe", "$SYS/#", False, SYS),
    Case("carol", "subscribe", T.all_msgs(), False, T.msg(X)),
    Case("carol", "subscribe", "fc/v1/p/+/inbox", False, T.inbox(ALICE.pid)),
    Case("carol", "subscribe", "fc/v1/c/#", False, RETAINED_ROSTER),
    Case("bob", "subscribe", T.propose(X), False, PROPOSAL),
    Case("carol", "subscribe", T.all_proposals(), False, PROPOSAL),
    Case("gateway", "subscribe", T.all_msgs(), True, T.msg(X)),
    Case("gateway", "subscribe", f"$share/archive/{T.all_msgs()}", True, T.msg(X)),
    Case("gateway", "subscribe", T.all_rosters(), True, RETAINED_ROSTER),
    Case("gateway", "subscribe", T.all_proposals(), True, PROPOSAL),
    Case("gateway", "subscribe", "#", False, SYS),
    Case("gateway", "subscribe", "$SYS/#", False, SYS),
]


def run_cases(
    port: int, credentials: dict[str, tuple[str, str]], *, strict_suback: bool = True
) -> list[str]:
    """Run every case; return the descriptions of those that did not hold.

    ``credentials`` maps actor names (and ``observer``, a second gateway) to
    ``(username, password)``. X's roster must already be retained. Each case uses
    its own connection, because our broker disconnects a publisher that tries a
    forbidden topic. Also checks that carol, a non-member subscribed to her own
    inbox, receives nothing of X meanwhile (retained or live).
    """
    failures: list[str] = []
    peers: list[Peer] = []

    def connect(actor: str) -> Peer:
        user, password = credentials[actor]
        peer = Peer(port, user, password)
        peers.append(peer)
        peer.connect()
        return peer

    try:
        observer = connect("observer")
        for kind in ("c/+/msg", "c/+/roster", "p/+/bundle", "p/+/status", "p/+/inbox"):
            assert observer.subscribe(f"fc/v1/{kind}") != 128, kind
        observer.drain(0.5)  # retained replay (X's roster)
        outsider = connect("carol")
        assert outsider.subscribe(T.inbox(CAROL.pid)) != 128
        counter = itertools.count()
        expected: dict[bytes, Case] = {}
        for case in (c for c in CASES if c.action == "publish"):
            payload = b"case-%d\x00\xff" % next(counter)
            expected[payload] = case
            peer = connect(case.actor)
            if not peer.publish(case.topic, payload) and case.allowed:
                failures.append(f"{case}: not acknowledged ({peer.refusal or 'timeout'})")
            peer.disconnect()
        seen = {m.payload: m.topic for m in observer.drain(1.0)}
        for payload, case in expected.items():
            delivered = payload in seen and seen[payload] == case.topic
            if delivered != case.allowed:
                failures.append(str(case))
        for case in (c for c in CASES if c.action == "subscribe"):
            peer = connect(case.actor)
            code = peer.subscribe(case.topic)
            payload = b"probe-%d\x00\xff" % next(counter)
            if case.probe == PROPOSAL:
                assert observer.publish(T.propose(X), ROSTER_X.to_bytes())
            elif case.probe not in (None, RETAINED_ROSTER, SYS):
                assert observer.publish(case.probe, payload)
            got = peer.drain(0.4)
            if case.probe == RETAINED_ROSTER:
                delivered = any(m.payload == ROSTER_X.to_bytes() for m in got)
            elif case.probe == PROPOSAL:
                delivered = any(m.topic == T.propose(X) for m in got)
            elif case.probe == SYS:
                delivered = any(m.topic.startswith("$SYS") for m in got)
            else:
                delivered = any(m.payload == payload for m in got)
            if delivered != case.allowed:
                failures.append(f"{case} (delivered: {delivered})")
            elif strict_suback and (code != 128) != case.allowed:
                failures.append(f"{case} (SUBACK {code})")
            peer.disconnect()
        leaked = [m.topic for m in outsider.drain(0.3) if X in m.topic]
        if leaked:
            failures.append(f"carol received {leaked} of a conversation she is not in")
    finally:
        for peer in peers:
            peer.close()
    return failures


def set_up_conversation(port: int, creds: dict[str, str]) -> None:
    """X's roster retained by alice; bob's persistent session subscribed to X's
    messages, then offline: what alice publishes next is queued for him."""
    alice = Peer(port, ALICE.pid, creds[ALICE.pid])
    alice.connect()
    assert alice.publish(T.roster(X), ROSTER_X.to_bytes(), retain=True)
    alice.disconnect()
    bob = Peer(port, BOB.pid, creds[BOB.pid], clean=False)
    bob.connect()
    assert bob.subscribe(T.msg(X)) == 1
    bob.disconnect()

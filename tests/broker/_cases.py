"""The ACL cases run against fieldchat's broker *and* real Mosquitto (same table).

World: alice founded conversation X with bob (signed epoch-0 roster, retained on
``c/X/roster``); carol is enrolled but not a member; ``gw-test`` is a gateway.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from broker.testing import found_roster, participant
from schemas.roster import Roster
from schemas.topics import Topics
from tests.broker._peers import Peer

T = Topics()
ALICE, BOB, CAROL = participant(1), participant(2), participant(3)
GATEWAY = "gw-test"
ROSTER_X: Roster = found_roster(ALICE, [BOB])
X = ROSTER_X.cid


@dataclass(frozen=True)
class Case:
    actor: str  # "alice" | "bob" | "carol" | "gateway"
    action: str  # "publish" | "subscribe"
    topic: str
    allowed: bool

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
    Case("gateway", "publish", T.msg(X), True),
    Case("gateway", "publish", T.inbox(CAROL.pid), True),
    # subscribe: own inbox, bundles/status, own conversations; no wildcards, no $SYS
    Case("alice", "subscribe", T.inbox(ALICE.pid), True),
    Case("alice", "subscribe", T.inbox(BOB.pid), False),
    Case("alice", "subscribe", T.bundle(BOB.pid), True),
    Case("alice", "subscribe", T.status(BOB.pid), True),
    Case("alice", "subscribe", T.msg(X), True),
    Case("bob", "subscribe", T.roster(X), True),
    Case("carol", "subscribe", T.msg(X), False),
    Case("carol", "subscribe", T.roster(X), False),
    Case("carol", "subscribe", "#", False),
    Case("carol", "subscribe", "$SYS/#", False),
    Case("carol", "subscribe", T.all_msgs(), False),
    Case("carol", "subscribe", "fc/v1/p/+/inbox", False),
    Case("carol", "subscribe", "fc/v1/c/#", False),
    Case("gateway", "subscribe", T.all_msgs(), True),
    Case("gateway", "subscribe", f"$share/archive/{T.all_msgs()}", True),
    Case("gateway", "subscribe", T.all_rosters(), True),
    Case("gateway", "subscribe", "#", False),
    Case("gateway", "subscribe", "$SYS/#", False),
]


def run_cases(port: int, credentials: dict[str, tuple[str, str]]) -> list[str]:
    """Run every case; return the descriptions of those that did not hold.

    ``credentials`` maps actor names (and ``observer``, a second gateway) to
    ``(username, password)``. Publishes are checked by delivery to the observer
    (subscribed to every gateway filter); each
    publish uses its own connection, because our broker disconnects a publisher
    that tries a forbidden topic. Also checks that carol, a non-member, receives
    nothing of X (retained or live) while subscribed to her own inbox.
    """
    failures: list[str] = []
    peers: list[Peer] = []
    try:
        user, password = credentials["observer"]  # a second gateway: client id = username
        observer = Peer(port, user, password)
        peers.append(observer)
        observer.connect()
        filters = ("msg", "roster", "bundle", "status", "inbox")
        for topic_filter in (
            f"fc/v1/{'c' if f in ('msg', 'roster') else 'p'}/+/{f}" for f in filters
        ):
            assert observer.subscribe(topic_filter) != 128, topic_filter
        observer.drain(0.5)  # retained replay (X's roster)
        user, password = credentials["carol"]
        outsider = Peer(port, user, password)
        peers.append(outsider)
        outsider.connect()
        assert outsider.subscribe(T.inbox(CAROL.pid)) != 128
        counter = itertools.count()
        expected: dict[bytes, Case] = {}
        for case in (c for c in CASES if c.action == "publish"):
            payload = b"case-%d\x00\xff" % next(counter)
            expected[payload] = case
            user, password = credentials[case.actor]
            peer = Peer(port, user, password)
            peers.append(peer)
            peer.connect()
            peer.publish(case.topic, payload)
            peer.disconnect()
        seen = {m.payload: m.topic for m in observer.drain(1.0)}
        for payload, case in expected.items():
            if (payload in seen) != case.allowed or (
                payload in seen and seen[payload] != case.topic
            ):
                failures.append(str(case))
        by_actor: dict[str, Peer] = {}
        for case in (c for c in CASES if c.action == "subscribe"):
            peer = by_actor.get(case.actor)
            if peer is None:
                user, password = credentials[case.actor]
                peer = by_actor[case.actor] = Peer(port, user, password)
                peers.append(peer)
                peer.connect()
            granted = peer.subscribe(case.topic) != 128
            if granted != case.allowed:
                failures.append(str(case))
        leaked = [m.topic for m in outsider.drain(0.5) if X in m.topic]
        leaked += [m.topic for m in by_actor["carol"].drain(0.3) if X in m.topic]
        if leaked:
            failures.append(f"carol received {leaked} of a conversation she is not in")
    finally:
        for peer in peers:
            peer.close()
    return failures

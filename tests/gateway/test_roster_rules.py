"""The gateway's roster rules without a broker or a database: which rosters it adopts,
holds or refuses, when it republishes a head, and how refusals are counted and logged
(``fieldchat.gateway._rosters``, ``fieldchat.gateway._quota``)."""

from __future__ import annotations

import logging
import os

import pytest

from fieldchat.gateway._metrics import GatewayMetrics
from fieldchat.gateway._quota import RefusalLog
from fieldchat.gateway._rosters import Healer, RosterRefused, Source, Verdict, judge
from fieldchat.schemas import Member, Policy, Roster, Topics
from fieldchat.schemas.errors import RosterRejected
from tests.gateway._support import Party


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def chain_of(admin: Party, member: Party, epochs: int) -> list[Roster]:
    """Rosters 0..epochs-1 of one conversation, each signed by ``admin``."""
    admin.engine.learn_bundle(member.bundle)
    cid, pubs = admin.engine.create_conversation([member.pid])
    out = [
        Roster.from_bytes(
            next(p.payload for p in pubs if p.topic.endswith(("/roster", "/propose")))
        )
    ]
    for _ in range(epochs - 1):
        pubs = admin.engine.set_policy(cid, Policy(sign_every=len(out) + 1))
        out.append(
            Roster.from_bytes(
                next(p.payload for p in pubs if p.topic.endswith(("/roster", "/propose")))
            )
        )
    return out


def forged(by: Party, like: Roster, *, epoch: int, prev: bytes) -> Roster:
    """A roster of ``like``'s conversation signed by ``by`` (validly: not by an admin)."""
    return Roster.create(
        cid=like.cid,
        epoch=epoch,
        nonce=b"",
        prev=prev,
        members=tuple(Member(key=m.key, admin=True) for m in like.members),
        policy=like.policy,
        issued_at=like.issued_at,
        signer_key=by.engine.identity.public,
        commit=bytes(32),
        sign=by.engine.identity.sign,
    )


@pytest.fixture
def parties() -> tuple[Party, Party]:
    topics = Topics("rules/v1")
    return Party(topics), Party(topics)


def test_epoch_0_is_adopted_when_it_founds_its_conversation(parties):
    admin, member = parties
    (r0,) = chain_of(admin, member, 1)
    assert judge(r0, known=None, prev=None) is Verdict.ADOPT
    assert judge(r0, known=r0, prev=None) is Verdict.KNOWN
    stolen = Roster.create(  # the cid of admin's conversation, signed by the member
        cid=r0.cid,
        epoch=0,
        nonce=r0.nonce,
        prev=b"",
        members=(Member(key=member.engine.identity.public, admin=True),),
        policy=r0.policy,
        issued_at=r0.issued_at,
        signer_key=member.engine.identity.public,
        commit=bytes(32),
        sign=member.engine.identity.sign,
    )
    with pytest.raises(RosterRejected):
        judge(stolen, known=None, prev=None)


def test_a_later_epoch_is_held_until_its_predecessor_and_then_must_chain(parties):
    admin, member = parties
    r0, r1, r2 = chain_of(admin, member, 3)
    assert judge(r2, known=None, prev=None) is Verdict.HOLD  # never adopted "as a base"
    assert judge(r2, known=None, prev=r1) is Verdict.ADOPT
    with pytest.raises(RosterRejected):
        judge(r2, known=None, prev=r0)  # epoch 2 does not follow epoch 0
    by_member = forged(member, r1, epoch=2, prev=r1.digest())
    with pytest.raises(RosterRejected):
        judge(by_member, known=None, prev=r1)  # not signed by an admin of epoch 1
    unchained = forged(member, r1, epoch=7, prev=os.urandom(32))
    assert judge(unchained, known=None, prev=None) is Verdict.HOLD


def test_a_different_roster_for_an_archived_epoch_is_a_conflict(parties):
    admin, member = parties
    r0, r1 = chain_of(admin, member, 2)
    other = forged(member, r1, epoch=1, prev=r1.prev)
    with pytest.raises(RosterRefused) as caught:
        judge(other, known=r1, prev=None)
    assert caught.value.reason == "roster_conflict"
    # an archive made before the chain rule may hold a next epoch naming another roster
    with pytest.raises(RosterRejected):
        judge(r1, known=None, prev=r0, following=forged(member, r1, epoch=2, prev=b"x" * 32))


def test_which_sources_are_republished_and_counted_as_foundings():
    assert [s for s in Source if s.republished] == [Source.PROPOSE]  # /ws publishes its own
    assert [s for s in Source if not s.founding_counted] == [Source.ROSTER]


def test_the_healer_republishes_a_head_at_most_once_per_interval():
    clock = Clock()
    healer = Healer(10.0, clock=clock, max_tracked=2)
    assert healer.due("a")
    assert not healer.due("a")  # our own republication cannot trigger another one now
    assert healer.due("b")
    clock.now += 10.0
    assert healer.due("a")
    assert healer.due("c")  # bounded: the least recent is forgotten, never refused
    assert healer.due("b")


def test_every_refusal_is_counted_and_each_reason_logged_once_per_interval(caplog):
    clock = Clock()
    metrics = GatewayMetrics()
    refusals = RefusalLog(metrics, interval_s=60.0, clock=clock)
    with caplog.at_level(logging.WARNING, logger="fieldchat.gateway.quota"):
        logged = [refusals.refuse("pending_sender_full", f"envelope {i}") for i in range(5)]
        assert refusals.refuse("held_full", "a roster")
        clock.now += 61
        assert refusals.refuse("pending_sender_full", "envelope 5")
    assert logged == [True, False, False, False, False]
    assert metrics.rejected_count("mqtt", "pending_sender_full") == 6
    assert metrics.rejected_count("mqtt", "held_full") == 1
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3
    assert "refused 5 (pending_sender_full)" in lines[2]  # the four silent ones and this

"""The broker's quotas as pure objects (injected clock), and the ACL decisions of
issue 13 (propose topic, retained and empty payloads, sizes, wills) without a network."""

from __future__ import annotations

import pytest

from fieldchat.broker import Deny, Limits, Membership, Principal, Rules
from fieldchat.broker._acl import gateway_filters
from fieldchat.broker._quota import FoundingQuota, Pending, Throttle, TokenBucket, address_key
from fieldchat.broker.testing import found_roster, next_roster
from fieldchat.schemas.topics import Topics
from tests.broker._cases import ALICE, BOB, CAROL, ROSTER_X, X

T = Topics()
GW = Principal("gw-test", "gateway")


def who(p) -> Principal:
    return Principal(p.pid, "participant")


def rules() -> Rules:
    return Rules(T, Membership.build({X: ROSTER_X}, []))


# token buckets -----------------------------------------------------------------------


def test_bucket_allows_the_burst_then_asks_to_wait_for_the_refill():
    bucket = TokenBucket(rate=10, burst=5, now=0.0)
    assert [bucket.take(1, 0.0) for _ in range(5)] == [0.0] * 5
    assert bucket.take(1, 0.0) == pytest.approx(0.1)  # one token short at 10/s
    assert bucket.take(1, 0.2) == 0.0  # 0.2 s refilled two
    assert bucket.take(100, 10.0) == pytest.approx((100 - 5) / 10)  # refill capped at the burst


def test_throttle_reports_the_tighter_limit():
    throttle = Throttle(
        0.0, messages_per_s=100, messages_burst=10, bytes_per_s=1000, bytes_burst=1000
    )
    wait, limit = throttle.take(3000, 0.0)
    assert (limit, wait) == ("bytes", pytest.approx(2.0))  # type: ignore[comparison-overlap]
    off = Throttle(0.0, messages_per_s=0, messages_burst=1, bytes_per_s=0, bytes_burst=1024)
    assert off.take(10**9, 0.0) == (0.0, "messages")


def _default_throttle() -> Throttle:
    limits = Limits()
    return Throttle(
        0.0,
        messages_per_s=limits.rate_messages_per_s,
        messages_burst=limits.rate_messages_burst,
        bytes_per_s=limits.rate_bytes_per_s,
        bytes_burst=limits.rate_bytes_burst,
    )


def test_default_rate_never_slows_the_device_benchmark_burst():
    # bench/device.py: 15,000 envelopes/s in frames of 64 (~100 B each) for 5 s
    throttle = _default_throttle()
    frames = int(15_000 / 64 * 5)
    waits = [throttle.take(64 * 100, i / (15_000 / 64)) for i in range(frames)]
    assert max(w for w, _ in waits) == 0.0
    # bench/broker.py: 20,000 back-to-back 256-byte publishes at up to 36,000/s
    throttle = _default_throttle()
    assert max(throttle.take(300, i / 36_000)[0] for i in range(20_000)) == 0.0


# founding quota ------------------------------------------------------------------------


def test_founding_quota_is_a_sliding_window_that_survives_a_reload():
    quota = FoundingQuota(limit=3, window_s=100)
    for at in (0, 10, 20):
        assert quota.allows("p", at)
        quota.record("p", at)
    assert not quota.allows("p", 50)
    assert quota.allows("q", 50)  # per participant
    assert quota.allows("p", 100.5)  # the first one left the window
    again = FoundingQuota(limit=3, window_s=100)
    again.load([("p", 0), ("p", 10), ("p", 20), ("p", -500)], now=50)
    assert not again.allows("p", 50)
    assert FoundingQuota(limit=0, window_s=100).allows("p", 0)  # 0: no limit


# pending connections ------------------------------------------------------------------


def test_pending_caps_each_address_and_evicts_the_oldest_when_full():
    pending: Pending[str] = Pending(per_address=2, total=3)
    assert pending.admit("a1", "A") == (True, None)
    assert pending.admit("a2", "A") == (True, None)
    assert pending.admit("a3", "A") == (False, None)  # over the address cap
    assert pending.admit("b1", "B") == (True, None)
    assert pending.admit("c1", "C") == (True, "a1")  # full: the oldest goes
    assert (len(pending), pending.count("A")) == (3, 1)
    pending.discard("a2")
    pending.discard("a2")  # twice is harmless
    assert pending.count("A") == 0
    assert Pending[str](per_address=0, total=5).admit("x", "A") == (True, None)  # 0: no cap


def test_address_key_groups_an_ipv6_slash_64():
    assert address_key("127.0.0.2") == "127.0.0.2"
    assert address_key("2001:db8::1") == address_key("2001:db8::ffff:1") == "2001:db8::/64"
    assert address_key("::ffff:10.0.0.1") == "10.0.0.1"
    assert address_key("?") == "?"


def test_limits_defaults_of_issue_13():
    limits = Limits()
    assert limits.connect_timeout_s == 5.0
    assert limits.max_pending_per_address == 16
    assert limits.pending_cap == 512
    assert Limits(max_connections=10).pending_cap == 5
    assert (limits.max_founded, limits.founding_window_s) == (100, 86_400)
    assert (limits.max_bundle_bytes, limits.max_status_bytes) == (16 * 1024, 1024)


# ACL decisions -------------------------------------------------------------------------


def test_a_proposal_gets_the_roster_checks():
    r = rules()
    epoch1 = next_roster(ROSTER_X, ALICE, [BOB, CAROL])
    assert r.publish(who(ALICE), T.propose(X), epoch1.to_bytes()) == (None, epoch1)
    assert r.publish(who(ALICE), T.propose(X), ROSTER_X.to_bytes()) == (None, None)  # no-op
    forged = next_roster(ROSTER_X, BOB, [BOB, CAROL])  # bob is no admin
    assert r.publish(who(BOB), T.propose(X), forged.to_bytes()) == (Deny.ROSTER, None)
    assert r.publish(who(BOB), T.propose(X), b"") == (Deny.ROSTER, None)
    assert r.publish(who(CAROL), T.propose(X), epoch1.to_bytes())[0] is None  # listed in it
    assert r.publish(who(CAROL), T.propose(X), ROSTER_X.to_bytes())[0] is Deny.NOT_MEMBER
    new = found_roster(CAROL, [], nonce=b"\x07" * 16)  # epoch 0 before any ACL lists it
    assert r.publish(who(CAROL), T.propose(new.cid), new.to_bytes()) == (None, new)
    assert r.publish(GW, T.propose(X), epoch1.to_bytes()) == (None, epoch1)


def test_proposals_are_for_gateways_only():
    r = rules()
    parsed = T.parse(T.propose(X))
    assert not r.receive(who(ALICE), parsed)
    assert r.receive(GW, parsed)
    assert r.subscribe(who(ALICE), T.propose(X)) is Deny.FORBIDDEN
    assert r.subscribe(GW, T.all_proposals()) is None
    assert r.subscribe(GW, f"$share/archive/{T.all_proposals()}") is None
    assert T.all_proposals() in gateway_filters(T)


@pytest.mark.parametrize("kind", ["inbox", "msg", "propose"])
def test_retained_is_refused_where_no_state_is_kept(kind):
    topic = {"inbox": T.inbox(BOB.pid), "msg": T.msg(X), "propose": T.propose(X)}[kind]
    denial = Deny.RETAINED
    assert rules().publish(who(ALICE), topic, ROSTER_X.to_bytes(), retain=True)[0] is denial
    assert rules().publish(GW, topic, ROSTER_X.to_bytes(), retain=True)[0] is denial
    assert denial.disconnects


def test_bundle_and_status_are_never_empty_nor_too_large():
    r = Rules(T, Membership(), max_bundle_bytes=2048, max_status_bytes=64)
    me = who(ALICE)
    assert r.publish(me, T.bundle(ALICE.pid), b"", retain=True)[0] is Deny.EMPTY
    assert r.publish(me, T.status(ALICE.pid), b"")[0] is Deny.EMPTY
    assert r.publish(me, T.bundle(ALICE.pid), b"b" * 2048, retain=True)[0] is None
    assert r.publish(me, T.bundle(ALICE.pid), b"b" * 2049, retain=True)[0] is Deny.TOO_LARGE
    assert r.publish(me, T.status(ALICE.pid), b"s" * 65, retain=True)[0] is Deny.TOO_LARGE
    assert r.publish(GW, T.status(ALICE.pid), b"s" * 65, retain=True)[0] is Deny.TOO_LARGE
    assert not Deny.EMPTY.disconnects  # acknowledged: an outbox must not resend it forever


def test_wills_never_touch_rosters_and_are_checked_like_publishes():
    r = rules()
    me = who(BOB)
    assert r.will(me, T.status(BOB.pid), b"offline", retain=True) is None
    assert r.will(me, T.msg(X), b"bye", retain=False) is None
    assert r.will(me, T.msg(X), b"bye", retain=True) is Deny.RETAINED
    assert r.will(me, T.inbox(ALICE.pid), b"bye", retain=True) is Deny.RETAINED
    assert r.will(me, T.roster(X), ROSTER_X.to_bytes(), retain=True) is Deny.FORBIDDEN
    assert r.will(me, T.propose(X), ROSTER_X.to_bytes(), retain=False) is Deny.FORBIDDEN
    r.membership.adopt(next_roster(ROSTER_X, ALICE, []))  # bob removed
    assert r.will(me, T.msg(X), b"bye", retain=False) is Deny.NOT_MEMBER

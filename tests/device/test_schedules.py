"""When the device asks the archive, reconciles, resends and subscribes again: the
schedules of device.tail, device.reconcile, device.resend and device.subscriptions, with
explicit times (no broker, no gateway, no sleeps)."""

from __future__ import annotations

from fieldchat.device.reconcile import (
    ARCHIVE_AGAIN_S,
    ARCHIVE_DRAIN_AGAIN_S,
    ARCHIVE_SETTLE_S,
    ArchiveSchedule,
)
from fieldchat.device.resend import GRANT_RESEND_RECEIPTS, Resends
from fieldchat.device.rows import Gap
from fieldchat.device.subscriptions import RESUBSCRIBE_S, Subscriptions, changed, no_local
from fieldchat.device.tail import (
    MAX_GAPS_FOR_TAIL,
    TAIL_AGAIN_S,
    TAIL_CURSOR,
    TAIL_PAGE,
    TAIL_PAGES,
    TAIL_QUIET_S,
    Fetched,
    TailSchedule,
    tail_round,
)
from fieldchat.schemas.errors import TransportError

GAP = Gap("c", 0, 1, 0, 3, 4, "pid", 0.0)


def test_a_tail_round_waits_for_the_backlog_after_a_connect() -> None:
    tail = TailSchedule()
    assert not tail.due(100.0)  # never before connecting
    tail.connected(10.0)
    tail.inbound(10.2)  # the broker's backlog arrives
    assert not tail.due(10.2 + TAIL_QUIET_S - 0.01)
    assert tail.due(10.2 + TAIL_QUIET_S)
    assert tail.start() == []
    assert not tail.due(20.0)  # one round at a time
    tail.finished(20.0, 60.0)
    assert not tail.due(79.9)
    assert tail.due(80.0)


def test_a_gap_or_a_join_brings_the_round_forward_busy_link_or_not() -> None:
    tail = TailSchedule()
    tail.connected(0.0)
    tail.start()
    tail.inbound(1.0)
    assert tail.gap_episode(1.0)
    assert not tail.gap_episode(1.0 + TAIL_AGAIN_S - 0.01)  # one a TAIL_AGAIN_S
    assert not tail.due(1.0)  # a round runs: the asked one follows it at once
    tail.finished(2.0, 60.0)
    assert tail.due(2.0)
    tail.start()
    tail.finished(3.0, 60.0)
    tail.gap_expired(GAP, 3.5)
    assert tail.due(3.5)
    assert tail.start() == [GAP]  # the round names the expired gap, once
    tail.finished(4.0, 60.0)
    tail.soon(4.0)  # a conversation joined
    assert tail.due(4.0) and tail.start() == []


def test_expired_gaps_kept_for_the_next_round_are_bounded() -> None:
    tail = TailSchedule()
    for _ in range(MAX_GAPS_FOR_TAIL + 5):
        tail.gap_expired(GAP, 0.0)
    assert len(tail.start()) == MAX_GAPS_FOR_TAIL


class _Source:
    def __init__(self, pages: dict[int, tuple[list[bytes], int, bool]]) -> None:
        self.pages = pages
        self.asked: list[tuple[str, int, int]] = []

    def since(self, cid: str, after: int, limit: int, *, from_epoch: int = 0):
        self.asked.append((cid, after, from_epoch))
        if after not in self.pages:
            raise TransportError("down")
        assert limit == TAIL_PAGE
        return self.pages[after]

    def rosters(self, cid: str, *, from_epoch: int = 0) -> list[bytes]:
        return []

    def deliveries(self, cid: str) -> list[bytes]:
        return []


def test_a_tail_round_pages_from_the_cursor_and_says_when_to_look_again() -> None:
    source = _Source({0: ([b"a"], 5, True), 5: ([b"b"], 9, False), 7: ([], 7, False)})
    got: list[Fetched] = []
    tail_round(source, [("c", 0, 0), ("d", 7, 2)], {}, got.append, idle_s=60.0)
    assert source.asked == [("c", 0, 0), ("c", 5, 0), ("d", 7, 2)]
    assert got == [
        Fetched("c", [b"a"], cursor=(f"{TAIL_CURSOR}c", "5")),
        Fetched("c", [b"b"], cursor=(f"{TAIL_CURSOR}c", "9")),
        Fetched("d", [], cursor=None),  # the cursor did not move: nothing to save
        Fetched("", [], next_tail=60.0),
    ]


def test_a_tail_round_comes_back_soon_while_the_source_has_more_and_survives_errors() -> None:
    pages = {i: ([b"x"], i + 1, True) for i in range(TAIL_PAGES)}
    source = _Source(pages)
    got: list[Fetched] = []
    tail_round(source, [("c", 0, 0), ("gone", 99, 0)], {}, got.append, idle_s=60.0)
    assert len(source.asked) == TAIL_PAGES + 1
    assert got[-2] == Fetched("gone", [], error="down")
    assert got[-1] == Fetched("", [], next_tail=TAIL_AGAIN_S)


def test_archive_rounds_wait_for_the_outbox_to_drain_after_a_connect() -> None:
    plan = ArchiveSchedule()
    assert not plan.is_due(1e9)  # without a connect, nothing planned
    plan.connected(0.0, check_s=30.0)
    assert not plan.is_due(ARCHIVE_SETTLE_S - 0.01)
    assert plan.is_due(ARCHIVE_SETTLE_S)
    assert not plan.drained(ARCHIVE_SETTLE_S, lambda: True)
    assert plan.due == ARCHIVE_SETTLE_S + ARCHIVE_DRAIN_AGAIN_S
    asked: list[bool] = []

    def outbox_waiting() -> bool:
        asked.append(True)
        return True

    assert plan.drained(31.0, outbox_waiting)  # past check_s: go on
    assert asked == []  # the outbox is not even looked at
    plan.started()
    assert not plan.is_due(1e9)
    plan.finished(40.0, full=True, failed=False, check_s=30.0)
    assert plan.due == 40.0 + ARCHIVE_AGAIN_S
    plan.started()
    plan.finished(50.0, full=True, failed=True, check_s=30.0)
    assert plan.due == 80.0
    plan.idle(80.0, check_s=30.0)
    assert plan.due == 110.0
    plan.stop()
    assert not plan.is_due(1e9)


def test_resends_after_a_reconnect_and_after_a_members_grant() -> None:
    resends = Resends()
    assert resends.reconnect_due(1e9) is None
    resends.reconnected(10.0, after_s=5.0)
    assert resends.reconnect_due(14.9) is None
    assert resends.reconnect_due(15.0) == 10.0  # what was published before the reconnect
    assert resends.reconnect_due(16.0) is None  # once
    resends.granted("c", "bob", 0.0, receipt_interval_s=0.5, upto=7)
    resends.granted("c", "bob", 1.0, receipt_interval_s=0.5, upto=9)  # the first plans it
    assert resends.grants_due(GRANT_RESEND_RECEIPTS * 0.5 - 0.01) == []
    # Only our steps below 7 (sealed before we heard bob) are sent again.
    assert resends.grants_due(GRANT_RESEND_RECEIPTS * 0.5) == [("c", "bob", 7)]
    assert not resends.grants


def test_subscriptions_pending_refused_and_on_a_new_connection() -> None:
    subs = Subscriptions({"fc/p/a/inbox"})
    assert subs.add(["fc/c/x/msg", "fc/p/a/inbox"]) == ["fc/c/x/msg"]
    subs.follow({"fc/c/y/roster", "fc/c/y/msg"})  # after the next outbox pump
    assert subs.due(0.0) == ["fc/c/y/msg", "fc/c/y/roster"]
    assert subs.due(0.0) == []
    subs.refused(["fc/c/y/msg", "fc/c/x/msg"], 1.0)
    subs.remove(["fc/c/x/msg"])  # no longer wanted: not asked for again
    assert subs.due(1.0 + RESUBSCRIBE_S - 0.01) == []
    assert subs.due(1.0 + RESUBSCRIBE_S) == ["fc/c/y/msg"]
    subs.follow({"fc/c/z/msg"})
    assert subs.connected() == ["fc/c/y/msg", "fc/c/y/roster", "fc/c/z/msg", "fc/p/a/inbox"]
    assert subs.due(10.0) == []  # everything went with the connection's SUBSCRIBE
    assert no_local(["fc/c/y/msg", "fc/c/y/roster"]) == ["fc/c/y/msg"]


def test_membership_changes_are_the_positions_that_moved() -> None:
    before = {"a": (0, True), "b": (1, True)}
    after = {"a": (0, True), "b": (2, False), "c": (0, True)}
    assert changed(before, after) == ["b", "c"]

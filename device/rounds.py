"""Rounds with the history source, on a thread of their own (docs/device.md,
"Delivery model"): the tail (what the archive holds past the device's cursor), the
reconciliation of own envelopes with the archive, and the rosters a chain waits for.

The HTTP round trips (seconds on a slow link, up to the timeout when the gateway does
not answer) never stop the worker: a round hands what it fetched to the worker's queue
and the worker opens it (:meth:`HistoryRounds.on_fetched`, :meth:`~HistoryRounds.
on_archived`) like live messages. When rounds run is the pure
:class:`~fieldchat.device.tail.TailSchedule` and
:class:`~fieldchat.device.reconcile.ArchiveSchedule`.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass

from fieldchat.device.context import Batch, Part, Shared
from fieldchat.device.inbound import Inbound
from fieldchat.device.reconcile import (
    ARCHIVE_ROUND,
    ARCHIVE_SETTLE_S,
    ArchiveSchedule,
    Outcome,
    reconcile,
    tail_marks,
)
from fieldchat.device.rows import REFUSED, Gap
from fieldchat.device.tail import TAIL_CURSOR, Fetched, TailSchedule, tail_round
from fieldchat.schemas.errors import FieldchatError

__all__ = ["ROSTER_FETCH_AGAIN_S", "Archived", "HistoryRounds"]

log = logging.getLogger("fieldchat.device")

# Rosters a chain waits for (PROTOCOL.md §5.2) are fetched from the history source at
# most this often per conversation: a gateway that lacks them is not asked in a loop.
ROSTER_FETCH_AGAIN_S = 5.0


@dataclass(frozen=True, slots=True)
class Archived:
    """What a reconciliation round with the archive found (``more``: it had a full
    round of own envelopes to name: the next comes soon)."""

    outcome: Outcome
    more: bool


class HistoryRounds(Part):
    """Plans rounds with the history source, runs them on the history thread, and
    applies what they bring on the worker.

    Args:
        shared: the device's state, engine and options.
        inbound: opens what the rounds fetch.
        hand_over: queues a round's result for the worker (blocking while it is full).
        apply: applies a batch's side effects on the worker.
    """

    def __init__(
        self,
        shared: Shared,
        inbound: Inbound,
        hand_over: Callable[[Fetched | Archived], None],
        apply: Callable[[Batch | None], None],
    ) -> None:
        super().__init__(shared)
        self._inbound = inbound
        self._hand_over = hand_over
        self._apply = apply
        self.tail = TailSchedule()
        self.archiving = ArchiveSchedule()  # without a gateway, never
        self._roster_fetches: dict[str, float] = {}  # cid -> when it may be fetched again
        self._delivery_fetches: dict[str, float] = {}  # the same, for missing deliveries
        # History requests (HTTP) run on a thread of their own, one at a time.
        self._jobs: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._thread: threading.Thread | None = None

    def connected(self, now: float) -> None:
        """A (re)connect: a tail round once the backlog arrived; a reconciliation
        once the outbox drained and settled."""
        self.tail.connected(now)
        if self._archive is not None:
            self.archiving.connected(now, self.options.archive_check_s)

    def tick(self, now: float, *, connected: bool) -> None:
        """Start the rounds that are due."""
        if self.archiving.is_due(now) and connected:
            self.start_archive(now)
        if self.history is not None and self.tail.due(now):
            self.start_tail()

    def close(self) -> None:
        """No more rounds; the thread is a daemon: a request in flight is dropped."""
        self._jobs.put(None)

    def ask_history(self, gap: Gap) -> None:
        """A gap outlived ``gap_timeout_s``: a tail round fetches what the gateway
        archived after our cursor, the range included."""
        if self.history is None:
            self.counters["gaps_expired"] += 1
            log.info(
                "gap %s %d..%d of %s not filled (no history source)",
                gap.cid,
                gap.first,
                gap.last,
                gap.sender,
            )
            return
        self.counters["gaps_asked"] += 1
        self.tail.gap_expired(gap, self._clock())

    def backfill(self) -> None:
        """On joining: what the conversation said before our subscription existed (a
        tail round; the new conversation's cursor starts at the archive's start)."""
        if self.history is not None:
            self.tail.soon(self._clock())

    def episode(self, now: float) -> None:
        """A chain began to lack steps: with a history source, a tail round too."""
        if self.history is not None and self.tail.gap_episode(now):
            self.counters["gaps_asked_history"] += 1

    def start_tail(self) -> None:
        """Ask the history source for what it archived after our cursor, per
        conversation (a round on the history thread: :func:`~fieldchat.device.tail.tail_round`).

        Gap recovery needs a later message to reveal the gap: messages lost at the end
        of a run (a broker's offline queue overflowing, Mosquitto's
        ``max_queued_messages``, or a failover) would never be fetched. The cursor is
        the source's (the gateway's sequence number), kept in the state file and
        advanced after each page is committed, so a crash fetches a page again
        (deduplicated) rather than skipping it.
        """
        cursors = [
            (
                cid,
                int(self.state.get_meta(f"{TAIL_CURSOR}{cid}") or 0),
                self.engine.oldest_epoch(cid),
            )
            for cid in self.engine.conversations()
            if self.engine.is_member(cid)
        ]
        expired = self.tail.start()
        marks = {cid: self._tail_marks(cid, epoch, expired) for cid, _, epoch in cursors}
        history, idle_s = self.history, self.options.history_tail_s
        assert history is not None
        self._job(lambda: tail_round(history, cursors, marks, self._hand_over, idle_s=idle_s))
        for cid, have in self.engine.awaiting_rosters().items():  # a failed fetch, again
            self.fetch_rosters(cid, have)
        self.fetch_missing_deliveries()

    def fetch_missing_deliveries(self) -> None:
        """For each conversation whose current epoch we entered without its secret (the
        inbox queue may have lost the delivery, PROTOCOL.md §6.6): fetch our deliveries
        from the history source (at most every ROSTER_FETCH_AGAIN_S per conversation)."""
        history = self.history
        if history is None:
            return
        now = self._clock()
        for cid in self.engine.conversations():
            if not self.engine.is_member(cid) or self.engine.keyed(cid):
                continue
            if self._delivery_fetches.get(cid, 0.0) > now:
                continue
            self._delivery_fetches[cid] = now + ROSTER_FETCH_AGAIN_S
            self.counters["delivery_fetches"] += 1

            def job(cid: str = cid) -> None:
                try:
                    found = history.deliveries(cid)
                except FieldchatError as exc:
                    self._hand_over(Fetched(cid, [], error=str(exc), deliveries=[]))
                    return
                self._hand_over(Fetched(cid, [], deliveries=found))

            self._job(job)

    def _tail_marks(
        self, cid: str, from_epoch: int, expired: list[Gap]
    ) -> list[tuple[int, int, int, int]]:
        """``have`` for ``cid``'s tail (device.reconcile.tail_marks): what the archive
        need not send, from what was shown, the gaps and our own steps. Empty without
        a source that reconciles (a plain source is asked without it)."""
        if self._archive is None:
            return []
        held = self._inbound.sequencer.shown(cid)
        gaps = [*self.state.gaps(cid), *(g for g in expired if g.cid == cid)]
        return tail_marks(held, gaps, self.state.own_high(cid), from_epoch=from_epoch)

    def start_archive(self, now: float) -> None:
        """A round on the history thread: check what the archive lacks of our own
        envelopes published at least ARCHIVE_SETTLE_S ago, oldest first, and upload it.
        After a connect it waits for the outbox to drain first (for at most
        ``archive_check_s``: a device that never stops sending still checks)."""
        archive = self._archive
        if archive is None:
            self.archiving.stop()
            return
        if not self.archiving.drained(now, lambda: bool(self.state.outbox_count())):
            return
        rows = self.state.unarchived(now - ARCHIVE_SETTLE_S, ARCHIVE_ROUND)
        if not rows:  # nothing to confirm: look again later (a local query, no request)
            self.archiving.idle(now, self.options.archive_check_s)
            return
        self.archiving.started()
        more = len(rows) >= ARCHIVE_ROUND

        def job() -> None:
            outcome = Outcome(errors=["the round failed (see the log)"])
            try:
                outcome = reconcile(archive, rows)
            finally:  # whatever happened, the worker plans the next round
                self._hand_over(Archived(outcome, more))

        self._job(job)

    def on_archived(self, item: Archived) -> None:
        """On the worker: record what the archive confirmed; plan the next round."""
        outcome = item.outcome
        gone = {cid for cid in outcome.unauthorized if not self.engine.is_member(cid)}
        with self.state.transaction(durable=False) as tx:
            tx.mark_archived(outcome.confirmed)
            tx.mark_archived([key for key, _ in outcome.refused], REFUSED)
            for cid in gone:  # not a member any more: the gateway will never take them
                tx.give_up_archive(cid)
        self.counters["archive_checked"] += outcome.checked
        self.counters["archive_uploaded"] += outcome.uploaded
        if outcome.uploaded:
            log.info("uploaded %d own envelopes the archive lacked", outcome.uploaded)
        if outcome.refused:
            self.counters["archive_refused"] += len(outcome.refused)
            log.warning(
                "the archive refused %d own envelopes for good (first: %s, %s)",
                len(outcome.refused),
                *outcome.refused[0],
            )
        if outcome.errors:
            self.counters["archive_check_failed"] += 1
            log.info("archive check: %s", "; ".join(outcome.errors[:3]))
        self.archiving.finished(
            self._clock(),
            full=item.more,
            failed=bool(outcome.errors),
            check_s=self.options.archive_check_s,
        )

    def fetch_rosters(self, cid: str, have: int) -> None:
        """Ask the history source for the rosters a chain waits for (on the history
        thread, at most every ROSTER_FETCH_AGAIN_S per conversation)."""
        history = self.history
        now = self._clock()
        if history is None or self._roster_fetches.get(cid, 0.0) > now:
            return
        self._roster_fetches[cid] = now + ROSTER_FETCH_AGAIN_S
        self.counters["roster_fetches"] += 1

        def job() -> None:
            try:
                rosters = history.rosters(cid, from_epoch=have + 1)
            except FieldchatError as exc:
                self._hand_over(Fetched(cid, [], error=str(exc), rosters=[]))
                return
            self._hand_over(Fetched(cid, [], rosters=rosters))

        self._job(job)

    def _on_fetched_rosters(self, cid: str, rosters: list[bytes]) -> None:
        if not rosters:
            return
        self.counters["rosters_fetched"] += len(rosters)
        batch = Batch()
        with self.state.transaction() as tx:
            for payload in rosters:
                with self._counting_refusals():
                    self._inbound.rosters.on_roster(tx, payload, batch)
            self.engine.flush()
        if self.engine.awaiting_rosters().get(cid) is not None:
            log.info("rosters of %s fetched; its chain still waits for others", cid)
        self._apply(batch)
        self.fetch_missing_deliveries()  # entered an epoch whose delivery we lack?

    def _on_fetched_deliveries(self, deliveries: list[bytes]) -> None:
        self.counters["deliveries_fetched"] += len(deliveries)
        batch = Batch()
        with self.state.transaction() as tx:
            for payload in deliveries:
                with self._counting_refusals():
                    self._inbound.rosters.on_grant(tx, payload, batch)
            self.engine.flush()
        self._apply(batch)

    def on_fetched(self, item: Fetched) -> None:
        """On the worker: open what the history thread fetched, then save its cursor."""
        if item.rosters is not None:
            self._on_fetched_rosters(item.cid, item.rosters)
        if item.deliveries:
            self._on_fetched_deliveries(item.deliveries)
        if item.error is not None:
            what = "rosters" if item.rosters is not None else "history tail"
            self.counters[
                "roster_fetch_failed" if item.rosters is not None else "history_tail_failed"
            ] += 1
            log.info("%s of %s failed: %s", what, item.cid, item.error)
        if item.envelopes:
            self.counters["history_tail_fetched"] += len(item.envelopes)
            envelopes = item.envelopes
            if self.engine.is_member(item.cid):
                epoch = self.engine.roster(item.cid).epoch
                envelopes = [e for e in envelopes if self._inbound.may_open(item.cid, epoch, e)]
            self._apply(self._inbound.open_fetched(item.cid, envelopes))
        if item.cursor is not None:
            self.state.set_meta({item.cursor[0]: item.cursor[1]})
        if item.next_tail is not None:
            self.counters["history_tail_rounds"] += 1
            self.tail.finished(self._clock(), item.next_tail)

    def _job(self, job: Callable[[], None]) -> None:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._history_loop, name="fieldchat-history", daemon=True
            )
            self._thread.start()
        self._jobs.put(job)

    def _history_loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                job()
            except Exception:  # the thread must outlive a bad source
                log.exception("history job failed")

"""What leaves the device, on its worker thread (docs/device.md, "Delivery model").

The outbox leaves in order with QoS 1, a window in flight and frames of envelopes
(:mod:`fieldchat.device.outbox`); before it, whatever must be power-safe first is
synced. Besides the application's messages the device owes its peers receipts
(:class:`~fieldchat.device.receipts.ReceiptBook`), gap requests for what its
:class:`~fieldchat.device.sequencer.Sequencer` lacks, and resends of what members
have not receipted (:class:`~fieldchat.device.resend.Resends`): this queues them when
they are due and publishes.
"""

from __future__ import annotations

import logging
from collections import defaultdict

from fieldchat.device.chains import RESERVE_STEPS
from fieldchat.device.context import Part, Shared
from fieldchat.device.link import LinkConnection
from fieldchat.device.outbox import Inflight, frame_budget, frames
from fieldchat.device.receipts import ReceiptBook, missing_receipt, receipts
from fieldchat.device.resend import Resends
from fieldchat.device.rows import ENVELOPE_ROWS, Gap, OutboxKind
from fieldchat.device.sequencer import Sequencer
from fieldchat.device.subscriptions import Subscriptions, no_local
from fieldchat.schemas import ReceiptRange, tracing
from fieldchat.schemas.envelope import read_header
from fieldchat.schemas.errors import FieldchatError
from fieldchat.schemas.frame import pack_frame

__all__ = ["MAX_RESEND", "RENEW_WHEN_LEFT", "Outbound"]

log = logging.getLogger("fieldchat.device")

MAX_RESEND = 2_000  # own messages published again per reconnect
# The worker reserves a chain's next steps (and fsyncs) once this few are left, so a
# send rarely finds its window used up and waits for that fsync itself.
RENEW_WHEN_LEFT = RESERVE_STEPS // 2


class Outbound(Part):
    """Publishes the outbox on the current connection and queues what is owed.

    ``conn`` is the connection the worker publishes on (``None`` while down).
    """

    def __init__(
        self,
        shared: Shared,
        sequencer: Sequencer,
        receipts: ReceiptBook,
        resends: Resends,
        subscriptions: Subscriptions,
    ) -> None:
        super().__init__(shared)
        self.sequencer = sequencer
        self.receipts = receipts
        self.resends = resends
        self.subscriptions = subscriptions
        self.conn: LinkConnection | None = None
        self.inflight = Inflight()
        self._tracer = tracing.tracer("device")  # docs/tracing.md; None when off

    def pump(self) -> None:
        """Publish what the window allows, then subscribe what is due."""
        conn = self.conn
        if conn is None or not conn.connected:
            return
        window = min(self.options.window, conn.receive_max)
        if self.inflight.room(window) and self.state.outbox_unsynced:
            self.state.sync()  # a grant or roster from a worker batch: durable first
        while self.inflight.room(window):
            per_frame = self.options.frame_envelopes
            room = self.inflight.room(window)
            rows = self.state.outbox_from(self.inflight.cursor, room * per_frame)
            if not rows:
                break
            budget = frame_budget(conn.max_packet, rows[0].topic)
            for group in frames(rows, room, per_frame, budget):
                head = group[0]
                payload = pack_frame([row.payload for row in group])
                mid = conn.publish(
                    head.topic, payload, retain=head.retain, alias=head.what in ENVELOPE_ROWS
                )
                if self._tracer is not None:
                    for row in group:
                        self._tracer.publish(row.topic, row.payload)
                self.inflight.published(mid, group)
                self.counters["frames" if len(group) > 1 else "bare"] += 1
        pending = self.subscriptions.due(self._clock())
        if pending:
            conn.subscribe(pending, no_local=no_local(pending))

    def renew_reservations(self) -> None:
        """Reserve the next steps of chains running low, power-safe before the worker
        (the only publisher) goes on: nothing sealed under them can leave first
        (PROTOCOL.md §6.3)."""
        if self.engine.reservations_low(RENEW_WHEN_LEFT):
            with self.state.transaction(durable=False):
                self.engine.renew_reservations(RENEW_WHEN_LEFT)
            self.state.sync()

    def owed(self, now: float) -> None:
        """Queue and publish what is due: receipts, resends to new members, gap
        requests, the resend after a reconnect."""
        if self.receipts.due(now, self.options.receipt_interval_s) and self.receipts.pending:
            # No fsync under the state file's lock every interval: pending receipts live
            # in memory until here, so a power cut loses them either way (the sender
            # keeps those messages unconfirmed, as it would then).
            with self.state.transaction(durable=False, sync_outbox=False):
                self.flush_receipts()
            self.pump()
        if self.conn is None:
            return
        if self.resends.grants:
            self._resend_to_granters(now)
        if len(self.sequencer.asks):
            self._ask_gaps(now)
        if (before := self.resends.reconnect_due(now)) is not None:
            self._resend_unconfirmed(before)

    def flush_receipts(self) -> None:
        """Seal the pending receipts as one message per conversation and type."""
        owed = self.receipts.take()
        for cid, rtype in list(owed):
            if self.engine.is_member(cid) and not self.engine.keyed(cid):
                # The epoch's secret is on its way (PROTOCOL.md §6.6): the next batch.
                self.receipts.add(cid, rtype, owed.pop((cid, rtype)))
        with self.state.transaction() as tx:
            for cid, receipt in receipts(owed):
                if self.engine.is_member(cid):
                    self.queue_own(tx, cid, self.engine.seal(cid, receipt), OutboxKind.RECEIPT)
                    self.counters["receipts_sent"] += 1

    def _ask_gaps(self, now: float) -> None:
        """Ask the senders of held chains whose ask is due for the steps they lack: one
        MISSING receipt per conversation (PROTOCOL.md §4.1), published at once."""
        wanted: dict[str, list[ReceiptRange]] = defaultdict(list)
        for key, missing in self.sequencer.due_asks(now):
            cid, epoch, index, chain = key
            wanted[cid] += [
                ReceiptRange(epoch=epoch, sender=index, chain=chain, first=first, last=last)
                for first, last in missing
            ]
        if not wanted:
            return
        with self.state.transaction(durable=False, sync_outbox=False) as tx:
            for cid, ranges in wanted.items():
                if not self.engine.keyed(cid):
                    continue  # not a member, or the epoch's secret not here yet (asked again)
                receipt = missing_receipt(ranges)
                self.queue_own(tx, cid, self.engine.seal(cid, receipt), OutboxKind.RECEIPT)
                self.counters["gap_requests_sent"] += 1
        self.pump()

    def _resend_unconfirmed(self, before: float) -> None:
        """Publish again own messages some current member has not receipted."""
        rows = self.state.unconfirmed(before, before - self.options.resend_window_s, MAX_RESEND)
        again, done = [], []
        for row in rows:
            try:
                roster = self.engine.roster(row.cid)
            except FieldchatError:
                done.append(row.id)
                continue
            if roster.epoch != row.epoch or not self.engine.is_member(row.cid):
                done.append(row.id)
                continue
            want = set(roster.pids) - {self.pid}
            if want <= self.state.receipted_by(row.cid, row.epoch, row.chain, row.step):
                done.append(row.id)
            else:
                again.append(row)
        with self.state.transaction() as tx:
            for row in again:
                tx.add_outbox(row.topic, row.payload, cid=row.cid, what=OutboxKind.MSG)
            tx.forget_payloads(done, keep_unarchived=self._archive is not None)
        if again:
            self.counters["resent"] += len(again)
            log.info("published %d unreceipted messages again after reconnecting", len(again))
        self.pump()

    def _resend_to_granters(self, now: float) -> None:
        """Publish again what members we heard first have not receipted (sealed before)."""
        due = self.resends.grants_due(now)
        if not due:
            return
        resent = 0
        with self.state.transaction() as tx:
            for cid, granter, upto in due:
                if not self.engine.is_member(cid):
                    continue
                epoch = self.engine.roster(cid).epoch
                for topic, envelope in self.state.unreceipted(cid, epoch, granter, MAX_RESEND):
                    if upto is not None and read_header(envelope).step >= upto:
                        continue  # sealed after we heard it: it was listening
                    tx.add_outbox(topic, envelope, cid=cid, what=OutboxKind.MSG)
                    resent += 1
        self.counters["resent"] += resent
        if resent:
            self.pump()

    def housekeeping(self, now: float) -> list[Gap]:
        """Forget own ciphertext nobody will ask for again; the gaps that outlived
        ``gap_timeout_s`` (dropped: a tail round asks the archive for them)."""
        stale = [g for g in self.state.gaps() if g.since < now - self.options.gap_timeout_s]
        # With a gateway, own envelopes stay until the archive confirmed them too.
        keep = self._archive is not None
        old = now - self.options.resend_window_s
        with self.state.transaction(durable=False) as tx:  # redone next time if lost
            tx.forget_old_payloads(old, keep_unarchived=keep)
            tx.prune_kept(old, keep_unarchived=keep)
            for gap in stale:
                tx.drop_gap(gap)
        return stale

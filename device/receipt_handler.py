"""Receipts of our messages and gap requests, as they arrive (PROTOCOL.md §4.1), on the
worker, inside its transaction.

Delivered and read receipts are recorded for our own messages (they decide what is
resent, docs/device.md). A gap request (a MISSING receipt) publishes again at once
the envelopes of ours we still keep, within the bounds of
:class:`~fieldchat.device.repair.Repairs`, even while the request itself is held
behind a gap in its sender's chain (read without opening it, not answered twice).
"""

from __future__ import annotations

import logging

from fieldchat.device.context import Batch, Part, Shared
from fieldchat.device.engine import Opened
from fieldchat.device.events import ReceiptKind, ReceiptReceived
from fieldchat.device.repair import ASK_FRACTIONS, MAX_REPAIR_PER_REQUEST, Repairs, StepKey
from fieldchat.device.rows import OutboxKind
from fieldchat.device.state import StateTransaction
from fieldchat.schemas import Receipt, ReceiptType
from fieldchat.schemas.envelope import Header

__all__ = ["MAX_ANSWERED_EARLY", "ReceiptHandler"]

log = logging.getLogger("fieldchat.device")

# Gap requests answered while held, remembered so their turn does not answer again.
MAX_ANSWERED_EARLY = 4_096


class ReceiptHandler(Part):
    """Records receipts of our messages and answers gap requests."""

    def __init__(self, shared: Shared) -> None:
        super().__init__(shared)
        # Which steps others asked us for to publish again (made again in restart():
        # the reorder window is read then).
        self._repairs = Repairs(self.options.reorder_window_s * ASK_FRACTIONS[1])
        # Gap requests answered while held behind a gap (not answered again in turn).
        self._answered_early: set[StepKey] = set()

    def restart(self, window_s: float) -> None:
        """A run begins with this reorder window."""
        self._repairs = Repairs(window_s * ASK_FRACTIONS[1])

    def on_receipt(
        self, tx: StateTransaction, opened: Opened, receipt: Receipt, batch: Batch
    ) -> None:
        """A receipt from a member: delivered or read (recorded for our own messages),
        or a gap request (answered unless it was answered while held)."""
        if receipt.type is ReceiptType.MISSING:
            if opened.dedupe_key in self._answered_early:
                self._answered_early.discard(opened.dedupe_key)  # answered while held
            else:
                self._on_missing(tx, opened.cid, opened.sender, receipt)
            return
        steps = 0
        mine: dict[tuple[int, int], bool] = {}
        for r in receipt.ranges:
            key = (r.epoch, r.sender)
            if key not in mine:
                mine[key] = self.state.was_sender(opened.cid, r.epoch, r.sender)
            if not mine[key]:
                continue  # a receipt for another member's messages
            tx.add_receipt(
                opened.cid,
                opened.sender,
                int(receipt.type),
                r.epoch,
                r.chain,
                r.first,
                r.last,
            )
            steps += r.last - r.first + 1
        if steps:
            batch.events.append(
                ReceiptReceived(
                    opened.cid, opened.sender, ReceiptKind(receipt.type.name.lower()), steps
                )
            )

    def answer_held_ask(
        self, tx: StateTransaction, cid: str, step_key: StepKey, payload: bytes, header: Header
    ) -> None:
        """A gap request is answered when it arrives, even held behind a gap in its
        sender's own chain (a crash skips up to RESERVE_STEPS of it; a broker lost
        some): answered only once that gap fills or is given up, it came after the
        asker had given up too, and the asker showed its messages out of order. The
        receipt is read without opening it; it is opened in its turn, and not
        answered twice."""
        peeked = self.engine.peek_receipt(cid, payload, header)
        if peeked is None or peeked[1].type is not ReceiptType.MISSING:
            return
        if len(self._answered_early) >= MAX_ANSWERED_EARLY:
            self._answered_early.clear()  # at worst some steps are published twice
        self._answered_early.add(step_key)
        self.counters["gap_requests_answered_held"] += 1
        self._on_missing(tx, cid, peeked[0], peeked[1])

    def _on_missing(self, tx: StateTransaction, cid: str, asker: str, receipt: Receipt) -> None:
        """A member lacks steps (a gap request, PROTOCOL.md §4.1): publish again at
        once those of ours we still keep, within the bounds of :class:`Repairs`."""
        self.counters["gap_requests_received"] += 1
        found: list[tuple[tuple[str, int, int, int, int], str, bytes]] = []
        for r in receipt.ranges:  # only our own envelopes are kept: others' steps find none
            left = MAX_REPAIR_PER_REQUEST - len(found)
            if left <= 0:
                break
            for step, topic, payload in self.state.own_envelopes(
                cid, (r.epoch, r.sender, r.chain), r.first, r.last, left
            ):
                found.append(((cid, r.epoch, r.sender, r.chain, step), topic, payload))
        if not found:
            return
        allowed = set(self._repairs.allow([key for key, _, _ in found], self._clock()))
        again = [(key, topic, payload) for key, topic, payload in found if key in allowed]
        for key, topic, payload in again:
            tx.add_outbox(topic, payload, cid=key[0], what=OutboxKind.MSG)
        self.counters["repaired"] += len(again)
        if again:
            log.info("published %d envelopes again that %s lacked", len(again), asker)

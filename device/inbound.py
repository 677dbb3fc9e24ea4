"""What arrives, opened and shown in each sender's order (docs/device.md, "Delivery
model"), on the device's worker thread, inside the worker's transaction.

Envelopes are opened and stored (unique on ``(cid, epoch, sender, chain, step)``)
with the engine's chain state in one transaction; one that overtook a missing step is
held for the :class:`~fieldchat.device.sequencer.Sequencer` to release in turn, one
that waits for a key or a roster is held until a roster or grant retries it. Receipts
and gap requests go to the :class:`~fieldchat.device.receipt_handler.ReceiptHandler`,
rosters, grants and bundles to the :class:`~fieldchat.device.rosters.RosterHandler`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable

from fieldchat.device.context import Batch, Part, Shared
from fieldchat.device.engine import Opened
from fieldchat.device.events import GapDetected, MessageReceived
from fieldchat.device.receipt_handler import ReceiptHandler
from fieldchat.device.receipts import ReceiptBook
from fieldchat.device.rosters import RosterHandler
from fieldchat.device.rows import ChainKey, Gap, MessageKind, Trust
from fieldchat.device.sequencer import MAX_CANDIDATES_PER_STEP, Sequencer
from fieldchat.device.settled import report_settled
from fieldchat.device.state import StateTransaction
from fieldchat.schemas import Control, ControlOp, Receipt, ReceiptType, TextMessage
from fieldchat.schemas.envelope import EnvelopeKind, Header, read_header
from fieldchat.schemas.errors import (
    FieldchatError,
    KeyStoreError,
    MissingKey,
    UnsignedJumpTooFar,
)
from fieldchat.schemas.frame import split
from fieldchat.schemas.roster import is_roster
from fieldchat.schemas.topics import TopicKind

__all__ = ["Inbound"]

log = logging.getLogger("fieldchat.device")


class Inbound(Part):
    """Opens, orders and stores what arrives; answers gap requests.

    Args:
        shared: the device's state, engine and options.
        sequencer: each sender's order (also read by the outbound asks and the tail).
        receipts: where delivered receipts are owed.
        rosters: applies rosters, grants and bundles.
        episode: called when a chain begins to lack steps (a tail round may follow).
    """

    def __init__(
        self,
        shared: Shared,
        sequencer: Sequencer,
        receipts: ReceiptBook,
        rosters: RosterHandler,
        episode: Callable[[float], None],
    ) -> None:
        super().__init__(shared)
        self.sequencer = sequencer
        self.receipts = receipts
        self.rosters = rosters
        self._episode = episode
        self.receipts_in = ReceiptHandler(shared)  # receipts of ours, gap requests

    def restart(self) -> None:
        """A run begins with the options as they are now: what a previous run held is
        asked for at once."""
        window = self.options.reorder_window_s
        self.receipts_in.restart(window)
        now = self._clock()
        for key in self.sequencer.restart(window):
            self.lacking(key, now)

    def on_message(
        self,
        tx: StateTransaction,
        topic: str,
        payload: bytes,
        batch: Batch,
        envelopes: list[bytes] | None = None,
    ) -> None:
        """Handle one PUBLISH that arrived (a frame of envelopes, a roster, a grant or
        a bundle); a refusal is counted and logged, never raised (but state failures).
        ``envelopes``: those of ``payload``, when the frame was split already."""
        parsed = self._parse(topic)
        if parsed is None:
            self.counters["foreign_topic"] += 1
            return
        try:
            if parsed.kind is TopicKind.MSG:
                assert parsed.cid is not None
                # a frame's envelopes each stand alone
                for envelope in split(payload) if envelopes is None else envelopes:
                    try:
                        self.open(tx, parsed.cid, envelope, batch)
                    except KeyStoreError:
                        raise
                    except FieldchatError as exc:
                        self._rejected(exc)
                        log.debug("rejected an envelope on %s: %s", topic, exc)
            elif parsed.kind is TopicKind.ROSTER:
                self.rosters.on_roster(tx, payload, batch)
            elif parsed.kind is TopicKind.INBOX and is_roster(payload):
                self.rosters.on_roster(tx, payload, batch)  # an inviting admin's earlier rosters
            elif parsed.kind is TopicKind.INBOX:
                self.rosters.on_grant(tx, payload, batch)
            elif parsed.kind is TopicKind.BUNDLE:
                self.rosters.on_bundle(tx, payload, batch)
        except KeyStoreError:
            raise
        except FieldchatError as exc:
            self._rejected(exc)
            log.debug("rejected %s: %s", topic, exc)

    def open(
        self,
        tx: StateTransaction,
        cid: str,
        payload: bytes,
        batch: Batch,
        *,
        in_order: bool = True,
    ) -> bool:
        """Open and store an envelope, then any held ones it lets through, in step order.

        With ``in_order``, an envelope more than one step ahead of its sender's chain is
        held (up to ``reorder_window_s``) for the missing steps to arrive first: brokers
        may reorder a redelivered backlog, and the screen keeps each sender's order.
        False when it must wait for a key.
        """
        header = None
        if in_order:
            try:
                header = read_header(payload)  # parsed once: passed to the engine
            except FieldchatError:
                pass  # the engine rejects and counts it below
            else:
                key = (cid, *header.chain_id)
                if self.sequencer.must_wait(key, header.step):
                    held = self._wait(tx, cid, key, header, payload)
                    if header.kind is EnvelopeKind.RECEIPT:
                        step_key = (*key, header.step)
                        self.receipts_in.answer_held_ask(tx, cid, step_key, payload, header)
                    return held
        done = self._open_one(tx, cid, payload, batch, header)
        self.release(tx, batch)
        return done

    def _wait(
        self,
        tx: StateTransaction,
        cid: str,
        key: ChainKey,
        header: Header,
        payload: bytes,
    ) -> bool:
        """Hold an envelope that overtook a missing step, if it may be genuine.

        What fails to authenticate now is refused at once (counted ``rejected_auth``),
        so junk for a step cannot take the place of the envelope that comes later; a
        byte-identical copy of one waiting is a duplicate; other candidates wait side
        by side (at most MAX_CANDIDATES_PER_STEP), released together in their turn.
        """
        waiting = self.sequencer.candidates(key, header.step)
        if waiting:
            held = [self.state.held_payload(row) for row in waiting]
            if bytes(payload) in held:
                self._duplicate(cid, payload, header)
                return True
            if len(waiting) >= MAX_CANDIDATES_PER_STEP:
                self.counters["candidates_dropped"] += 1
                return True
        if self.engine.authentic(cid, payload, header) is False:
            self.counters["rejected_auth"] += 1
            return True
        now = self._clock()
        until = now + self.options.reorder_window_s
        row, dropped = tx.hold(cid, payload, until)
        self._dropped(dropped)
        if self.sequencer.wait(key, header.step, row, until, now):
            self._episode(now)
        return True

    def hold_again(self, now: float) -> None:
        """On each connect, what is held waits a whole window more and its gaps are
        asked for again (a window that ran out offline showed later messages first)."""
        for key in self.sequencer.hold_again(now, self.options.reorder_window_s):
            self.lacking(key, now)

    def lacking(self, key: ChainKey, now: float) -> None:
        """``key`` may hold envelopes behind missing steps: ask its sender for them at
        once (a MISSING receipt, on the next tick) and, with a history source, the
        archive too (a tail round)."""
        if self.sequencer.lacking(key, now):
            self._episode(now)

    def release(
        self, tx: StateTransaction, batch: Batch, *, expired: bool = False, grace: float = 0.0
    ) -> None:
        """Open held envelopes whose turn came (or, ``expired``, whose wait is over:
        ``grace`` past their window)."""
        now = self._clock()
        progress = True
        while progress:
            progress = False
            for key, rows in self.sequencer.release(now, expired=expired, grace=grace):
                for row in rows:
                    payload = tx.take_held(row)
                    if payload is not None:
                        self._open_counted(tx, key[0], payload, batch)
                progress = True
            if self.sequencer.advanced and self._reach(tx, batch):
                progress = True

    def _open_counted(self, tx: StateTransaction, cid: str, payload: bytes, batch: Batch) -> None:
        """Open a held envelope; a refusal is counted (``rejected_<reason>``)."""
        with self._counting_refusals():
            self._open_one(tx, cid, payload, batch)

    def _reach(self, tx: StateTransaction, batch: Batch) -> bool:
        """Try the held far-ahead envelopes of the chains that moved, once each comes
        within the engine's reach (an honest sender far ahead is reached a few hundred
        steps per envelope it sends; junk beyond reach is never tried again); whether
        any was tried."""
        tried = False
        for key, rows in self.sequencer.reachable(lambda key: self.engine.reach(*key)):
            for row in rows:
                payload = tx.take_held(row)
                if payload is not None:
                    self._open_counted(tx, key[0], payload, batch)
                    tried = True
        return tried

    def _duplicate(self, cid: str, payload: bytes, header: Header | None = None) -> None:
        """A text seen before came again: its sender may have missed our receipt (a
        broker lost it), so it is receipted again in the next batch."""
        self.counters["duplicate"] += 1
        try:
            header = header or read_header(payload)
        except FieldchatError:
            return
        if header.kind is EnvelopeKind.TEXT and self.engine.is_member(cid):
            with contextlib.suppress(FieldchatError):
                if self.engine.roster(cid).member_at(header.sender).pid == self.pid:
                    return  # our own echo
            self.receipts.add(cid, ReceiptType.DELIVERED, [header.dedupe_key])

    def _dropped(self, count: int) -> None:
        if count:
            self.counters["held_dropped"] += count
            log.warning("held-envelope limit reached: %d oldest dropped", count)

    def _open_one(
        self,
        tx: StateTransaction,
        cid: str,
        payload: bytes,
        batch: Batch,
        header: Header | None = None,
    ) -> bool:
        try:
            opened = self.engine.open(cid, payload, header)
        except UnsignedJumpTooFar:
            # Held until the chain, or the keys the engine derived towards it, come
            # within reach (PROTOCOL.md §6.4); each try extended them.
            held, dropped = tx.hold(cid, payload)
            self._dropped(dropped)
            header = header or read_header(payload)
            self.sequencer.hold_unreached((cid, *header.chain_id), header.step, held)
            return False
        except MissingKey:
            _, dropped = tx.hold(cid, payload)
            self._dropped(dropped)
            return False
        if opened is None:
            self._duplicate(cid, payload, header)
            report_settled(self.engine.take_settled(), tx, batch, self.counters)
            return True
        # The chain moved: held far-ahead steps may be in reach now.
        self.sequencer.moved((cid, opened.epoch, opened.sender_index, opened.chain))
        self.rosters.heard(opened)
        message = opened.message
        text = message.text if isinstance(message, TextMessage) else None
        sent_at = message.sent_at if isinstance(message, TextMessage) else None
        row = tx.add_received(
            cid,
            opened.epoch,
            opened.sender_index,
            opened.chain,
            opened.step,
            opened.sender,
            _kind(message),
            sent_at,
            text,
            Trust.PENDING if opened.pending else Trust.AUTHENTIC,
        )
        if row is None:
            self._duplicate(cid, payload, header)
            report_settled(self.engine.take_settled(), tx, batch, self.counters)
            return True
        late = self._sequence(tx, opened, batch)
        if isinstance(message, TextMessage):
            self.counters["received"] += 1
            key = (opened.epoch, opened.sender_index, opened.chain, opened.step)
            self.receipts.add(cid, ReceiptType.DELIVERED, [key])
            batch.events.append(
                MessageReceived(
                    row,
                    cid,
                    opened.sender,
                    message.text,
                    message.sent_at,
                    opened.epoch,
                    opened.sender_index,
                    opened.chain,
                    opened.step,
                    opened.signed,
                    late,
                    opened.pending,
                )
            )
        elif isinstance(message, Receipt):
            self.receipts_in.on_receipt(tx, opened, message, batch)
        elif opened.forgeable_control:
            pass  # any member could have sealed it (§6.5): counted by the engine
        elif isinstance(message, Control) and message.op is ControlOp.LEAVE:
            self.rosters.on_leave(tx, opened)
        elif isinstance(message, Control) and message.op in (ControlOp.UPDATE, ControlOp.REKEY):
            self.rosters.on_epoch_request(tx)
        elif isinstance(message, Control) and message.op is ControlOp.ENDS:
            batch.retry_held = True  # unsigned old-epoch envelopes that waited for the ends
        report_settled(self.engine.take_settled(), tx, batch, self.counters)
        return True

    def _sequence(self, tx: StateTransaction, opened: Opened, batch: Batch) -> bool:
        """Per-sender sequence: record gaps, fill them; whether this one was late."""
        key = (opened.cid, opened.epoch, opened.sender_index, opened.chain)
        step = opened.step
        where = self.sequencer.record(key, step)
        if where.gap is not None:
            gap = Gap(
                opened.cid,
                opened.epoch,
                opened.sender_index,
                opened.chain,
                *where.gap,
                opened.sender,
                self._clock(),
            )
            tx.add_gap(gap)
            self.counters["gaps"] += 1
            # Shown past the missing steps: they did not come within the reorder window
            # (the sender did not answer our asks, the archive lacked them). If they
            # come later they are shown late, out of this sender's order.
            self.counters["reorder_gave_up"] += 1
            log.warning(
                "gave up waiting for steps %d..%d of %s in %s after %g s (reorder_window_s, "
                "%d asks): later messages shown, these will show late if they come",
                gap.first,
                gap.last,
                gap.sender,
                gap.cid,
                self.options.reorder_window_s,
                self.sequencer.asks.asks(key),
            )
            batch.events.append(
                GapDetected(gap.cid, gap.sender, gap.epoch, gap.chain, gap.first, gap.last)
            )
            return False
        if not where.late:
            return False
        tx.fill_gap(opened.cid, opened.epoch, opened.sender_index, opened.chain, step)
        self.counters["late"] += 1
        return True

    def retry_held(self) -> Batch | None:
        """Try again what waits for a key, a chain end or a roster (not what waits for
        the engine's reach): after a roster, grant or restart; the side effects."""
        unreached = self.sequencer.unreached_rows()
        held = [h for h in self.state.held() if h.id not in unreached]
        if not held:
            return None
        batch = Batch()
        with self.state.transaction() as tx:
            done = [h.id for h in held if self._open_held(tx, h.cid, h.payload, batch)]
            tx.unhold(done)
            self.engine.flush()
        batch.retry_held = False
        return batch

    def _open_held(self, tx: StateTransaction, cid: str, payload: bytes, batch: Batch) -> bool:
        # The held copy is re-held by _open on MissingKey; drop this one either way then.
        try:
            opened = self.open(tx, cid, payload, batch)
        except KeyStoreError:
            raise
        except FieldchatError as exc:
            self._rejected(exc)
            return True
        if not opened:
            self.counters["held_again"] += 1
        return True

    def open_fetched(self, cid: str, envelopes: list[bytes]) -> Batch | None:
        """Open what the history source sent, like live messages; the side effects."""
        if not envelopes:
            return None
        batch = Batch()
        with self.state.transaction() as tx:
            for envelope in envelopes:
                with self._counting_refusals():
                    self.open(tx, cid, envelope, batch)
            self.engine.flush()
        return batch

    def may_open(self, cid: str, epoch: int, envelope: bytes) -> bool:
        """Whether an archived envelope can ever be opened (not of an epoch before ours
        from a chain we hold no key for)."""
        try:
            chain_id = read_header(envelope).chain_id
        except FieldchatError:
            return True  # the engine rejects and counts it
        return chain_id[0] >= epoch or self.engine.next_step(cid, *chain_id) is not None


def _kind(message: TextMessage | Receipt | Control) -> MessageKind:
    if isinstance(message, TextMessage):
        return MessageKind.TEXT
    return MessageKind.RECEIPT if isinstance(message, Receipt) else MessageKind.CONTROL

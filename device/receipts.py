"""Receipts a device owes (delivered, read), batched (docs/device.md, "Delivery model").

A receiver does not answer each message: the steps it received or read collect here
and leave every ``receipt_interval_s`` as one encrypted receipt per conversation and
type, their steps collapsed into ranges (PROTOCOL.md §4.1). Pure apart from a lock:
application threads add read receipts while the worker adds delivered ones.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Iterable, Iterator

from fieldchat.device.rows import StepInConversation
from fieldchat.schemas import Receipt, ReceiptRange, ReceiptType
from fieldchat.schemas.messages import MAX_RECEIPT_RANGES

__all__ = ["ReceiptBook", "missing_receipt", "ranges", "receipts"]

Owed = dict[tuple[str, ReceiptType], set[StepInConversation]]


class ReceiptBook:
    """Steps owed a receipt, per ``(cid, type)``, and when the next batch leaves."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # never held while taking another lock
        self._owed: Owed = defaultdict(set)
        self._next = 0.0

    def add(self, cid: str, rtype: ReceiptType, keys: Iterable[StepInConversation]) -> None:
        """Owe ``rtype`` receipts for ``keys`` (``(epoch, sender, chain, step)``)."""
        with self._lock:
            self._owed[(cid, rtype)].update(keys)

    @property
    def pending(self) -> bool:
        """Whether receipts wait for the next batch."""
        with self._lock:
            return any(self._owed.values())

    def due(self, now: float, interval_s: float) -> bool:
        """Whether a batch is due at ``now`` (the next then falls ``interval_s`` later)."""
        if now < self._next:
            return False
        self._next = now + interval_s
        return True

    def take(self) -> Owed:
        """Everything owed, now no longer owed (it is about to be sealed)."""
        with self._lock:
            owed = {k: v for k, v in self._owed.items() if v}
            self._owed.clear()
        return owed


def ranges(keys: Iterable[StepInConversation]) -> list[ReceiptRange]:
    """Collapse ``(epoch, sender, chain, step)`` keys into inclusive step ranges.

    Merged as plain lists, one validated model per range at the end: a model per key
    (rebuilt at every merged step) was ≈ 7 % of a receiving device's CPU.
    """
    spans: list[list[int]] = []  # [epoch, sender, chain, first, last]
    for epoch, sender, chain, step in sorted(keys):
        if spans:
            last = spans[-1]
            if last[0] == epoch and last[1] == sender and last[2] == chain and last[4] + 1 == step:
                last[4] = step
                continue
        spans.append([epoch, sender, chain, step, step])
    return [
        ReceiptRange(epoch=e, sender=s, chain=c, first=first, last=last)
        for e, s, c, first, last in spans
    ]


def receipts(owed: Owed) -> Iterator[tuple[str, Receipt]]:
    """The receipts to seal for ``owed``: per conversation and type, its ranges in
    messages of at most MAX_RECEIPT_RANGES."""
    for (cid, rtype), keys in owed.items():
        spans = ranges(keys)
        for i in range(0, len(spans), MAX_RECEIPT_RANGES):
            yield cid, Receipt(type=rtype, ranges=tuple(spans[i : i + MAX_RECEIPT_RANGES]))


def missing_receipt(wanted: list[ReceiptRange]) -> Receipt:
    """A gap request for ``wanted`` (lowest steps first): what does not fit is asked
    for in a later ask."""
    return Receipt(type=ReceiptType.MISSING, ranges=tuple(wanted[:MAX_RECEIPT_RANGES]))

"""Receipts a device owes (device.receipts): ranges, batching and their timing."""

from __future__ import annotations

from fieldchat.device.receipts import ReceiptBook, missing_receipt, ranges, receipts
from fieldchat.schemas import ReceiptType
from fieldchat.schemas.messages import MAX_RECEIPT_RANGES


def test_steps_collapse_into_ranges_per_chain() -> None:
    keys = {(0, 1, 0, 3), (0, 1, 0, 1), (0, 1, 0, 2), (0, 1, 0, 5), (0, 2, 0, 5), (1, 1, 0, 6)}
    assert [(r.epoch, r.sender, r.chain, r.first, r.last) for r in ranges(keys)] == [
        (0, 1, 0, 1, 3),
        (0, 1, 0, 5, 5),
        (0, 2, 0, 5, 5),
        (1, 1, 0, 6, 6),
    ]


def test_a_batch_leaves_once_per_interval_with_what_is_owed() -> None:
    book = ReceiptBook()
    assert not book.pending
    assert book.due(0.0, 0.5)
    book.add("c", ReceiptType.DELIVERED, [(0, 1, 0, 1), (0, 1, 0, 2)])
    book.add("c", ReceiptType.READ, [(0, 1, 0, 1)])
    assert book.pending
    assert not book.due(0.49, 0.5)
    assert book.due(0.5, 0.5)
    owed = book.take()
    assert not book.pending
    sealed = list(receipts(owed))
    assert [(cid, r.type, len(r.ranges)) for cid, r in sealed] == [
        ("c", ReceiptType.DELIVERED, 1),
        ("c", ReceiptType.READ, 1),
    ]


def test_many_ranges_split_into_several_receipts() -> None:
    keys = {(0, 1, 0, 2 * i) for i in range(MAX_RECEIPT_RANGES + 3)}  # no two adjacent
    sealed = list(receipts({("c", ReceiptType.DELIVERED): keys}))
    assert [len(r.ranges) for _, r in sealed] == [MAX_RECEIPT_RANGES, 3]


def test_a_gap_request_names_the_lowest_ranges_that_fit() -> None:
    wanted = ranges({(0, 1, 0, 2 * i) for i in range(MAX_RECEIPT_RANGES + 1)})
    receipt = missing_receipt(wanted)
    assert receipt.type is ReceiptType.MISSING
    assert receipt.ranges == tuple(wanted[:MAX_RECEIPT_RANGES])

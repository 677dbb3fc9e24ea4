"""What a signed envelope settled of its sender's unsigned messages (PROTOCOL.md §6.5),
recorded and reported on the worker thread: verified messages are marked so in the
history and announced; forgeries are marked, counted, logged loudly and announced."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable

from fieldchat.device._coverage import Verdict
from fieldchat.device._opener import Settlement
from fieldchat.device.context import Batch
from fieldchat.device.events import ForgeryDetected, MessageVerified
from fieldchat.device.rows import Trust
from fieldchat.device.state import StateTransaction

__all__ = ["report_settled"]

log = logging.getLogger("fieldchat.device")


def report_settled(
    settled: Iterable[Settlement], tx: StateTransaction, batch: Batch, counters: Counter[str]
) -> None:
    """Mark each settlement in the history (in ``tx``) and queue its event in ``batch``;
    called after the message that completed them, so a display shows the message
    before its verdict."""
    for done in settled:
        chain = (done.epoch, done.sender_index, done.chain)
        verified = done.verdict is Verdict.VERIFIED
        tx.settle(done.cid, chain, done.steps, Trust.VERIFIED if verified else Trust.FORGED)
        if verified:
            batch.events.append(MessageVerified(*done[:6]))
            continue
        counters["forgery"] += len(done.steps)
        log.error(
            "FORGERY: steps %s of %s in %s (epoch %d, chain %d) were not sent by %s: "
            "another member forged them",
            list(done.steps),
            done.sender,
            done.cid,
            done.epoch,
            done.chain,
            done.sender,
        )
        batch.events.append(ForgeryDetected(*done[:6], pinpointed=done.pinpointed))

"""What a device does with a publication the broker refused for good.

On MQTT 5 a broker answers a PUBLISH it will not route with a negative PUBACK (the
embedded broker: 0x87 Not authorized for a conversation the sender is not, or no
longer, in as the broker sees it; 0x90 Topic Name invalid; 0x97 Quota exceeded for a
roster past the founding quota). Publishing it again would be refused again, so the
rows leave the outbox and are never published again (:meth:`StateTransaction.refused`),
one warning is logged and the application gets a :class:`PublishRefused`. The rows
of one PUBLISH (a frame) share a topic, hence a conversation.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from fieldchat.device.events import PublishRefused
from fieldchat.device.link import PubackRefusal
from fieldchat.device.transaction import StateTransaction

__all__ = ["refuse"]

log = logging.getLogger("fieldchat.device")


def refuse(tx: StateTransaction, seqs: Sequence[int], refusal: PubackRefusal) -> PublishRefused:
    """Drop the outbox rows ``seqs`` one PUBLISH carried (in the caller's transaction)
    and describe the refusal."""
    rows = tx.refused(seqs)
    topic = rows[0].topic if rows else ""
    cid = rows[0].cid if rows else None
    what = rows[0].what if rows else "msg"
    log.warning(
        "the broker refused %d %s publication(s) to %s (0x%02X %s); not sent again",
        len(seqs),
        what,
        f"conversation {cid}" if cid else topic or "an unknown topic",
        refusal.code,
        refusal.name,
    )
    return PublishRefused(cid, topic, what, refusal.code, refusal.name, len(seqs))

"""What ``fieldchat device send`` waits for, and what it says of a message it leaves
in the outbox (docs/device.md, "Exit codes").

A message ``send`` accepted is durable in the outbox; the broker being down, or
refusing the credential, afterwards delays it but loses nothing, so ``send`` says
"kept" and exits 0. ``--wait`` asks for the broker's PUBACK of the messages this run
sent, ``--acks N`` (which implies it) for the delivery receipts of N members; what is
not there within ``--timeout`` is "kept, not delivered yet" (exit 75).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from fieldchat.device.client import Device, SentMessage
from fieldchat.device.events import PublishRefused
from fieldchat.schemas.errors import NotAuthorized, TransportError

__all__ = ["Delivery", "Kept", "deliver"]


@dataclass(frozen=True, slots=True)
class Delivery:
    """What ``send`` waits for before it exits (besides trying for ``timeout`` s)."""

    sent: Sequence[SentMessage]  # the messages this run accepted
    broker: bool = False  # --wait: their PUBACKs
    acks: int = 0  # --acks: delivery receipts from this many members


@dataclass(frozen=True, slots=True)
class Kept:
    """Messages left in the outbox when ``send`` stopped waiting, and why."""

    waiting: int  # everything in the outbox, ours and older
    why: str
    credential: bool  # the broker refused the credential: it waits for a fixed one

    def line(self, *, waited: bool) -> str:
        """The one line ``send`` prints on stderr."""
        when = (
            "once the broker accepts this device's credential (save the right one with "
            "`fieldchat device --credential … init`)"
            if self.credential
            else "by the next device command that connects"
        )
        head = "not delivered yet" if waited else "accepted"
        return (
            f"fieldchat device: {head}: {self.waiting} publication(s) kept in the outbox "
            f"({self.why}); they will be sent {when}; do not send them again"
        )


def deliver(
    device: Device, wanted: Delivery, timeout: float, refused: Sequence[PublishRefused]
) -> Kept | None:
    """Connect and wait until the broker has the outbox (or, per ``wanted``, the
    messages of this run, or their receipts); ``None`` when it does, else what is kept.
    A refusal by the broker ends the wait at once (the caller reports it)."""
    end = time.monotonic() + timeout
    try:
        device.wait_connected(timeout)
    except TransportError as exc:
        return Kept(len(device.outbox()), str(exc), isinstance(exc, NotAuthorized))
    left = max(0.0, end - time.monotonic())
    if wanted.broker or wanted.acks:
        done = device.wait_for(lambda: bool(refused) or _arrived(device, wanted), left)
        what = f"acknowledged by {wanted.acks} member(s)" if wanted.acks else "delivered"
    else:
        done = device.wait_drained(left)
        what = "taken by the broker"
    if done or refused:
        return None
    return Kept(len(device.outbox()), f"not {what} within {timeout:g} s", credential=False)


def _arrived(device: Device, wanted: Delivery) -> bool:
    """Whether the broker acknowledged every message of ``wanted`` and, with ``acks``,
    that many members receipted each."""
    cids = {m.cid for m in wanted.sent}
    published = {row.id for cid in cids for row in device.sent(cid) if row.published_at}
    if any(m.id not in published for m in wanted.sent):
        return False
    return all(
        len(device.state.receipted_by(m.cid, m.epoch, m.chain, m.step)) >= wanted.acks
        for m in wanted.sent
    )

"""When own messages are published again (docs/device.md, "Delivery model"). Pure:
``now`` comes in; :class:`fieldchat.device.client.Device` finds and queues the rows.

* After a reconnect, own texts some member has not receipted are published again
  ``resend_after_s`` later (a broker may acknowledge and then lose: Mosquitto between
  snapshots, aMQTT in flight); the wait lets the receipts of what did arrive come back
  first, so those are not sent twice.
* A member publishes only after subscribing: what we sent in an epoch before we first
  heard it (its first envelope of the epoch, or its grant) is published again once its
  receipts for what did reach it have had time to come back (``GRANT_RESEND_RECEIPTS``
  receipt intervals). Only steps sealed before we heard it: what follows it receives.
"""

from __future__ import annotations

__all__ = ["GRANT_RESEND_RECEIPTS", "Resends"]

# A new member's grant: what it has not receipted this many receipt intervals later
# is published again (it may have subscribed after we sent).
GRANT_RESEND_RECEIPTS = 3


class Resends:
    """The resends planned: one after the last reconnect, one per granting member."""

    def __init__(self) -> None:
        self._reconnect: tuple[float, float] | None = None  # (due, published before)
        # (cid, member first heard) -> when to resend what it has not receipted.
        self.grants: dict[tuple[str, str], float] = {}
        # The same key -> our first step sealed after we heard it (None: no bound).
        self.upto: dict[tuple[str, str], int | None] = {}

    def reconnected(self, now: float, after_s: float) -> None:
        """A reconnect (not the first connect): resend ``after_s`` from now what was
        published before now and is still unreceipted."""
        self._reconnect = (now + after_s, now)

    @property
    def planned(self) -> tuple[float, float] | None:
        """The resend after the last reconnect: ``(due, published before)``, if any."""
        return self._reconnect

    def reconnect_due(self, now: float) -> float | None:
        """When due: the time before which the messages to resend were published."""
        if self._reconnect is None or now < self._reconnect[0]:
            return None
        _, before = self._reconnect
        self._reconnect = None
        return before

    def granted(
        self,
        cid: str,
        granter: str,
        now: float,
        receipt_interval_s: float,
        upto: int | None = None,
    ) -> None:
        """``granter`` listens to ``cid`` (the first time we hear it plans the resend);
        ``upto``: resend only our steps below it (those sealed before we heard it)."""
        due = now + GRANT_RESEND_RECEIPTS * receipt_interval_s
        if (cid, granter) not in self.grants:
            self.grants[(cid, granter)] = due
            self.upto[(cid, granter)] = upto

    def grants_due(self, now: float) -> list[tuple[str, str, int | None]]:
        """``(cid, member, upto)`` whose resend is due, no longer planned."""
        due = [key for key, at in self.grants.items() if at <= now]
        for key in due:
            del self.grants[key]
        return [(cid, pid, self.upto.pop((cid, pid), None)) for cid, pid in due]

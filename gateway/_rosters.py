"""Which rosters the archive adopts, and when it republishes one (issue 13).

The archive feeds browsers and late joiners, and on brokers that cannot verify
signatures (Mosquitto, NATS) the gateway is the only component that writes the
retained ``c/{cid}/roster``. So it adopts exactly what members would accept
(PROTOCOL.md §5.2): epoch 0 when it founds its ``cid``; epoch n > 0 only when epoch
n - 1 is archived and n is signed by one of its admins and names its digest. A
roster whose predecessor is missing is *held* (durably, bounded) until it arrives;
it is never adopted "as a base".

These are the rules alone, with an injected clock; ``fieldchat.gateway._roster_keeper``
looks the neighbours up and moves the bytes.
"""

from __future__ import annotations

import enum
import time
from collections import OrderedDict
from collections.abc import Callable

from fieldchat.schemas import Roster, verify_roster_chain
from fieldchat.schemas.errors import RosterRejected

__all__ = ["HEAL_INTERVAL_S", "Healer", "RosterRefused", "Source", "Verdict", "judge"]

HEAL_INTERVAL_S = 10.0  # the shortest time between two republications of one head
_HEALER_MAX = 50_000  # conversations remembered by the healer (least recent dropped)


class Source(enum.StrEnum):
    """Where a roster came from; it decides what the gateway may do with it."""

    ROSTER = "roster"  # c/{cid}/roster: retained by a verifier (the broker or a gateway)
    PROPOSE = "propose"  # c/{cid}/propose: an admin's submission, for a verifier
    INBOX = "inbox"  # p/{pid}/inbox: the earlier rosters of the chain, for a new member
    WS = "ws"  # a browser's, through /ws

    @property
    def republished(self) -> bool:
        """Adopted, the archiver publishes it, retained, on ``c/{cid}/roster`` (it
        verified it). A browser's goes out from ``/ws`` itself, after its check."""
        return self is Source.PROPOSE

    @property
    def founding_counted(self) -> bool:
        """An epoch 0 from here counts against its signer's founding quota here: what
        is on ``c/{cid}/roster`` was counted by the verifier that retained it."""
        return self is not Source.ROSTER


class Verdict(enum.Enum):
    KNOWN = "known"  # archived already, the same bytes
    ADOPT = "adopt"  # chains to the archive: archive it
    HOLD = "hold"  # its previous epoch is not archived yet: keep it until it is


class RosterRefused(RosterRejected):
    """A roster the gateway will not adopt; ``reason`` is the rejection counter's label
    (``roster_conflict``, ``roster_unchained``, ``founding_quota``, …)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def judge(
    roster: Roster,
    *,
    known: Roster | None,
    prev: Roster | None,
    following: Roster | None = None,
) -> Verdict:
    """Decide about ``roster`` given the archived rosters of its epoch (``known``), the
    epoch before (``prev``) and the epoch after (``following``).

    Raises:
        RosterRefused: another roster is archived for its epoch (``roster_conflict``).
        RosterRejected: it does not follow ``prev``, or does not found its cid (epoch 0),
            or the archived next epoch does not name it.
    """
    digest = roster.digest()
    if known is not None:
        if known.digest() != digest:
            raise RosterRefused(
                "roster_conflict",
                f"another roster is archived for {roster.cid} at epoch {roster.epoch}",
            )
        return Verdict.KNOWN
    if roster.epoch == 0:
        verify_roster_chain(roster, None)
    elif prev is None:
        return Verdict.HOLD
    else:
        verify_roster_chain(roster, prev)
    if following is not None and following.prev != digest:
        # Only an archive made before the chain rule (a later epoch kept "as a base")
        # can hold a next epoch without this one: it names another predecessor.
        raise RosterRejected(f"epoch {roster.epoch + 1} of {roster.cid} follows another roster")
    return Verdict.ADOPT


class Healer:
    """When to republish a conversation's archived head on ``c/{cid}/roster``.

    The gateway republishes its head when the broker shows an older roster there, a
    refused one (a conflict, a broken chain) or none (an empty retained payload). Our
    own republication comes back as the head itself, which asks for nothing; and each
    conversation is healed at most once per ``interval_s``, so two parties that
    disagree cannot make it republish in a loop (bounded memory: ``max_tracked``).
    """

    def __init__(
        self,
        interval_s: float = HEAL_INTERVAL_S,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_tracked: int = _HEALER_MAX,
    ) -> None:
        self.interval_s = interval_s
        self.clock = clock
        self.max_tracked = max_tracked
        self._last: OrderedDict[str, float] = OrderedDict()

    def due(self, cid: str) -> bool:
        """True (and remembered) when ``cid`` was not healed in the last interval."""
        now = self.clock()
        last = self._last.get(cid)
        if last is not None and now - last < self.interval_s:
            return False
        self._last[cid] = now
        self._last.move_to_end(cid)
        while len(self._last) > self.max_tracked:
            self._last.popitem(last=False)
        return True

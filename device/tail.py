"""The history tail: asking the archive for what it holds past the device's cursor
(docs/device.md, "Delivery model"). Pure: the schedule takes ``now`` arguments, and a
round is a function of the source it is given (it runs on the device's history thread).

A gap shows only when a later message arrives, so messages lost at the *end* of a run
(an offline session's queue overflowing, a failover) would never be asked for. A
device with a history source therefore asks for the tail: once the backlog settles
after each (re)connect (TAIL_QUIET_S without inbound messages), every
``history_tail_s`` while idle, at once when a gap expires or a conversation is joined,
and again after TAIL_AGAIN_S while the source has more. One round at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from fieldchat.device.reconcile import Key, Reconciling
from fieldchat.device.rows import Gap
from fieldchat.schemas.errors import FieldchatError

__all__ = [
    "MAX_GAPS_FOR_TAIL",
    "TAIL_AGAIN_S",
    "TAIL_CURSOR",
    "TAIL_PAGE",
    "TAIL_PAGES",
    "TAIL_QUIET_S",
    "Fetched",
    "HistorySource",
    "TailSchedule",
    "tail_round",
]

# Pages of this many envelopes, at most TAIL_PAGES per conversation a round; rounds wait
# for TAIL_QUIET_S without inbound messages (a reconnect's queued backlog arrives first)
# and follow each other TAIL_AGAIN_S apart while the source has more, else
# LinkOptions.history_tail_s apart.
TAIL_PAGE = 500
TAIL_PAGES = 4
TAIL_QUIET_S = 0.5
TAIL_AGAIN_S = 1.0
TAIL_CURSOR = "history_after/"  # meta key prefix: the history source's cursor per cid
MAX_GAPS_FOR_TAIL = 1_024  # expired gaps the next tail round still names the chain below


class HistorySource(Protocol):
    """Where missing envelopes are asked for: the gateway's history API
    (:class:`device.history.GatewayHistory`).

    ``since`` returns one page archived for a conversation after a cursor the device
    keeps durably, per conversation: the one way the device fetches (tail rounds, gap
    fills, a join's backfill), so nothing is fetched twice across restarts. The
    device opens what it gets like live messages: duplicates and forgeries cost
    nothing. ``from_epoch``: the oldest roster epoch the device holds keys of; a source
    may skip what was archived before it began (the device could not open it).

    ``rosters`` returns the conversation's archived rosters, oldest epoch first: a
    roster that does not chain to those the device holds waits for them (PROTOCOL.md
    §5.2); the engine checks every one, so a wrong answer costs a check, not trust.
    ``deliveries``: the epoch-secret deliveries archived for us in the conversation
    (§5.3), for an epoch entered whose delivery the inbox queue lost; each is checked
    against its roster's commit, so a wrong one is refused.
    """

    def since(
        self, cid: str, after: int, limit: int, *, from_epoch: int = 0
    ) -> tuple[list[bytes], int, bool]: ...

    def rosters(self, cid: str, *, from_epoch: int = 0) -> list[bytes]: ...

    def deliveries(self, cid: str) -> list[bytes]: ...


@dataclass(frozen=True, slots=True)
class Fetched:
    """What the history thread fetched for ``cid``, opened on the worker.

    ``cursor`` (a meta key and value) is saved once the envelopes are committed, so a
    crash fetches the page again (deduplicated) rather than skipping it;
    ``next_tail`` ends a tail round: seconds until the next.
    """

    cid: str
    envelopes: list[bytes]
    cursor: tuple[str, str] | None = None
    error: str | None = None
    next_tail: float | None = None
    deliveries: list[bytes] | None = None
    rosters: list[bytes] | None = None  # the answer to a roster fetch


class TailSchedule:
    """When the next tail round runs, and what it must still name."""

    def __init__(self) -> None:
        self.next: float | None = None  # the next round; None before connecting
        self.running = False  # a round is with the history thread
        # A round asked for by a gap or a join (since the last one started): it does not
        # wait for a quiet link, and follows at once a round that was running.
        self.asked = False
        self._last_inbound = 0.0  # when the last message batch arrived
        self._gap_after = 0.0  # a gap may start a round from then on
        # Gaps dropped after gap_timeout_s: the next round still names the chain below
        # them (reconcile.tail_marks), so the archive sends what they lacked.
        self._gaps: list[Gap] = []

    def connected(self, now: float) -> None:
        """A (re)connect: a round once the backlog the broker kept has arrived."""
        self.next = now

    def inbound(self, now: float) -> None:
        """Messages arrived (a round waits for a quiet link unless asked for)."""
        self._last_inbound = now

    def soon(self, now: float) -> None:
        """A round at once (or right after the one running), busy link or not: the
        quiet wait is for a reconnect's backlog, which a gap or a join is not."""
        self.asked = True
        if not self.running:
            self.next = now

    def gap_episode(self, now: float) -> bool:
        """A chain began to lack steps: whether that starts a round. At most one a
        TAIL_AGAIN_S: under heavy loss every chain starts episodes, and one round (a
        request per conversation) serves them all."""
        if now < self._gap_after:
            return False
        self._gap_after = now + TAIL_AGAIN_S
        self.soon(now)
        return True

    def gap_expired(self, gap: Gap, now: float) -> None:
        """``gap`` outlived ``gap_timeout_s``: the next round, at once, names it."""
        if len(self._gaps) < MAX_GAPS_FOR_TAIL:
            self._gaps.append(gap)
        self.soon(now)

    def due(self, now: float) -> bool:
        """Whether a round starts now."""
        return (
            self.next is not None
            and not self.running
            and now >= self.next
            and (self.asked or now - self._last_inbound >= TAIL_QUIET_S)
        )

    def start(self) -> list[Gap]:
        """A round starts: the expired gaps it names (no longer kept here)."""
        gaps, self._gaps = self._gaps, []
        self.running = True
        self.asked = False
        return gaps

    def finished(self, now: float, again_s: float) -> None:
        """The round ended; the next one ``again_s`` later (at once if asked for)."""
        self.running = False
        self.next = now + (0.0 if self.asked else again_s)


def tail_round(
    history: HistorySource,
    cursors: Sequence[tuple[str, int, int]],
    marks: Mapping[str, Sequence[Key]],
    hand_over: Callable[[Fetched], None],
    *,
    idle_s: float,
) -> None:
    """Up to TAIL_PAGES pages per conversation from each cursor ``(cid, after,
    from_epoch)``, each handed over with the cursor to save after it; then a last
    :class:`Fetched` saying when to look again (TAIL_AGAIN_S while the source has
    more, else ``idle_s``), whatever the source raised.

    With a source that reconciles and ``marks`` for a conversation, the request names
    what the device holds (``have``) and the source returns only what lies above.
    """
    archive = history if isinstance(history, Reconciling) else None
    more = False
    try:
        for cid, start, from_epoch in cursors:
            after = start
            for _ in range(TAIL_PAGES):
                try:
                    if archive is not None and marks.get(cid):
                        envelopes, after_next, more_here = archive.since(
                            cid, after, TAIL_PAGE, from_epoch=from_epoch, have=marks[cid]
                        )
                    else:
                        envelopes, after_next, more_here = history.since(
                            cid, after, TAIL_PAGE, from_epoch=from_epoch
                        )
                except FieldchatError as exc:
                    hand_over(Fetched(cid, [], error=str(exc)))
                    more_here = False
                    break
                cursor = (f"{TAIL_CURSOR}{cid}", str(after_next)) if after_next != after else None
                hand_over(Fetched(cid, envelopes, cursor=cursor))
                after = after_next
                if not more_here:
                    break
            more = more or more_here
    finally:  # whatever a source raised, rounds go on
        hand_over(Fetched("", [], next_tail=TAIL_AGAIN_S if more else idle_s))

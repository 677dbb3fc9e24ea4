"""Each sender's order on screen: held envelopes, gaps, the reorder window (docs/device.md,
"Delivery model"). Pure: no I/O, no threads; time comes in as ``now`` arguments.

Brokers may reorder a redelivered backlog and lose envelopes. A receiver shows each
sender chain's steps in order: an envelope more than one step ahead of the highest
shown is held for up to ``reorder_window_s`` while the missing steps are asked for
(:class:`~fieldchat.device.repair.GapAsks`); a step that comes in turn releases what
waited behind it; past the window the device gives up and shows what it held (a gap).
Unsigned envelopes too far ahead to derive before authentication wait apart, until
the chain comes within the engine's reach (PROTOCOL.md §6.4).

The :class:`Sequencer` only decides. :class:`fieldchat.device.client.Device` stores the
held rows (their ids are what the sequencer keeps), opens what it is told to release
and applies what :meth:`Sequencer.record` returns.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from fieldchat.device.repair import GapAsks, lacking
from fieldchat.device.rows import ChainKey

__all__ = ["MAX_CANDIDATES_PER_STEP", "Sequenced", "Sequencer"]

# Distinct candidates of one step held for display order (unsigned junk beside the
# genuine envelope; only those not refused by an authentication check wait).
MAX_CANDIDATES_PER_STEP = 8


@dataclass(frozen=True, slots=True)
class Sequenced:
    """Where an opened envelope fell in its sender's order.

    ``gap``: the steps ``(first, last)`` it skipped (not received within the reorder
    window: recorded, shown later as late if they come); ``late``: it filled a gap.
    """

    late: bool = False
    gap: tuple[int, int] | None = None


IN_ORDER = Sequenced()
LATE = Sequenced(late=True)


class Sequencer:
    """Per sender chain: the highest step shown and what waits for a missing step.

    Args:
        window_s: the reorder window (``LinkOptions.reorder_window_s``).
        expected: the first step a chain's grant starts at (``Engine.next_step``), or
            ``None`` while unknown: before its first envelope a chain is ordered from
            there, so a loss of its first steps is a gap like any other.
        shown: the highest step stored per chain (from the state file).
    """

    def __init__(
        self,
        window_s: float,
        expected: Callable[[ChainKey], int | None],
        shown: Mapping[ChainKey, int] | None = None,
    ) -> None:
        self.asks = GapAsks(window_s)
        self._expected = expected
        self._high: dict[ChainKey, int] = dict(shown or {})
        # chain -> step -> [(held row, deadline)]: every distinct candidate of a step
        # that did not fail to authenticate (history may serve junk beside the genuine
        # envelope: docs/gateway.md, "Receivers").
        self._waiting: dict[ChainKey, dict[int, list[tuple[int, float]]]] = defaultdict(dict)
        # chain -> step -> [held row]: unsigned envelopes too far ahead to derive before
        # authentication, tried once the engine's reach passes them, never wholesale
        # (each try can cost up to ~1 ms).
        self._unreached: dict[ChainKey, dict[int, list[int]]] = defaultdict(dict)
        self._advanced: set[ChainKey] = set()  # chains whose far-ahead steps to look at again

    def restart(self, window_s: float) -> list[ChainKey]:
        """Begin a run with ``window_s``: the chains holding envelopes from before,
        whose missing steps are to be asked for at once (see :meth:`lacking`)."""
        self.asks = GapAsks(window_s)
        return list(self._waiting)

    # -- the order ----------------------------------------------------------------------

    def high_of(self, key: ChainKey) -> int | None:
        """The highest step shown of a chain; before the first, the step before the one
        its grant starts at."""
        high = self._high.get(key)
        if high is None:
            expected = self._expected(key)
            if expected is not None:
                return expected - 1
        return high

    def shown(self, cid: str) -> dict[tuple[int, int, int], int]:
        """The highest step shown per chain ``(epoch, sender, chain)`` of ``cid``."""
        return {(e, s, c): h for (k, e, s, c), h in self._high.items() if k == cid}

    def must_wait(self, key: ChainKey, step: int) -> bool:
        """Whether an envelope at ``step`` overtook a missing one (or joins candidates
        already waiting for that step) and is to be held rather than opened."""
        high = self.high_of(key)
        if high is not None and key not in self._high:
            # Shown through the step before the grant's first from now on.
            self._high[key] = high
        return step in self._waiting.get(key, {}) or (high is not None and step > high + 1)

    def record(self, key: ChainKey, step: int) -> Sequenced:
        """An envelope of ``key`` at ``step`` was opened and stored: move the chain on."""
        high = self._high.get(key)
        if high is None or step == high + 1:
            self._high[key] = step if high is None else max(high, step)
            return IN_ORDER
        if step > high + 1:
            self._high[key] = step
            return Sequenced(gap=(high + 1, step - 1))
        return LATE

    # -- held for order -------------------------------------------------------------------

    @property
    def waiting(self) -> Mapping[ChainKey, Mapping[int, list[tuple[int, float]]]]:
        """What is held for order: chain -> step -> ``[(held row, deadline)]``."""
        return self._waiting

    def candidates(self, key: ChainKey, step: int) -> list[int]:
        """The held rows waiting as candidates for ``step``."""
        return [row for row, _ in self._waiting.get(key, {}).get(step, [])]

    def restore(self, key: ChainKey, step: int, row: int, until: float) -> None:
        """A row held for order by an earlier run (asked for again on :meth:`restart`)."""
        self._waiting[key].setdefault(step, []).append((row, until))

    def wait(self, key: ChainKey, step: int, row: int, until: float, now: float) -> bool:
        """Hold ``row`` for ``step`` until ``until``; whether this began an episode of
        asks (the caller then also asks its history source)."""
        self._waiting[key].setdefault(step, []).append((row, until))
        return self.lacking(key, now)

    def lacking(self, key: ChainKey, now: float) -> bool:
        """``key`` may hold envelopes behind missing steps: schedule asks for them;
        whether an episode began."""
        missing = lacking(self.high_of(key), self._waiting.get(key, {}))
        return bool(missing) and self.asks.lacking(key, missing[-1][1], now)

    def due_asks(self, now: float) -> list[tuple[ChainKey, list[tuple[int, int]]]]:
        """The chains whose ask is due and the step ranges they lack, lowest first."""
        out = []
        for key in self.asks.due(now):
            missing = lacking(self.high_of(key), self._waiting.get(key, {}))
            if missing:
                out.append((key, missing))
            else:
                self.asks.settled(key)
        return out

    def hold_again(self, now: float, window_s: float) -> list[ChainKey]:
        """A connect: what is held waits a whole window more (from ``now``), and its
        asks start again; the chains holding something (to ask for at once, see
        :meth:`lacking`). Offline nothing could be asked, and what revealed a gap may
        have come through the history tail while the broker still held the missing
        steps in our session: it delivers them right after the connect."""
        later = now + window_s
        for key, steps in self._waiting.items():
            for step, candidates in steps.items():
                steps[step] = [(row, max(until, later)) for row, until in candidates]
            self.asks.settled(key)
        return list(self._waiting)

    def expired(self, now: float, grace: float = 0.0) -> bool:
        """Whether some held envelope's wait is over (``grace`` past its window)."""
        return any(
            until + grace <= now
            for steps in self._waiting.values()
            for candidates in steps.values()
            for _, until in candidates
        )

    def release(
        self, now: float, *, expired: bool = False, grace: float = 0.0
    ) -> Iterator[tuple[ChainKey, list[int]]]:
        """One pass over the chains: the rows of each chain's lowest held step whose
        turn came (or, with ``expired``, whose wait is over: ``grace`` past it), popped
        as they are
        yielded. Open each before taking the next: opening moves the chain on."""
        for key, steps in list(self._waiting.items()):
            if not steps:
                del self._waiting[key]
                self.asks.settled(key)
                continue
            first = min(steps)
            until = min(at for _, at in steps[first])
            high = self.high_of(key)
            if high is not None and first > high + 1 and not (expired and until + grace <= now):
                continue
            yield key, [row for row, _ in steps.pop(first)]

    # -- beyond reach ---------------------------------------------------------------------

    def hold_unreached(self, key: ChainKey, step: int, row: int) -> None:
        """``row`` is too far ahead of ``key`` to try now (``UnsignedJumpTooFar``)."""
        self._unreached[key].setdefault(step, []).append(row)
        self._advanced.add(key)

    def moved(self, key: ChainKey) -> None:
        """``key`` opened a step: its far-ahead rows may be within reach now."""
        if self._unreached:
            self._advanced.add(key)

    @property
    def advanced(self) -> bool:
        return bool(self._advanced)

    def reachable(
        self, reach: Callable[[ChainKey], int | None]
    ) -> Iterator[tuple[ChainKey, list[int]]]:
        """The far-ahead rows of the chains that moved, once within ``reach`` (an honest
        sender far ahead is reached a few hundred steps per envelope it sends; junk
        beyond reach is never tried again), popped as they are yielded."""
        while self._advanced:
            key = self._advanced.pop()
            steps = self._unreached.get(key)
            if not steps:
                self._unreached.pop(key, None)
                continue
            limit = reach(key)
            for step in sorted(s for s in steps if limit is not None and s <= limit):
                yield key, steps.pop(step)  # every candidate held for that step

    def unreached_rows(self) -> set[int]:
        """Rows held beyond reach (left out of the wholesale retry of held rows)."""
        return {
            row for steps in self._unreached.values() for rows in steps.values() for row in rows
        }

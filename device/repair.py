"""Gap repair rules (PROTOCOL.md §4.1, MISSING receipts): pure, with an injected clock.

A receiver that holds envelopes behind a missing step of a sender chain asks for the
missing steps at once with a MISSING receipt, and again with backoff while it still
holds them (:class:`GapAsks`); the sender publishes the envelopes it still keeps for
those steps again at once, within bounds (:class:`Repairs`). :class:`device.client.Device`
moves the bytes; these classes only decide when and how much.

Why asks are spread over the reorder window: the first ask repairs what a broker
lost while both ends are online (one round trip to the sender and back: 5-30 ms on
loopback, BENCHMARKS.md ``gap_repair_ms``); the later ones cover a lost ask or a
lost answer. All of them fall inside ``reorder_window_s``, so a repair they bring is
shown in order; after the window the receiver gives up loudly and shows what it held.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

__all__ = [
    "ASK_FRACTIONS",
    "MAX_REPAIR_PER_INTERVAL",
    "MAX_REPAIR_PER_REQUEST",
    "REPAIR_INTERVAL_S",
    "ChainKey",
    "GapAsks",
    "Repairs",
    "StepKey",
    "lacking",
]

ChainKey = tuple[str, int, int, int]  # cid, epoch, sender index, chain
StepKey = tuple[str, int, int, int, int]  # cid, epoch, sender index, chain, step

# When a chain that lacks steps is asked for them, as fractions of the reorder window
# after the episode began: at once, then three more (w/8, 3w/8, 7w/8), each at least
# w/8 after the previous one, all before the window ends.
ASK_FRACTIONS = (0.0, 0.125, 0.375, 0.875)
# A sender publishes again at most this many envelopes for one MISSING receipt, and at
# most MAX_REPAIR_PER_INTERVAL in REPAIR_INTERVAL_S whoever asks: a member asking for
# huge ranges costs bounded bytes.
MAX_REPAIR_PER_REQUEST = 256
MAX_REPAIR_PER_INTERVAL = 1_024
REPAIR_INTERVAL_S = 1.0
_MAX_RECENT = 8_192  # steps remembered as published again (older ones are pruned)


def lacking(high: int | None, held: Iterable[int]) -> list[tuple[int, int]]:
    """The step ranges missing between the highest step shown (``high``) and the
    steps held behind it, lowest first: what a MISSING receipt asks for."""
    if high is None:
        return []
    out = []
    expected = high + 1
    for step in sorted(held):
        if step > expected:
            out.append((expected, step - 1))
        expected = max(expected, step + 1)
    return out


@dataclass(slots=True)
class _Episode:
    started: float
    asks: int  # asks made since it started (or restarted)
    due: float | None  # the next ask; None when all were made
    top: int  # the highest missing step asked for so far
    last: float | None = None  # the last ask


class GapAsks:
    """Receiver side: which sender chains lack steps, and when to ask for them.

    An *episode* begins when a chain first holds an envelope behind a missing step
    and ends when it holds none (:meth:`settled`). Within one, asks follow
    :data:`ASK_FRACTIONS` of ``window_s``; a missing step above all those asked for
    so far (a new loss) starts the schedule again, at most once per ``window_s / 8``.
    """

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self._episodes: dict[ChainKey, _Episode] = {}

    def __len__(self) -> int:
        return len(self._episodes)

    def lacking(self, key: ChainKey, top: int, now: float) -> bool:
        """``key`` holds envelopes behind missing steps up to ``top``; whether this
        begins an episode (the caller also asks its history source then)."""
        episode = self._episodes.get(key)
        if episode is None:
            self._episodes[key] = _Episode(now, 0, now, top)
            return True
        if top > episode.top:  # lost again, above what was asked for: start again
            episode.top = top
            episode.started = now
            episode.asks = 0
            episode.due = now if episode.last is None else max(now, episode.last + self._gap())
        return False

    def settled(self, key: ChainKey) -> None:
        """``key`` holds nothing behind a missing step any more."""
        self._episodes.pop(key, None)

    def due(self, now: float) -> list[ChainKey]:
        """Chains to ask for now; their next ask is scheduled (or none is left)."""
        out = []
        for key, episode in self._episodes.items():
            if episode.due is None or episode.due > now:
                continue
            out.append(key)
            episode.last = now
            episode.asks += 1
            if episode.asks < len(ASK_FRACTIONS):
                at = episode.started + ASK_FRACTIONS[episode.asks] * self.window_s
                episode.due = max(at, now + self._gap())
            else:
                episode.due = None
        return out

    def asks(self, key: ChainKey) -> int:
        episode = self._episodes.get(key)
        return 0 if episode is None else episode.asks

    def _gap(self) -> float:
        return self.window_s * ASK_FRACTIONS[1]


class Repairs:
    """Sender side: which of the envelopes a MISSING receipt names to publish again.

    Each step at most once per ``again_s`` (members asking together get one copy),
    at most :data:`MAX_REPAIR_PER_REQUEST` per receipt and
    :data:`MAX_REPAIR_PER_INTERVAL` per :data:`REPAIR_INTERVAL_S`.
    """

    def __init__(self, again_s: float) -> None:
        self.again_s = again_s
        self._recent: dict[StepKey, float] = {}
        self._interval_start = float("-inf")
        self._interval_count = 0
        self.refused = 0  # steps not published again because of a bound

    def allow(self, steps: list[StepKey], now: float) -> list[StepKey]:
        """The subset of ``steps`` (in order) to publish again now; marks them."""
        if now - self._interval_start >= REPAIR_INTERVAL_S:
            self._interval_start, self._interval_count = now, 0
        if len(self._recent) > _MAX_RECENT:
            self._recent = {k: t for k, t in self._recent.items() if now - t < self.again_s}
        out: list[StepKey] = []
        for key in steps:
            last = self._recent.get(key)
            if last is not None and now - last < self.again_s:
                continue
            if len(out) >= MAX_REPAIR_PER_REQUEST or (
                self._interval_count >= MAX_REPAIR_PER_INTERVAL
            ):
                self.refused += 1
                continue
            self._recent[key] = now
            self._interval_count += 1
            out.append(key)
        return out

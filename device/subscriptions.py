"""Which topics a device follows, and what a roster changed of them (the engine's
membership rules are in :mod:`fieldchat.device._membership`). Pure apart from a lock
(application threads follow conversations they create while the worker subscribes
what rosters bring); ``now`` comes in.

A member follows each conversation's roster and messages and its members' bundles;
a conversation whose roster chain is still pending only its roster (PROTOCOL.md §5.2);
a removed member stops reading the messages. A broker that learns membership from
rosters may refuse a SUBSCRIBE it receives before the roster: refused topics are asked
for again a second later while still wanted.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping, Sequence

from fieldchat.schemas import Topics

__all__ = [
    "RESUBSCRIBE_S",
    "Subscriptions",
    "changed",
    "conversation_topics",
    "no_local",
    "wanted_topics",
]

RESUBSCRIBE_S = 1.0  # a refused topic is asked for again this much later

Position = tuple[int, bool]  # a conversation's epoch (-1: roster chain pending), member


def conversation_topics(topics: Topics, cid: str, pids: Iterable[str], own: str) -> set[str]:
    """What a member of ``cid`` follows: its roster, its messages, the other members'
    bundles."""
    out = {topics.roster(cid), topics.msg(cid)}
    return out | {topics.bundle(p) for p in pids if p != own}


def wanted_topics(
    topics: Topics, own: str, conversations: Iterable[tuple[str, int, bool, Sequence[str]]]
) -> set[str]:
    """What a device follows at start, from its conversations ``(cid, epoch, member,
    members)``: its inbox, and what :func:`conversation_topics` says for each it is a
    member of (only the roster while its chain is pending, epoch -1)."""
    out = {topics.inbox(own)}
    for cid, epoch, member, members in conversations:
        if epoch < 0:
            out.add(topics.roster(cid))
        elif member:
            out |= conversation_topics(topics, cid, members, own)
    return out


def changed(before: Mapping[str, Position], after: Mapping[str, Position]) -> list[str]:
    """The conversations whose epoch or membership a roster changed."""
    return [cid for cid, position in after.items() if before.get(cid) != position]


def no_local(topics: Iterable[str]) -> list[str]:
    """The message topics among ``topics``: subscribed without our own echo."""
    return [t for t in topics if t.endswith("/msg")]


class Subscriptions:
    """The topics wanted, those to subscribe after the next outbox pump, and refused
    ones to ask for again."""

    def __init__(self, wanted: Iterable[str] = ()) -> None:
        self._lock = threading.Lock()
        self._wanted: set[str] = set(wanted)
        self._pending: set[str] = set()  # subscribed after the next outbox pump
        self._refused: dict[str, float] = {}  # topic -> when to subscribe again

    def add(self, topics: Iterable[str]) -> list[str]:
        """Want ``topics``; those not wanted before (to subscribe at once)."""
        with self._lock:
            new = [t for t in topics if t not in self._wanted]
            self._wanted.update(new)
        return new

    def follow(self, topics: Iterable[str]) -> None:
        """Want ``topics``, subscribed after the next outbox pump (once the roster that
        makes us a member has left)."""
        with self._lock:
            new = set(topics) - self._wanted
            self._wanted |= new
            self._pending |= new

    def remove(self, topics: Iterable[str]) -> None:
        with self._lock:
            self._wanted -= set(topics)

    def refused(self, topics: Iterable[str], now: float) -> None:
        """The broker refused ``topics``: ask again RESUBSCRIBE_S from now."""
        for topic in topics:
            self._refused[topic] = now + RESUBSCRIBE_S

    def forget_refusals(self) -> None:
        """A new connection: refusals of the last one no longer apply."""
        self._refused.clear()

    def wanted(self) -> frozenset[str]:
        """Every topic wanted now (read only)."""
        with self._lock:
            return frozenset(self._wanted)

    def connected(self) -> list[str]:
        """Everything wanted, to subscribe on a new connection (nothing pending)."""
        with self._lock:
            self._pending.clear()
            return sorted(self._wanted)

    def due(self, now: float) -> list[str]:
        """Topics to subscribe now: pending ones and refusals due that are still wanted."""
        with self._lock:
            due = {t for t, at in self._refused.items() if at <= now and t in self._wanted}
            pending = sorted(self._pending | due)
            self._pending.clear()
        for topic in due:
            del self._refused[topic]
        return pending

"""When a device asks its broker again for a roster it waits for (PROTOCOL.md §5.2).

A joining member learns a conversation from the delivery in its inbox, then
subscribes to the conversation's roster topic and gets the roster retained. A broker
cluster can miss that: NATS stores a retained message in its retained-message stream
and each node learns it from there a moment later, so a SUBSCRIBE on another node in
between gets neither the live PUBLISH (sent before the subscription existed) nor the
retained one (not known there yet) — seen under load in
``tests/cluster/test_nats_failover.py``, where the member then waited for ever.

A SUBSCRIBE to a filter the session holds already replaces the subscription and the
broker sends its retained messages again (MQTT 3.1.1 §3.8.4, MQTT 5 §3.8.4 with Retain
Handling 0), so asking again is one small packet. It is asked with backoff (5 s,
doubling to 80 s) and at most ``ATTEMPTS`` times per conversation and connection:
a delivery for a conversation nobody will ever retain a roster for (junk anyone can
publish to an inbox) costs a bounded number of SUBSCRIBEs. Reconnecting subscribes to
everything again anyway, so a new connection starts the count afresh.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["ATTEMPTS", "FIRST_S", "MAX_S", "RosterWait"]

FIRST_S = 5.0  # the first ask, this long after the wait was first seen
MAX_S = 80.0  # the longest pause between two asks
ATTEMPTS = 6  # per conversation and connection: 5 + 10 + 20 + 40 + 80 + 80 s


@dataclass(slots=True)
class _Ask:
    at: float  # the next ask is due then
    pause: float  # the pause after it
    left: int  # asks left on this connection


class RosterWait:
    """Which waiting conversations are due for another SUBSCRIBE to their roster topic
    (pure: the caller passes the clock and what waits)."""

    def __init__(self) -> None:
        self._asks: dict[str, _Ask] = {}

    def due(self, now: float, waiting: Iterable[str]) -> list[str]:
        """The conversations among ``waiting`` to ask for again now (sorted); those no
        longer waiting are forgotten."""
        waiting = set(waiting)
        for cid in [c for c in self._asks if c not in waiting]:
            del self._asks[cid]
        out: list[str] = []
        for cid in sorted(waiting):
            ask = self._asks.get(cid)
            if ask is None:
                self._asks[cid] = _Ask(now + FIRST_S, FIRST_S, ATTEMPTS)
            elif ask.left > 0 and now >= ask.at:
                ask.pause = min(ask.pause * 2, MAX_S)
                ask.at = now + ask.pause
                ask.left -= 1
                out.append(cid)
        return out

    def reconnected(self) -> None:
        """A new connection subscribed to every roster topic again: start afresh."""
        self._asks.clear()

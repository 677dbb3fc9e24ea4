"""Which MQTT protocol level a device's next CONNECT uses: 5, or 3.1.1 on a broker that
refuses 5 (``protocol="auto"``).

MQTT 5 is what a device wants: No Local keeps its own messages from coming back and
Topic Alias sends a conversation's topic once per connection (a low-bandwidth message
costs ≈ 107 bytes on the wire instead of ≈ 282 on 3.1.1: BENCHMARKS.md). So a fall
back to 3.1.1 must rest on evidence, and must not outlive it:

* CONNACK 0x84 "Unsupported Protocol Version" (a 3.1.1 broker's return code 1 reads
  the same; MQTT-3.1.2-2) is evidence: the next CONNECT, at once, is 3.1.1, and once
  it succeeds 3.1.1 is remembered (the state file's ``protocol`` meta, with the time).
* A connection that ends before any CONNACK (closed, or silent until the connect
  timeout) is how some 3.1.1 servers refuse 5, but also how a busy broker sheds a
  socket (the embedded broker evicts pending sockets under a flood) or a link drops.
  The next CONNECT, at once, is 3.1.1, for that connection only; 3.1.1 is remembered
  only after this happened on :data:`UNANSWERED_BEFORE_REMEMBERED` connections in a
  row with no MQTT 5 success between them. A single lost CONNACK used to switch the
  device to 3.1.1 for good.
* A remembered 3.1.1 is tried again as 5 once it is :data:`PROBE_AFTER_S` old (one
  refused CONNECT a day on a 3.1.1 broker), so a broker upgraded to 5 is used as 5.

Pure: the link tells it each connection's outcome; time is injected.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from typing import Literal

__all__ = ["PROBE_AFTER_S", "UNANSWERED_BEFORE_REMEMBERED", "AttemptOutcome", "ProtocolFallback"]

Level = Literal["5", "3.1.1"]

PROBE_AFTER_S = 24 * 3600.0
UNANSWERED_BEFORE_REMEMBERED = 2


class AttemptOutcome(enum.Enum):
    """How one connection attempt ended, as far as the protocol level goes."""

    CONNECTED = "connected"  # CONNACK 0
    REFUSED_LEVEL = "refused_level"  # CONNACK 0x84 (or 3.1.1's 1)
    UNANSWERED = "unanswered"  # reached the broker, no CONNACK (closed or timed out)
    OTHER = "other"  # unreachable, bad credentials, another refusal: says nothing of the level


class ProtocolFallback:
    """The protocol level for each CONNECT.

    Args:
        configured: ``"auto"``, or a level the device then always uses.
        remembered: what :attr:`remember` stored earlier (``"5"``, ``"3.1.1 <unix time>"``;
            a bare ``"3.1.1"`` from before the time was stored counts as old).
        remember: called with the value to store when what is remembered changes.
    """

    def __init__(
        self,
        configured: str,
        remembered: str | None = None,
        *,
        remember: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.auto = configured == "auto"
        self._remember = remember
        self._clock = clock
        self._level: Level = "3.1.1" if configured == "3.1.1" else "5"
        self._since: float | None = None  # when 3.1.1 was remembered
        self._fell_back: AttemptOutcome | None = None  # why this attempt is 3.1.1, if it is a try
        self._switched = False  # this attempt follows an immediate switch
        self._unanswered = 0  # 5 unanswered, then 3.1.1 worked: in a row
        self._stored = remembered
        if self.auto and remembered and remembered.split()[0] == "3.1.1":
            self._level = "3.1.1"
            parts = remembered.split()
            self._since = float(parts[1]) if len(parts) > 1 else 0.0

    def level(self) -> Level:
        """The level of the next CONNECT."""
        if (
            self._level == "3.1.1"
            and self._since is not None
            and self._fell_back is None
            and self._clock() - self._since >= PROBE_AFTER_S
        ):
            self._level = "5"  # probe: a refusal brings 3.1.1 back at once
        return self._level

    def after(self, outcome: AttemptOutcome) -> bool:
        """Record how the attempt at :meth:`level` ended; whether to try again at once
        (with the other level) rather than after the backoff."""
        if not self.auto:
            return False
        switched, self._switched = self._switched, False
        fell_back, self._fell_back = self._fell_back, None
        if outcome is AttemptOutcome.CONNECTED:
            self._connected(fell_back)
        elif outcome is AttemptOutcome.OTHER:
            if fell_back is AttemptOutcome.UNANSWERED:
                self._level = "5"  # the try told nothing; the next attempt is 5 again
        elif self._level == "5":
            if not switched:  # 3.1.1 next, at once
                self._level, self._fell_back, self._switched = "3.1.1", outcome, True
        else:
            # 3.1.1 refused or unanswered: maybe a broker that speaks only 5 now.
            self._level, self._since = "5", None
            self._switched = outcome is AttemptOutcome.REFUSED_LEVEL and not switched
        return self._switched

    def _connected(self, fell_back: AttemptOutcome | None) -> None:
        if self._level == "5":
            self._unanswered, self._since = 0, None
            self._store("5")
            return
        if fell_back is AttemptOutcome.UNANSWERED:
            self._unanswered += 1
            if self._unanswered < UNANSWERED_BEFORE_REMEMBERED:
                self._level = "5"  # this connection only: the next one tries 5 again
                return
        if fell_back is not None or self._since is None:
            self._since = self._clock()
            self._store(f"3.1.1 {self._since:.0f}")

    def _store(self, value: str) -> None:
        if value != self._stored:
            self._stored = value
            if self._remember is not None:
                self._remember(value)

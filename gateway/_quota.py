"""Refusals the gateway makes to protect what it shares: counted every time, logged
once per interval.

A quota refusal (a full pending store, too many held rosters, too many conversations
founded by one signer) is never silent: each one increments
``fieldchat_gateway_rejected_total{source,reason}``, and a warning names the reason,
how many were refused since the last warning and an example. A flood of refusals
writes one line per reason and interval, not one per message.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from fieldchat.gateway._metrics import GatewayMetrics, RejectSource

__all__ = ["REFUSAL_LOG_INTERVAL_S", "RefusalLog"]

log = logging.getLogger("fieldchat.gateway.quota")

REFUSAL_LOG_INTERVAL_S = 60.0


@dataclass
class _Since:
    count: int = 0
    logged_at: float | None = None


@dataclass
class RefusalLog:
    """Counts refusals and logs each reason at most once per ``interval_s``.

    Args:
        metrics: where the counter lives.
        interval_s: the shortest time between two warnings of one reason.
        clock: monotonic seconds (tests inject one).
    """

    metrics: GatewayMetrics
    interval_s: float = REFUSAL_LOG_INTERVAL_S
    clock: Callable[[], float] = time.monotonic
    _reasons: dict[str, _Since] = field(default_factory=dict)

    def refuse(self, reason: str, detail: str, *, source: RejectSource = RejectSource.MQTT) -> bool:
        """Count one refusal; True when it was logged (the first of its interval)."""
        self.metrics.reject(source, reason)
        since = self._reasons.setdefault(reason, _Since())
        since.count += 1
        now = self.clock()
        if since.logged_at is None:
            log.warning(
                "refused (%s): %s; further ones are logged at most every %.0f s",
                reason,
                detail,
                self.interval_s,
            )
        elif now - since.logged_at < self.interval_s:
            return False
        else:
            log.warning(
                "refused %d (%s) in the last %.0f s; the latest: %s",
                since.count,
                reason,
                now - since.logged_at,
                detail,
            )
        since.count = 0
        since.logged_at = now
        return True

"""The chaos schedule: which process is stopped when, how, and for how long.

Pure and seeded: the same seed, span and counts give the same schedule, so a run
that found something can be repeated (the outcome still depends on timing).
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass, replace
from enum import StrEnum

__all__ = ["BACK_S", "DOWN_S", "LEAD_S", "Event", "Kind", "schedule"]

# How long a stopped process stays down before it is started again, by role. Brokers
# and gateways: long enough for peers to notice (reconnects, backoff), short enough
# that a soak of a few minutes fits many events. Devices: up to longer than
# Mosquitto's 10 s autosave, so a broker killed while a device is away can lose what
# it queued for that device, as for a field device offline for a while; the soak
# goes on meanwhile (the next events do not wait for a device to come back).
DOWN_S = {"broker": (0.5, 3.0), "gateway": (0.5, 3.0), "device": (0.5, 15.0)}
# BROKER_SIGKILL_AWAY: the device goes LEAD_S before the broker is killed (what the
# others send meanwhile is queued for it, and lost if the broker loses its queue), and
# is back BACK_S after the broker serves again: before the senders publish again what
# was not receipted (`resend_after_s`, 5 s), so later messages reach it first.
LEAD_S = (2.0, 6.0)
BACK_S = (0.2, 2.0)


class Kind(StrEnum):
    """What an event does. ``…_sigkill``: SIGKILL; ``…_graceful``: SIGTERM (what
    systemd and `docker stop` send), then a restart either way."""

    BROKER_SIGKILL = "broker_sigkill"
    BROKER_GRACEFUL = "broker_graceful"
    GATEWAY_SIGKILL = "gateway_sigkill"
    DEVICE_SIGKILL = "device_sigkill"
    DEVICE_GRACEFUL = "device_graceful"
    # A device SIGKILLed, then the broker SIGKILLed while it is away (see LEAD_S).
    BROKER_SIGKILL_AWAY = "broker_sigkill_away"

    @property
    def role(self) -> str:
        """The kind of process it targets: ``broker``, ``gateway`` or ``device``."""
        return self.value.split("_", 1)[0]

    @property
    def graceful(self) -> bool:
        return self.value.endswith("_graceful")


@dataclass(frozen=True, slots=True)
class Event:
    """Stop ``target`` (an index among the processes of ``kind.role``) at ``at``
    seconds into the sending phase; start it again ``down_s`` later."""

    at: float
    kind: Kind
    target: int
    down_s: float
    device: int = -1  # BROKER_SIGKILL_AWAY: the device away, and when it goes and is back
    lead_s: float = 0.0
    back_s: float = 0.0


def schedule(
    seed: int,
    *,
    start_s: float,
    end_s: float,
    counts: dict[Kind, int],
    targets: dict[str, int],
    down_s: Mapping[str, tuple[float, float]] = DOWN_S,
) -> list[Event]:
    """Spread ``counts`` events over ``[start_s, end_s)``, in a seeded random order.

    Each event gets a slot of equal width and a random moment in its middle 60 %, so
    events neither bunch up nor fall on a regular beat; the kinds are shuffled, the
    targets drawn among ``targets[role]`` processes.

    Raises:
        ValueError: an event's role has no target, or the span is empty.
    """
    kinds = [kind for kind, n in sorted(counts.items()) for _ in range(n)]
    if not kinds:
        return []
    if end_s <= start_s:
        raise ValueError(f"empty chaos span [{start_s}, {end_s})")
    for kind in set(kinds):
        roles = {kind.role, "device"} if kind is Kind.BROKER_SIGKILL_AWAY else {kind.role}
        for role in roles:
            if targets.get(role, 0) < 1:
                raise ValueError(f"{kind} needs at least one {role}")
    rng = random.Random(seed)
    rng.shuffle(kinds)
    slot = (end_s - start_s) / len(kinds)
    events = []
    for i, kind in enumerate(kinds):
        at = start_s + slot * (i + 0.2 + 0.6 * rng.random())
        event = Event(
            at=round(at, 3),
            kind=kind,
            target=rng.randrange(targets[kind.role]),
            down_s=round(rng.uniform(*down_s[kind.role]), 3),
        )
        if kind is Kind.BROKER_SIGKILL_AWAY:
            event = replace(
                event,
                device=rng.randrange(targets["device"]),
                lead_s=round(rng.uniform(*LEAD_S), 3),
                back_s=round(rng.uniform(*BACK_S), 3),
            )
        events.append(event)
    return events

"""Other members' presence: which ``p/{pid}/status`` topics a device follows, and
what their retained status says (docs/device.md, "Presence").

A device publishes ``online`` (retained) on its own status topic when it connects and
leaves ``offline`` there: by a clean stop, or by its MQTT will when it vanishes. With
``LinkOptions.presence`` it follows the status topics of the members of the
conversations it is a member of (one concrete topic per pid, no wildcard: the ACLs
let every participant read any status, nothing more), kept in step with rosters, and
reports each change as one :class:`~fieldchat.device.events.PresenceChanged`.

The payload is another participant's bytes (web participants publish theirs through
a gateway): anything but ``online``/``offline`` is refused as
:class:`~fieldchat.schemas.errors.InvalidStatus` (counted ``rejected_status``), never
raised past the worker. Presence is not stored: a restarted device learns it again
from the retained statuses.
"""

from __future__ import annotations

from fieldchat.device.context import Part, Shared
from fieldchat.device.events import PresenceChanged
from fieldchat.schemas.errors import InvalidStatus

__all__ = [
    "FOLLOW_CHECK_S",
    "MAX_STATUS_BYTES",
    "STATUS_OFFLINE",
    "STATUS_ONLINE",
    "Presence",
    "parse_status",
]

STATUS_ONLINE = b"online"
STATUS_OFFLINE = b"offline"
MAX_STATUS_BYTES = 16  # longer is refused before it is compared
FOLLOW_CHECK_S = 1.0  # how often membership changes made by the application are caught


def parse_status(payload: bytes) -> bool:
    """Whether a status payload says online.

    Raises:
        InvalidStatus: longer than MAX_STATUS_BYTES, or another value.
    """
    if len(payload) > MAX_STATUS_BYTES:
        raise InvalidStatus(f"status of {len(payload)} bytes (at most {MAX_STATUS_BYTES})")
    if payload == STATUS_ONLINE:
        return True
    if payload == STATUS_OFFLINE:
        return False
    raise InvalidStatus("status is neither online nor offline")


class Presence(Part):
    """The pids followed and what was last learnt of each (worker thread only)."""

    def __init__(self, shared: Shared) -> None:
        super().__init__(shared)
        self._followed: set[str] = set()
        self._online: dict[str, bool] = {}
        self._next_check = 0.0

    @property
    def followed(self) -> frozenset[str]:
        return frozenset(self._followed)

    def online(self) -> dict[str, bool]:
        """What each followed pid's status said last (absent: not learnt yet)."""
        return dict(self._online)

    def _members(self) -> set[str]:
        """Every other member of the conversations we are a member of."""
        out: set[str] = set()
        for cid in self.engine.conversations():
            if self.engine.is_member(cid):
                out.update(self.engine.roster(cid).pids)
        out.discard(self.pid)
        return out

    def update(self) -> tuple[list[str], list[str]]:
        """Follow the current members (nobody when the option is off): the status topics
        to subscribe and to unsubscribe. A pid no longer followed is forgotten, so a
        member added again is reported afresh."""
        wanted = self._members() if self.options.presence else set()
        added, dropped = wanted - self._followed, self._followed - wanted
        for pid in dropped:
            self._online.pop(pid, None)
        self._followed = wanted
        return (
            sorted(self.topics.status(p) for p in added),
            sorted(self.topics.status(p) for p in dropped),
        )

    def due(self, now: float) -> bool:
        """Whether the periodic membership check is due (it then waits FOLLOW_CHECK_S)."""
        if now < self._next_check:
            return False
        self._next_check = now + FOLLOW_CHECK_S
        return True

    def on_status(self, pid: str, payload: bytes, now: float) -> PresenceChanged | None:
        """A status arrived: the change it makes, if any (a repeat, our own or that of
        a pid not followed: none).

        Raises:
            InvalidStatus: a payload that is not a status.
        """
        if pid not in self._followed:
            self.counters["presence_not_followed"] += 1
            return None
        online = parse_status(payload)
        if self._online.get(pid) == online:
            return None
        self._online[pid] = online
        self.counters["presence_changes"] += 1
        return PresenceChanged(pid, online, int(now))

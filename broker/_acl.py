"""Who may publish, subscribe and receive what (DESIGN.md, topic table).

Participants (username = pid):

=========================  =================  ==================  ===================
topic                      publish            subscribe           receive
=========================  =================  ==================  ===================
``p/{pid}/bundle|status``  own pid only,      any pid (no ``+``)  yes
                           not empty
``p/{pid}/inbox``          any pid, not       own pid only        own pid only
                           retained
``c/{cid}/roster``         listed, and the    member              member
                           roster must chain
``c/{cid}/propose``        listed, and the    no (gateways only)  gateways only
                           roster must chain;
                           not retained
``c/{cid}/msg``            member, not        member              member
                           retained
anything else, ``$…``,     no (disconnect)    no                  no
wildcards
=========================  =================  ==================  ===================

"Listed": in the new roster or in the current one. An accepted proposal is adopted
and retained on ``c/{cid}/roster`` by the broker itself (``Router.retain_roster``),
as if it had been published there retained; the proposal is only relayed to
gateways. Nothing retained on inbox, msg or propose topics (they never hold state; a
retained publish there can only be a bug or an attack: disconnect), and no empty
payload on bundle, status, roster or propose topics (it would erase a key bundle or
a conversation). A bundle or status above its size limit is refused.

Gateways (username ``gw-<name>``) act for web participants, whose own access the
gateway checks: they may publish to every fieldchat topic (rosters must still chain,
nothing retained where participants may not retain) and subscribe to concrete
fieldchat topics, to the wildcard filters ``{prefix}/c/+/msg``, ``c/+/roster``,
``c/+/propose``, ``p/+/bundle``, ``p/+/status``, ``p/+/inbox``, and to the same under
``$share/<group>/`` so replicas split the archive work.

Membership of ``cid`` = (pids of the current roster, plus ``allow`` overrides) minus
``deny`` overrides. Receive is checked again at every delivery (live, queued and
retained), so a member removed by a newer roster or ``deny`` stops receiving at
once, even through subscriptions made while it was a member.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field

from fieldchat.broker._store import Role
from fieldchat.schemas.errors import FieldchatError, InvalidId
from fieldchat.schemas.roster import Roster, verify_roster_chain
from fieldchat.schemas.topics import Topic, TopicKind, Topics

__all__ = ["Deny", "Membership", "Principal", "Rules", "gateway_filters"]


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated client of the broker: its account's username (also its client
    id) and role. Not a participant's keys (that is ``fieldchat.device.Identity``): the broker
    never holds keys."""

    username: str
    role: Role

    @property
    def is_gateway(self) -> bool:
        return self.role == "gateway"


class Deny(enum.StrEnum):
    """Why a publish or subscription was refused; the label of the denial counter.

    ``FORBIDDEN``, ``NOT_OWNER`` and ``RETAINED`` can only be bugs or attacks (the
    publisher is disconnected); ``NOT_MEMBER`` and ``ROSTER`` can be races with a
    roster change. The others are acknowledged and dropped: a disconnect would make a
    device resend them from its outbox forever.
    """

    FORBIDDEN = "forbidden_topic"
    NOT_OWNER = "not_owner"
    NOT_MEMBER = "not_member"
    ROSTER = "roster"
    TOO_MANY = "too_many_subscriptions"
    RETAINED = "retained"
    EMPTY = "empty_payload"
    TOO_LARGE = "payload_size"
    FOUNDING = "founding_quota"

    @property
    def is_race(self) -> bool:
        return self in (Deny.NOT_MEMBER, Deny.ROSTER)

    @property
    def disconnects(self) -> bool:
        return self in (Deny.FORBIDDEN, Deny.NOT_OWNER, Deny.RETAINED)


@dataclass
class Membership:
    """Conversation membership: signed rosters plus admin overrides."""

    rosters: dict[str, Roster] = field(default_factory=dict)
    allowed: dict[str, set[str]] = field(default_factory=dict)
    denied: dict[str, set[str]] = field(default_factory=dict)
    _members: dict[str, frozenset[str]] = field(default_factory=dict)

    @classmethod
    def build(
        cls, rosters: dict[str, Roster], overrides: Iterable[tuple[str, str, bool]]
    ) -> Membership:
        membership = cls(rosters=dict(rosters))
        for pid, cid, allow in overrides:
            (membership.allowed if allow else membership.denied).setdefault(cid, set()).add(pid)
        membership._members = {cid: membership._compute(cid) for cid in membership.cids()}
        return membership

    def cids(self) -> set[str]:
        return set(self.rosters) | set(self.allowed) | set(self.denied)

    def _compute(self, cid: str) -> frozenset[str]:
        roster = self.rosters.get(cid)
        pids = set(roster.pids) if roster else set()
        return frozenset((pids | self.allowed.get(cid, set())) - self.denied.get(cid, set()))

    def members(self, cid: str) -> frozenset[str]:
        return self._members.get(cid, frozenset())

    def is_member(self, pid: str, cid: str) -> bool:
        return pid in self._members.get(cid, ())

    def check_roster(self, data: bytes, cid: str) -> Roster | None:
        """Validate a roster published on ``c/{cid}/roster``.

        Returns the roster when it advances the conversation, ``None`` when it is
        the current roster again (an idempotent republish).

        Raises:
            FieldchatError: malformed, bad signature, another cid, stale, forked or
                not signed by an admin of the previous epoch.
        """
        roster = Roster.from_bytes(data)
        if roster.cid != cid:
            raise InvalidId("roster published on another conversation's topic")
        current = self.rosters.get(cid)
        if current is not None and roster.to_bytes() == current.to_bytes():
            return None
        verify_roster_chain(roster, current)
        return roster

    def adopt(self, roster: Roster) -> frozenset[str]:
        """Make ``roster`` current; return the pids that lost membership."""
        before = self.members(roster.cid)
        self.rosters[roster.cid] = roster
        self._members[roster.cid] = self._compute(roster.cid)
        return before - self._members[roster.cid]

    def set_overrides(self, overrides: Iterable[tuple[str, str, bool]]) -> dict[str, set[str]]:
        """Replace the overrides; return ``{cid: pids that lost membership}``."""
        before = dict(self._members)
        self.allowed, self.denied = {}, {}
        for pid, cid, allow in overrides:
            (self.allowed if allow else self.denied).setdefault(cid, set()).add(pid)
        self._members = {cid: self._compute(cid) for cid in self.cids()}
        lost = {}
        for cid, pids in before.items():
            gone = pids - self._members.get(cid, frozenset())
            if gone:
                lost[cid] = set(gone)
        return lost


def gateway_filters(topics: Topics) -> frozenset[str]:
    """The wildcard filters a gateway may subscribe to (also under ``$share/<g>/``)."""
    return frozenset(
        {
            topics.all_msgs(),
            topics.all_rosters(),
            topics.all_proposals(),
            topics.all_bundles(),
            topics.all_statuses(),
            f"{topics.prefix}/p/+/inbox",
        }
    )


_NEVER_RETAINED = frozenset({TopicKind.INBOX, TopicKind.MSG, TopicKind.PROPOSE})
_ROSTER_KINDS = frozenset({TopicKind.ROSTER, TopicKind.PROPOSE})


class Rules:
    """The ACL of the table above, over a :class:`Membership` view.

    ``max_bundle_bytes`` and ``max_status_bytes``: :class:`~broker._config.Limits`.
    """

    def __init__(
        self,
        topics: Topics,
        membership: Membership,
        *,
        max_bundle_bytes: int = 16 * 1024,
        max_status_bytes: int = 1024,
    ) -> None:
        self.topics = topics
        self.membership = membership
        self._gateway_filters = gateway_filters(topics)
        self._max_size = {TopicKind.BUNDLE: max_bundle_bytes, TopicKind.STATUS: max_status_bytes}

    def parse(self, topic: str) -> Topic | None:
        try:
            return self.topics.parse(topic)
        except InvalidId:
            return None

    def publish(
        self, who: Principal, topic: str, payload: bytes, *, retain: bool = False
    ) -> tuple[Deny | None, Roster | None]:
        """Check a PUBLISH; return ``(denial or None, roster to adopt or None)``."""
        parsed = self.parse(topic)
        if parsed is None:
            return Deny.FORBIDDEN, None
        kind = parsed.kind
        if retain and kind in _NEVER_RETAINED:
            return Deny.RETAINED, None
        if kind in _ROSTER_KINDS:
            return self._roster(who, parsed, payload)
        if kind in (TopicKind.BUNDLE, TopicKind.STATUS):
            return self._own(who, parsed, payload), None
        if who.is_gateway or kind is TopicKind.INBOX:
            return None, None
        assert parsed.cid is not None
        ok = self.membership.is_member(who.username, parsed.cid)
        return (None if ok else Deny.NOT_MEMBER), None

    def _own(self, who: Principal, parsed: Topic, payload: bytes) -> Deny | None:
        """A bundle or status: its owner's (or a gateway's), not empty, not too large."""
        if not who.is_gateway:
            if parsed.pid != who.username:
                return Deny.NOT_OWNER
            if not payload:  # a key bundle or presence is never cleared by its owner
                return Deny.EMPTY
        return Deny.TOO_LARGE if len(payload) > self._max_size[parsed.kind] else None

    def will(self, who: Principal, topic: str, payload: bytes, *, retain: bool) -> Deny | None:
        """Check a will, at CONNECT and again when it is published.

        A will never changes a roster (it would be published unverified, later, after
        the membership it was checked against may have changed).
        """
        parsed = self.parse(topic)
        if parsed is not None and parsed.kind in _ROSTER_KINDS:
            return Deny.FORBIDDEN
        return self.publish(who, topic, payload, retain=retain)[0]

    def _roster(
        self, who: Principal, parsed: Topic, payload: bytes
    ) -> tuple[Deny | None, Roster | None]:
        assert parsed.cid is not None
        if not payload:  # a roster is never cleared: that would erase the conversation
            return Deny.ROSTER, None
        try:
            roster = self.membership.check_roster(payload, parsed.cid)
        except FieldchatError:
            return Deny.ROSTER, None
        if who.is_gateway:
            return None, roster
        current = self.membership.rosters.get(parsed.cid)
        listed = (roster is not None and who.username in roster.pids) or (
            current is not None and who.username in current.pids
        )
        if not listed and not self.membership.is_member(who.username, parsed.cid):
            return Deny.NOT_MEMBER, None
        return None, roster

    def subscribe(self, who: Principal, topic_filter: str) -> Deny | None:
        """Check one SUBSCRIBE filter."""
        if who.is_gateway:
            if topic_filter.startswith("$share/"):
                parts = topic_filter.split("/", 2)
                if len(parts) != 3 or not parts[1] or "+" in parts[1] or "#" in parts[1]:
                    return Deny.FORBIDDEN
                topic_filter = parts[2]
            if topic_filter in self._gateway_filters:
                return None
        parsed = None if "+" in topic_filter or "#" in topic_filter else self.parse(topic_filter)
        if parsed is None:
            return Deny.FORBIDDEN
        if who.is_gateway:
            return None
        if parsed.kind is TopicKind.PROPOSE:
            return Deny.FORBIDDEN  # proposals are for the verifiers
        return (
            None
            if self.receive(who, parsed)
            else (Deny.NOT_MEMBER if parsed.cid is not None else Deny.NOT_OWNER)
        )

    def receive(self, who: Principal, parsed: Topic) -> bool:
        """May ``who`` be sent a message on this (parsed) topic now?"""
        if who.is_gateway:
            return True
        if parsed.kind is TopicKind.PROPOSE:
            return False
        if parsed.cid is not None:
            return self.membership.is_member(who.username, parsed.cid)
        if parsed.kind is TopicKind.INBOX:
            return parsed.pid == who.username
        return True

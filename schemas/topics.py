"""MQTT topic names of DESIGN.md and their parsing.

    {prefix}/p/{pid}/bundle   retained  signed public key bundle
    {prefix}/p/{pid}/status   retained  presence (the will message sets it offline)
    {prefix}/p/{pid}/inbox              key grants and invitations addressed to pid
    {prefix}/c/{cid}/roster   retained  signed membership list with its epoch
    {prefix}/c/{cid}/propose            a roster submitted by its admin (below)
    {prefix}/c/{cid}/msg                encrypted envelopes of the conversation

Members never write the retained roster themselves: they publish a new roster on
``c/{cid}/propose``, and a component that verifies chains (the embedded broker, or
the gateway on brokers that cannot read rosters: Mosquitto, NATS) republishes it,
retained, on ``c/{cid}/roster`` once it chains to epoch 0. So on every broker only a
verifier can replace or erase the roster that joiners trust (docs/security.md).

The prefix is configurable (default ``fc/v1``) so that several deployments or test
runs can share one broker without seeing each other.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from fieldchat.schemas.errors import InvalidId
from fieldchat.schemas.ids import validate_id

__all__ = ["DEFAULT_PREFIX", "Topic", "TopicKind", "Topics"]

DEFAULT_PREFIX = "fc/v1"
_PREFIX_RE = re.compile(r"[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*")


class TopicKind(enum.StrEnum):
    """The last level of a fieldchat topic."""

    BUNDLE = "bundle"
    STATUS = "status"
    INBOX = "inbox"
    ROSTER = "roster"
    PROPOSE = "propose"
    MSG = "msg"


_PARTICIPANT_KINDS = frozenset({TopicKind.BUNDLE, TopicKind.STATUS, TopicKind.INBOX})
_CONVERSATION_KINDS = frozenset({TopicKind.ROSTER, TopicKind.PROPOSE, TopicKind.MSG})


@dataclass(frozen=True, slots=True)
class Topic:
    """A parsed topic: ``pid`` is set for ``p/…`` topics, ``cid`` for ``c/…`` topics."""

    kind: TopicKind
    pid: str | None = None
    cid: str | None = None


@dataclass(frozen=True, slots=True)
class Topics:
    """Builds and parses the topics under one prefix.

    Raises:
        InvalidId: from the constructor when the prefix has wildcards, ``$`` or empty levels.
    """

    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        if not _PREFIX_RE.fullmatch(self.prefix):
            raise InvalidId(f"invalid topic prefix {self.prefix[:60]!r}")

    def bundle(self, pid: str) -> str:
        return f"{self.prefix}/p/{validate_id(pid, 'pid')}/bundle"

    def status(self, pid: str) -> str:
        return f"{self.prefix}/p/{validate_id(pid, 'pid')}/status"

    def inbox(self, pid: str) -> str:
        return f"{self.prefix}/p/{validate_id(pid, 'pid')}/inbox"

    def roster(self, cid: str) -> str:
        return f"{self.prefix}/c/{validate_id(cid, 'cid')}/roster"

    def propose(self, cid: str) -> str:
        """Where an admin submits a new roster of ``cid`` for verification."""
        return f"{self.prefix}/c/{validate_id(cid, 'cid')}/propose"

    def msg(self, cid: str) -> str:
        return f"{self.prefix}/c/{validate_id(cid, 'cid')}/msg"

    def all_bundles(self) -> str:
        """Subscription filter for every bundle (gateway role)."""
        return f"{self.prefix}/p/+/bundle"

    def all_statuses(self) -> str:
        return f"{self.prefix}/p/+/status"

    def all_rosters(self) -> str:
        return f"{self.prefix}/c/+/roster"

    def all_proposals(self) -> str:
        return f"{self.prefix}/c/+/propose"

    def all_msgs(self) -> str:
        return f"{self.prefix}/c/+/msg"

    def parse(self, topic: str) -> Topic:
        """Parse a concrete topic name (no wildcards).

        Raises:
            InvalidId: not a fieldchat topic under this prefix, or a bad pid/cid.
        """
        head = self.prefix + "/"
        if not topic.startswith(head):
            raise InvalidId(f"topic {topic[:80]!r} is not under {self.prefix!r}")
        parts = topic[len(head) :].split("/")
        if len(parts) != 3:
            raise InvalidId(f"topic {topic[:80]!r} does not have the form p|c/id/kind")
        scope, ident, last = parts
        try:
            kind = TopicKind(last)
        except ValueError:
            raise InvalidId(f"unknown topic kind {last[:20]!r}") from None
        if scope == "p" and kind in _PARTICIPANT_KINDS:
            return Topic(kind, pid=validate_id(ident, "pid"))
        if scope == "c" and kind in _CONVERSATION_KINDS:
            return Topic(kind, cid=validate_id(ident, "cid"))
        raise InvalidId(f"topic {topic[:80]!r} mixes scope {scope[:4]!r} and kind {last!r}")

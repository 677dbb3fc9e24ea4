"""Who may log in, publish, subscribe and receive, as the running broker knows it.

Accounts (from the store), conversation membership (signed rosters plus admin
overrides, :class:`~broker._acl.Membership`), the rules over them
(:class:`~broker._acl.Rules`), the founding quota and the per-participant rates.
No sessions and no sockets: :class:`~broker._router.Router` acts on what
:meth:`Access.reload` and :meth:`Access.adopt` report.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import NamedTuple

from fieldchat.broker._acl import Deny, Membership, Principal, Rules
from fieldchat.broker._config import BrokerConfig
from fieldchat.broker._quota import FoundingQuota, Throttle
from fieldchat.broker._store import Account, Store
from fieldchat.schemas.roster import Roster
from fieldchat.schemas.topics import Topic, Topics

__all__ = ["Access", "Changes"]

log = logging.getLogger("broker")

_PARSE_CACHE_MAX = 65_536


class Changes(NamedTuple):
    """What admin commands changed since the last look (:meth:`Access.reload`).

    ``accounts``: usernames revoked or given a new credential (their connections
    close; a revoked one's session goes); ``memberships``: by conversation, the pids
    an override took out.
    """

    accounts: set[str]
    memberships: dict[str, set[str]]


class Access:
    """The broker's access state; used only on the event loop."""

    def __init__(self, config: BrokerConfig, clock: Callable[[], float]) -> None:
        self.limits = limits = config.limits
        self.topics = Topics(config.prefix)
        self.clock = clock
        self.accounts: dict[str, Account] = {}
        self.membership = Membership()
        self.rules = self._rules()
        self.founding = FoundingQuota(limits.max_founded, limits.founding_window_s)
        self.throttles: dict[str, Throttle] = {}
        self._parsed: dict[str, Topic | None] = {}
        self._data_version = -1

    def _rules(self) -> Rules:
        return Rules(
            self.topics,
            self.membership,
            max_bundle_bytes=self.limits.max_bundle_bytes,
            max_status_bytes=self.limits.max_status_bytes,
        )

    def load(self, store: Store) -> None:
        """Accounts, memberships and the founding window as stored."""
        self.accounts = store.accounts()
        self.membership = Membership.build(store.rosters(), store.overrides())
        self.rules = self._rules()
        now = self.clock()
        self.founding.load(store.founded(now - self.limits.founding_window_s), now)
        self._data_version = store.data_version()

    def reload(self, store: Store) -> Changes | None:
        """Take in what admin commands (any process) changed; None: nothing did (one
        PRAGMA)."""
        version = store.data_version()
        if version == self._data_version:
            return None
        self._data_version = version
        accounts = store.accounts()
        changed = {
            u for u, a in self.accounts.items() if u not in accounts or accounts[u].hash != a.hash
        }
        self.accounts = accounts
        return Changes(changed, self.membership.set_overrides(store.overrides()))

    def parse(self, topic: str) -> Topic | None:
        """:meth:`Rules.parse`, cached (a broker sees the same few topics again and again)."""
        try:
            return self._parsed[topic]
        except KeyError:
            if len(self._parsed) >= _PARSE_CACHE_MAX:
                self._parsed.clear()
            parsed = self._parsed[topic] = self.rules.parse(topic)
            return parsed

    def may_receive(self, who: Principal, topic: str) -> bool:
        parsed = self.parse(topic)
        return parsed is not None and self.rules.receive(who, parsed)

    def authorize(
        self, who: Principal, topic: str, payload: bytes, *, retain: bool
    ) -> tuple[Deny | None, Roster | None]:
        """:meth:`Rules.publish`, then the founding quota of a new conversation."""
        denial, roster = self.rules.publish(who, topic, payload, retain=retain)
        if (
            roster is not None
            and roster.epoch == 0
            and not self.founding.allows(roster.signer, self.clock())
        ):
            log.warning(
                "%s founded %d conversations in %.0f s: %s refused",
                roster.signer,
                self.limits.max_founded,
                self.limits.founding_window_s,
                roster.cid,
            )
            return Deny.FOUNDING, None
        return denial, roster

    def adopt(self, roster: Roster, now: float) -> frozenset[str]:
        """Make ``roster`` its conversation's current one (counting a founding);
        return the pids it took out."""
        lost = self.membership.adopt(roster)
        if roster.epoch == 0:
            self.founding.record(roster.signer, now)
        log.info("conversation %s: roster epoch %d adopted", roster.cid, roster.epoch)
        return lost

    def throttle(self, who: Principal) -> Throttle | None:
        """The outbound quota of ``who`` (kept across its connections); none for gateways."""
        limits = self.limits
        if who.is_gateway or not (limits.rate_messages_per_s or limits.rate_bytes_per_s):
            return None
        throttle = self.throttles.get(who.username)
        if throttle is None:
            throttle = self.throttles[who.username] = Throttle(
                time.monotonic(),
                messages_per_s=limits.rate_messages_per_s,
                messages_burst=limits.rate_messages_burst,
                bytes_per_s=limits.rate_bytes_per_s,
                bytes_burst=limits.rate_bytes_burst,
            )
        return throttle

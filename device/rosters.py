"""Rosters, grants and bundles as they arrive (PROTOCOL.md §5, §6), on the worker,
inside its transaction: the engine verifies and adopts them; this applies what that
changed for the device (subscriptions, events, grants owed, resends to new members).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from fieldchat.device.context import Batch, Part, Shared
from fieldchat.device.engine import BundleStatus, Opened
from fieldchat.device.events import Joined, KeyChanged, Removed
from fieldchat.device.resend import Resends
from fieldchat.device.state import StateTransaction
from fieldchat.device.subscriptions import changed, conversation_topics
from fieldchat.schemas import Grant
from fieldchat.schemas.delivery import is_delivery
from fieldchat.schemas.errors import RosterPending, UnknownConversation

__all__ = ["RosterHandler"]

log = logging.getLogger("fieldchat.device")


class RosterHandler(Part):
    """Applies rosters, grants, bundles and leaves.

    Args:
        shared: the device's state, engine and options.
        resends: where a new member's resend is planned (after its grant).
        fetch_rosters: asks the history source for rosters a chain waits for.
    """

    def __init__(
        self, shared: Shared, resends: Resends, fetch_rosters: Callable[[str, int], None]
    ) -> None:
        super().__init__(shared)
        self.resends = resends
        self._fetch_rosters = fetch_rosters
        self._heard: set[tuple[str, int, str]] = set()  # (cid, epoch, sender) seen

    def on_roster(self, tx: StateTransaction, payload: bytes, batch: Batch) -> None:
        """A roster (retained, proposed, from an inviting admin or the archive).

        Raises:
            FieldchatError: it does not verify (counted by the caller).
        """
        before = self._positions()
        try:
            pubs = self.engine.handle_roster(payload)
        except RosterPending as exc:
            # Trusted for nothing until its chain is verified (PROTOCOL.md §5.2): the
            # missing rosters come from the gateway, the inviting admin (inbox) or the
            # retained roster; nothing is granted meanwhile.
            self.counters["roster_pending"] += 1
            batch.subscribe.add(self.topics.roster(exc.cid))
            self._fetch_rosters(exc.cid, exc.have)
            return
        self.queue_publications(tx, pubs, None)
        for cid in changed(before, self._positions()):
            self._membership(cid, batch)
        batch.retry_held = True

    def _positions(self) -> dict[str, tuple[int, bool]]:
        """Each conversation's epoch (-1: its roster chain pending) and membership."""
        out = {}
        for cid in self.engine.conversations():
            try:
                out[cid] = (self.engine.roster(cid).epoch, self.engine.is_member(cid))
            except UnknownConversation:
                out[cid] = (-1, False)
        return out

    def _membership(self, cid: str, batch: Batch) -> None:
        try:
            roster = self.engine.roster(cid)
        except UnknownConversation:
            return
        if self.engine.is_member(cid):
            batch.subscribe |= conversation_topics(self.topics, cid, roster.pids, self.pid)
            batch.events.append(Joined(cid, roster.epoch, roster.pids))
            batch.joined = True
        else:
            batch.unsubscribe.add(self.topics.msg(cid))
            batch.events.append(Removed(cid, roster.epoch))

    def on_grant(
        self,
        tx: StateTransaction,
        payload: bytes,
        batch: Batch,
    ) -> None:
        """A grant in our inbox: a member's chain keys or chain ends."""
        result = self.engine.handle_grant(payload)
        self.queue_publications(tx, list(result.publications), result.cid)  # ENDS (§6.5)
        if result.needs_roster:
            batch.subscribe.add(self.topics.roster(result.cid))
        if result.ends:
            batch.retry_held = True  # envelopes that waited for these chain ends
        if result.installed and is_delivery(payload):
            batch.retry_held = True  # the epoch is keyed: what waited for it opens
        elif result.installed:
            batch.retry_held = True
            self._listening(result.cid, Grant.from_bytes(payload).granter)

    def heard(self, opened: Opened) -> None:
        """An envelope of ``opened.sender`` opened: the first one of an epoch tells us
        it is subscribed (its SUBSCRIBE precedes its envelopes on one connection)."""
        key = (opened.cid, opened.epoch, opened.sender)
        if key not in self._heard and opened.sender != self.pid:
            self._heard.add(key)
            self._listening(opened.cid, opened.sender, self.engine.sending_step(opened.cid))

    def _listening(self, cid: str, pid: str, upto: int | None = None) -> None:
        """``pid`` listens to ``cid`` now: what we sent in this epoch before it did is
        published again — once its receipts for what did reach it have had time to come
        back (GRANT_RESEND_RECEIPTS intervals), so a burst sent while its key was on the
        way is not sent twice."""
        self.resends.granted(cid, pid, self._clock(), self.options.receipt_interval_s, upto)

    def on_bundle(self, tx: StateTransaction, payload: bytes, batch: Batch) -> None:
        """A participant's bundle (retained): new, changed keys (loud), or updated;
        grants owed to it can be paid now."""
        update = self.engine.learn_bundle(payload)
        if update.status is BundleStatus.KEY_CHANGED:
            self.counters["key_changed"] += 1
            log.warning(
                "KEY CHANGED for %s: was %s, now %s — verify with `fieldchat device verify %s`",
                update.pid,
                update.previous_fingerprint,
                update.fingerprint,
                update.pid,
            )
            batch.events.append(
                KeyChanged(update.pid, update.previous_fingerprint, update.fingerprint)
            )
        if update.status in (BundleStatus.NEW, BundleStatus.KEY_CHANGED, BundleStatus.UPDATED):
            self.queue_publications(tx, self.engine.pay_owed_grants(), None)
            # An UPDATE waits for the bundle with the prekey it names (§6.7).
            self.queue_publications(tx, self.engine.answer_updates(), None)

    def on_epoch_request(self, tx: StateTransaction) -> None:
        """An UPDATE or REKEY control arrived: as an admin, answer what we can now."""
        self.queue_publications(tx, self.engine.answer_updates(), None)

    def on_leave(self, tx: StateTransaction, opened: Opened) -> None:
        """A member leaves: the first other admin removes it in a new epoch."""
        roster = self.engine.roster(opened.cid)
        if opened.sender not in roster.pids:
            return
        acting = [m.pid for m in roster.members if m.admin and m.pid != opened.sender]
        if acting and acting[0] == self.pid:
            pubs = self.engine.remove_members(opened.cid, [opened.sender])
            self.queue_publications(tx, pubs, opened.cid)

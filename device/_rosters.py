"""Adopting rosters only through verified chains (PROTOCOL.md §5.2).

A roster is adopted from epoch 0 when joining and from the newest adopted roster when
catching up; one that does not chain yet waits in a bounded pool
(:class:`~fieldchat.schemas.errors.RosterPending`) and is adopted once the epochs
between arrive, in any order. Every roster of a conversation is kept (each at most a
few kilobytes); KEEP_EPOCHS bounds what opening needs. What entering a new epoch
means (grants, chains) is :mod:`fieldchat.device._keying`'s.
"""

from __future__ import annotations

from collections import Counter

from fieldchat.device._conversation import Conversation, Conversations
from fieldchat.device._records import Writes, candidate_key, roster_key
from fieldchat.device.keystore import KeyStore
from fieldchat.schemas import Roster, verify_roster_chain
from fieldchat.schemas.errors import RosterPending, RosterRejected

__all__ = ["MAX_ROSTER_CANDIDATES", "RosterChains"]

# Rosters held per conversation until the epochs between arrive (§5.2): the pool
# holds only those that overtook others (in-order ones are adopted at once); past
# it the oldest held is dropped (counted ``roster_pool_evicted``; the gateway or the
# retained roster brings it again).
MAX_ROSTER_CANDIDATES = 64


class RosterChains:
    """The verified roster chain of every conversation, and the rosters waiting to join it."""

    def __init__(
        self, conversations: Conversations, store: KeyStore, counters: Counter[str]
    ) -> None:
        self._conversations = conversations
        self._store = store
        self._counters = counters

    def receive(self, data: bytes) -> Conversation | None:
        """Take a roster; the conversation whose chain grew (its new tip may be an
        epoch to enter), ``None`` for one adopted already.

        Raises:
            WireError, CryptoError: malformed or badly signed.
            RosterRejected: does not follow the adopted chain (forged, stale, bad signer).
            RosterPending: held until the rosters between arrive: fetch them.
        """
        roster = Roster.from_bytes(data)
        conv = self._conversations.get(roster.cid)
        fresh = conv is None
        if conv is None:
            conv = self._conversations.joining(roster.cid)
        try:
            return self._take(conv, roster)
        except RosterRejected:
            if fresh:
                del self._conversations.by_cid[roster.cid]
            raise

    def awaiting(self) -> dict[str, int]:
        """cid -> the newest epoch of the verified chain, of conversations holding
        rosters that wait for missing epochs, or deliveries and grants that wait for
        their epoch's roster (-1: none yet, epoch 0 is missing)."""
        return {
            cid: conv.tip
            for cid, conv in self._conversations.by_cid.items()
            if conv.candidates or conv.held_grants
        }

    def adopt(self, conv: Conversation, roster: Roster) -> None:
        """Record a roster whose chain was verified (it becomes the tip)."""
        conv.rosters[roster.epoch] = roster
        conv.tip = roster.epoch
        conv.keep(roster)
        self._store.save({roster_key(conv.cid, roster.epoch): roster.to_bytes()})

    def _take(self, conv: Conversation, roster: Roster) -> Conversation | None:
        known = conv.rosters.get(roster.epoch)
        if known is not None:
            if known.digest() == roster.digest():
                self._counters["duplicate"] += 1
                return None
            raise RosterRejected(f"another roster of epoch {roster.epoch} is adopted")
        if roster.epoch <= conv.tip:
            raise RosterRejected(f"roster epoch {roster.epoch} is older than those kept")
        if roster.epoch != conv.tip + 1:
            self._hold(conv, roster)
            raise RosterPending(
                f"roster epoch {roster.epoch} of {roster.cid} waits for the epochs "
                f"after {conv.tip}",
                cid=roster.cid,
                have=conv.tip,
                want=roster.epoch,
            )
        verify_roster_chain(roster, conv.rosters.get(conv.tip))
        self.adopt(conv, roster)
        self._adopt_candidates(conv)
        return conv

    def _hold(self, conv: Conversation, roster: Roster) -> None:
        digest = roster.digest()
        if digest in conv.candidates:
            self._counters["duplicate"] += 1
            return
        writes: Writes = {candidate_key(conv.cid, digest): roster.to_bytes()}
        if len(conv.candidates) >= MAX_ROSTER_CANDIDATES:
            oldest = next(iter(conv.candidates))
            del conv.candidates[oldest]
            writes[candidate_key(conv.cid, oldest)] = None
            self._counters["roster_pool_evicted"] += 1
        conv.candidates[digest] = roster
        self._store.save(writes)

    def _adopt_candidates(self, conv: Conversation) -> None:
        """Adopt held rosters that now chain, epoch after epoch; drop those left behind.

        At most MAX_ROSTER_CANDIDATES chain checks per epoch adopted (digests come from
        the pool's keys): bounded work for rosters nobody has authenticated yet.
        """
        while conv.candidates:
            writes: Writes = {}
            for digest in [d for d, r in conv.candidates.items() if r.epoch <= conv.tip]:
                del conv.candidates[digest]  # behind the chain: another roster won
                writes[candidate_key(conv.cid, digest)] = None
            successors = {r.prev for r in conv.candidates.values() if r.epoch == conv.tip + 2}
            nxt = sorted(
                ((d, r) for d, r in conv.candidates.items() if r.epoch == conv.tip + 1),
                key=lambda item: item[0] not in successors,  # one a later roster extends first
            )
            tip = conv.rosters.get(conv.tip)
            chosen = None
            for digest, roster in nxt:
                del conv.candidates[digest]
                writes[candidate_key(conv.cid, digest)] = None
                try:
                    verify_roster_chain(roster, tip)
                except RosterRejected:
                    self._counters[RosterRejected.reason] += 1
                    continue
                chosen = roster
                break
            self._store.save(writes)
            if chosen is None:
                return
            self.adopt(conv, chosen)

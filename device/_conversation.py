"""One participant's state of each conversation, and the table that holds them.

The engine's parts (rosters, keying, sealing, opening) all read and change these
records; none of them locks: the :class:`~fieldchat.device.engine.Engine` façade holds
its lock around every entry point.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from fieldchat.device._records import candidate_key, held_grant_key, roster_key
from fieldchat.device.chains import RecvChain, SendChain
from fieldchat.device.keystore import KeyStore
from fieldchat.schemas import Roster, decode_id
from fieldchat.schemas.envelope import ChainHeaders
from fieldchat.schemas.errors import UnknownConversation
from fieldchat.schemas.grant import ChainEnd

__all__ = [
    "KEEP_EPOCHS",
    "MAX_JOINING",
    "ChainId",
    "Conversation",
    "Conversations",
    "Publication",
]

# Epochs whose envelopes are still opened (receiving chains, chain ends); rosters of
# older epochs are kept all the same: joiners and catching up need the whole chain.
KEEP_EPOCHS = 4
# Conversations known only from a roster pool, held grants or an unfinished chain
# (not joined yet): past it the oldest such state is dropped (``joining_evicted``),
# so rosters and grants sent to our inbox for invented conversations stay bounded.
MAX_JOINING = 64

ChainId = tuple[int, int, int]
"""``(epoch, sender index, chain)``: a sending chain within its conversation."""


@dataclass(frozen=True, slots=True)
class Publication:
    """Something the engine wants published: topic, payload, retain flag (QoS 1)."""

    topic: str
    payload: bytes
    retain: bool = False


@dataclass(slots=True)
class Conversation:
    """What we hold of one conversation (PROTOCOL.md §6.6)."""

    cid: str
    cid_bytes: bytes
    epoch: int  # the epoch entered; -1 while joining (no verified roster lists us yet)
    rosters: dict[int, Roster]  # every adopted roster: a verified chain up to ``tip``
    removed: bool = False
    tip: int = -1  # the newest adopted roster (= epoch once joined)
    # Rosters that do not chain yet (§5.2), by digest, oldest first.
    candidates: dict[bytes, Roster] = field(default_factory=dict)
    # Epochs older than ``epoch`` with a member removed since: their unsigned
    # envelopes need the sender's stated chain end (§6.4).
    closed: set[int] = field(default_factory=set)
    # Chain ends stated by their senders: (epoch, sender index, chain) -> next step.
    ends: dict[ChainId, int] = field(default_factory=dict)
    # Where our own sending chains of earlier epochs ended, stated in our grants.
    sent_ends: tuple[ChainEnd, ...] = ()
    send: SendChain | None = None
    grant_base: tuple[int, bytes] | None = None  # (step, key) still owed to some members
    owed_to: set[str] = field(default_factory=set)
    recv: dict[ChainId, RecvChain] = field(default_factory=dict)
    held_grants: list[bytes] = field(default_factory=list)
    # Encodes our sending chain's headers (the sealing fast path), set on entering an epoch.
    headers: ChainHeaders | None = None
    sign_every: dict[int, int] = field(default_factory=dict)
    # Opening fast path: member pids of each kept epoch, by sender index.
    pids: dict[int, tuple[str, ...]] = field(default_factory=dict)

    @property
    def roster(self) -> Roster:
        return self.rosters[self.epoch]

    @property
    def joined(self) -> bool:
        return self.epoch >= 0

    def keep(self, roster: Roster) -> None:
        """Index a roster for opening (pids, signature policy), keeping KEEP_EPOCHS."""
        self.pids[roster.epoch] = roster.pids
        self.sign_every[roster.epoch] = roster.policy.sign_every
        for old in sorted(self.pids)[:-KEEP_EPOCHS]:
            del self.pids[old]
            self.sign_every.pop(old, None)

    def start_sending(self, roster: Roster, pid: str, chain: SendChain) -> None:
        """Use ``chain`` (ours, as ``pid``) in the epoch of ``roster``."""
        self.send = chain
        self.headers = ChainHeaders(roster.epoch, roster.index_of(pid), chain.chain)

    def closed_epochs(self) -> set[int]:
        """Kept epochs before ours with a member that a later roster no longer lists."""
        out = set()
        for epoch, pids in self.pids.items():
            members = set(pids)
            for later in range(epoch + 1, self.epoch + 1):
                roster = self.rosters.get(later)
                if roster is None or not members <= set(roster.pids):
                    out.add(epoch)  # a roster we lack (an older store) counts as removal
                    break
        return out


def _not_joined(cid: str) -> Conversation:
    """State for a conversation no verified roster has let us into yet (§6.6)."""
    return Conversation(cid=cid, cid_bytes=decode_id(cid), epoch=-1, rosters={}, removed=True)


class Conversations:
    """Every conversation we hold state of, by cid; joining ones bounded by MAX_JOINING."""

    def __init__(self, store: KeyStore, counters: Counter[str]) -> None:
        self.by_cid: dict[str, Conversation] = {}
        self._store = store
        self._counters = counters

    def get(self, cid: str) -> Conversation | None:
        return self.by_cid.get(cid)

    def joined(self, cid: str) -> Conversation:
        """The state of a conversation we joined.

        Raises:
            UnknownConversation: no state for ``cid``, or not joined yet.
        """
        conv = self.by_cid.get(cid)
        if conv is None or conv.epoch < 0:
            raise UnknownConversation(f"unknown conversation {cid[:40]}")
        return conv

    def found(self, cid: str) -> Conversation:
        """State for a conversation we found (we issue its epoch 0)."""
        conv = Conversation(cid=cid, cid_bytes=decode_id(cid), epoch=0, rosters={})
        self.by_cid[cid] = conv
        return conv

    def ensure(self, cid: str) -> Conversation:
        """The state of ``cid``, or new joining state for it (loading from the store)."""
        conv = self.by_cid.get(cid)
        if conv is None:
            conv = self.by_cid[cid] = _not_joined(cid)
        return conv

    def joining(self, cid: str) -> Conversation:
        """State for a conversation not joined yet, dropping the oldest such state
        past MAX_JOINING."""
        joining = [c for c in self.by_cid.values() if c.epoch < 0]
        if len(joining) >= MAX_JOINING:
            self.forget(joining[0])
            self._counters["joining_evicted"] += 1
        conv = self.by_cid[cid] = _not_joined(cid)
        return conv

    def forget(self, conv: Conversation) -> None:
        """Drop a conversation we never joined, with everything stored about it."""
        del self.by_cid[conv.cid]
        writes: dict[str, bytes | None] = dict.fromkeys(
            [roster_key(conv.cid, e) for e in conv.rosters]
            + [candidate_key(conv.cid, d) for d in conv.candidates]
            + [held_grant_key(conv.cid, g) for g in conv.held_grants]
        )
        self._store.save(writes)

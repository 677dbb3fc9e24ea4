"""Entering epochs and exchanging chain keys: our grants out, others' grants in
(PROTOCOL.md §5.3, §6.1-§6.2, §6.4).

Entering an epoch drops what removed members could use, starts a fresh sending chain
and grants it to every member whose bundle is known (the rest are owed it); a grant
from another member installs its receiving chain and the ends of its earlier chains.
Grants for an epoch not entered yet are held (durably) until its roster is adopted.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from fieldchat.device._bundles import Bundles
from fieldchat.device._conversation import (
    KEEP_EPOCHS,
    ChainId,
    Conversation,
    Conversations,
    Publication,
)
from fieldchat.device._records import (
    Writes,
    ends_key,
    ends_record,
    held_grant_key,
    recv_key,
    recv_record,
    send_record,
)
from fieldchat.device.chains import RecvChain, SendChain
from fieldchat.device.grants import accept_grant, make_grant
from fieldchat.device.identity import Identity
from fieldchat.device.keystore import KeyStore
from fieldchat.schemas import ChainGrant, Grant, GrantMode, Roster, Topics
from fieldchat.schemas.errors import FieldchatError, GrantRejected, NotAMember
from fieldchat.schemas.grant import ChainEnd

__all__ = ["MAX_PENDING_GRANTS", "GrantResult", "Keying"]

MAX_PENDING_GRANTS = 256  # grants held per conversation until its roster arrives


@dataclass(frozen=True, slots=True)
class GrantResult:
    """``needs_roster``: the grant is held until the roster of its epoch arrives.
    ``ends``: how many ends of the granter's earlier chains it taught us (envelopes
    held for them, :class:`~schemas.errors.ChainEndUnknown`, can be retried)."""

    cid: str
    installed: bool
    needs_roster: bool = False
    ends: int = 0


def _is_pq(roster: Roster, pid: str) -> bool:
    """Whether the roster lists ``pid`` as post-quantum (unknown pids count as such)."""
    return next((m.pq for m in roster.members if m.pid == pid), True)


class Keying:
    """Our chains granted to the members of each epoch, and theirs installed for us.

    ``dirty``: the receiving chains changed since they were persisted (shared with the
    opener, which fills it; chains dropped here leave it).
    """

    def __init__(
        self,
        identity: Identity,
        *,
        store: KeyStore,
        topics: Topics,
        counters: Counter[str],
        conversations: Conversations,
        bundles: Bundles,
        dirty: set[tuple[str, ChainId]],
        random: Callable[[int], bytes],
    ) -> None:
        self._identity = identity
        self._pid = identity.pid
        self._store = store
        self._topics = topics
        self._counters = counters
        self._conversations = conversations
        self._bundles = bundles
        self._dirty = dirty
        self._random = random

    def follow_tip(self, conv: Conversation) -> list[Publication]:
        """Enter the newest adopted epoch: at once when we are in the conversation,
        when joining only once a verified roster lists us."""
        if conv.tip == conv.epoch or (
            conv.epoch < 0 and self._pid not in conv.rosters[conv.tip].pids
        ):
            return []
        return self.enter_epoch(conv, conv.rosters[conv.tip])

    def enter_epoch(self, conv: Conversation, roster: Roster) -> list[Publication]:
        """Enter the epoch of an adopted roster: drop what removed members could use,
        start our chain and grant it (with where our previous chain ended)."""
        conv.epoch = roster.epoch
        current = set(roster.pids)
        writes: Writes = {}
        for key, chain in list(conv.recv.items()):
            pids = conv.pids.get(chain.epoch)
            if pids is None or pids[chain.sender] not in current:
                del conv.recv[key]
                self._dirty.discard((conv.cid, key))
                writes[recv_key(conv.cid, key)] = None
        ends = {k: v for k, v in conv.ends.items() if k in conv.recv}
        if ends != conv.ends:
            conv.ends = ends
            writes[ends_key(conv.cid)] = ends_record(conv)
        conv.closed = conv.closed_epochs()
        if conv.send is not None:
            # Receivers accept unsigned envelopes of this chain below this step once
            # someone has been removed (§6.4): every step we sealed is below it, also
            # after a crash (we resumed at the reservation).
            end = ChainEnd(epoch=conv.send.epoch, chain=conv.send.chain, next_step=conv.send.step)
            keep = [e for e in conv.sent_ends if e.epoch > roster.epoch - KEEP_EPOCHS]
            conv.sent_ends = (*keep, end)[-(KEEP_EPOCHS - 1) :]
        publications: list[Publication] = []
        if self._pid not in current:
            conv.removed = True
            conv.send = None
            conv.grant_base = None
            conv.owed_to = set()
        else:
            conv.removed = False
            key0 = self._random(32)
            conv.start_sending(roster, self._pid, SendChain(roster.epoch, 0, 0, key0, 0))
            conv.grant_base = (0, key0)
            conv.owed_to = current - {self._pid}
            publications = self._pay_grants(conv)
        writes.update(send_record(conv))
        self._store.save(writes)
        held, conv.held_grants = conv.held_grants, []
        if held:
            # Grants still early are held again (and re-saved) by receive_grant.
            self._store.save({held_grant_key(conv.cid, data): None for data in held})
        for data in held:
            try:
                self.receive_grant(data)
            except FieldchatError as exc:
                self._counters[exc.reason] += 1
        return publications

    def pay_owed_grants(self, cid: str | None = None) -> list[Publication]:
        """Grants owed to members whose bundles have arrived since (all or one cid)."""
        out: list[Publication] = []
        convs = self._conversations
        for conv in [convs.joined(cid)] if cid else list(convs.by_cid.values()):
            if conv.owed_to:
                before = len(conv.owed_to)
                out += self._pay_grants(conv)
                if len(conv.owed_to) != before:
                    self._store.save(send_record(conv))
        return out

    def _pay_grants(self, conv: Conversation) -> list[Publication]:
        if conv.send is None or conv.grant_base is None:
            return []
        roster = conv.roster
        step, key = conv.grant_base
        payload = ChainGrant(
            epoch=roster.epoch,
            roster=roster.digest(),
            sender=roster.index_of(self._pid),
            chain=conv.send.chain,
            step=step,
            key=key,
            ends=conv.sent_ends,
        )
        out = []
        for pid in sorted(conv.owed_to):
            bundle = self._bundles.get(pid)
            if bundle is None:
                continue
            if roster.policy.require_pq and bundle.mlkem768 is None:
                # Every grant of such an epoch is hybrid (§5.2): owed until it has ML-KEM.
                self._counters["not_post_quantum"] += 1
                continue
            grant = make_grant(self._identity, bundle, conv.cid, payload, random=self._random)
            out.append(Publication(self._topics.inbox(pid), grant.to_bytes()))
            conv.owed_to.discard(pid)
        if not conv.owed_to:
            conv.grant_base = None  # forget the old chain key: forward secrecy (§6.2)
        return out

    def _check_x25519_only(self, granter_pq: bool, require_pq: bool) -> None:
        """An X25519-only grant is refused from a post-quantum granter when we have ML-KEM
        (a downgrade) and in an epoch that requires post-quantum members (§5.2, §5.3).

        Raises:
            GrantRejected: either.
        """
        if granter_pq and self._identity.mlkem_seed:
            raise GrantRejected("X25519-only grant to a post-quantum member (downgrade)")
        if require_pq:
            raise GrantRejected("X25519-only grant in an epoch that requires post-quantum")

    def receive_grant(self, data: bytes) -> GrantResult:
        """Accept a grant from our inbox (see :meth:`Engine.handle_grant`).

        Raises:
            WireError, CryptoError, WeakKey: malformed, forged or undecryptable.
            GrantRejected: not for us, from a non-member, for another roster or
                downgraded to X25519 for a post-quantum member.
        """
        grant = Grant.from_bytes(data)
        if grant.mode is not GrantMode.HYBRID and self._identity.mlkem_seed is not None:
            # We publish an ML-KEM key. An X25519-only grant is right only from a
            # member without ML-KEM (a browser lacking WebCrypto ML-KEM); from anyone
            # else it is a downgrade.
            # Checked before decrypting against the newest roster, and after against
            # the grant's own epoch.
            # A grant for a conversation we have no roster of yet is held and checked
            # when the roster arrives (a browser may have founded the conversation).
            known = self._conversations.get(grant.cid)
            if known is not None and known.joined and _is_pq(known.roster, grant.granter):
                raise GrantRejected("X25519-only grant to a post-quantum member (downgrade)")
        payload = accept_grant(self._identity, grant)
        conv = self._conversations.get(grant.cid)
        if conv is None or not conv.joined or payload.epoch > conv.epoch:
            # Not entered yet: held until its roster is adopted through a verified chain.
            if conv is None:
                conv = self._conversations.joining(grant.cid)
            if len(conv.held_grants) >= MAX_PENDING_GRANTS:
                raise GrantRejected(f"too many grants waiting for the roster of {grant.cid}")
            conv.held_grants.append(bytes(data))
            # Held durably: the inbox message is gone once the client acknowledges it.
            self._store.save({held_grant_key(grant.cid, data): bytes(data)})
            return GrantResult(grant.cid, installed=False, needs_roster=True)
        if payload.epoch not in conv.pids:
            raise GrantRejected(f"grant for epoch {payload.epoch}, which is no longer kept")
        roster = conv.rosters[payload.epoch]
        if roster.digest() != payload.roster:
            raise GrantRejected("grant for another roster of this epoch")
        try:
            member = roster.member_at(payload.sender)
        except NotAMember:
            raise GrantRejected("grant for a sender index outside the roster") from None
        if member.pid != grant.granter or member.pid == self._pid:
            raise GrantRejected("grant signed by someone other than the chain's member")
        if self._pid not in roster.pids:
            raise GrantRejected("grant for an epoch we are not a member of")
        if grant.mode is not GrantMode.HYBRID:
            self._check_x25519_only(member.pq, roster.policy.require_pq)
        key = (payload.epoch, payload.sender, payload.chain)
        if key in conv.recv:
            self._counters["duplicate"] += 1
            return GrantResult(grant.cid, installed=False, ends=self._learn_ends(conv, payload))
        chain = RecvChain(
            payload.epoch,
            payload.sender,
            payload.chain,
            payload.step,
            payload.key,
            grant.granter_key,
        )
        conv.recv[key] = chain
        self._store.save({recv_key(grant.cid, key): recv_record(chain)})
        return GrantResult(grant.cid, installed=True, ends=self._learn_ends(conv, payload))

    def _learn_ends(self, conv: Conversation, payload: ChainGrant) -> int:
        """Record where the granter's earlier chains ended (§6.4), for chains we hold
        (so the record stays within the receiving chains); how many changed. A lower
        end stated again wins: a sender's end only ever refuses more."""
        granter = conv.pids[payload.epoch][payload.sender]
        learned = 0
        for end in payload.ends:
            pids = conv.pids.get(end.epoch)
            if pids is None or granter not in pids:
                continue
            key = (end.epoch, pids.index(granter), end.chain)
            known = conv.ends.get(key)
            if key in conv.recv and (known is None or end.next_step < known):
                conv.ends[key] = end.next_step
                learned += 1
        if learned:
            self._store.save({ends_key(conv.cid): ends_record(conv)})
        return learned

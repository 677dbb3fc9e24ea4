"""Entering epochs and keying them: the epoch secret delivered by the admin who signed
the roster, every member's chain 0 derived from it, a member's own re-keyed chains
granted individually, and the ends of earlier chains after a removal (PROTOCOL.md
§5.3-§5.4, §6.1, §6.5).

Entering an epoch drops what removed members could use. The admin who signed the
roster drew the epoch secret: it derives the chains at once and delivers the secret
to every other member's prekey (the members whose bundle it lacks are owed it). Any
other member waits for its delivery (nothing is sealed meanwhile: a message sealed in
the previous epoch after a removal would be readable by the member removed), checks
it against the roster's commit, derives the chains and deletes the secret.
Deliveries and grants for an epoch not entered yet are held (durably) until its
roster is adopted.
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
from fieldchat.device.epochs import chain_key, epoch_commit, make_delivery, open_delivery
from fieldchat.device.grants import accept_grant, make_grant
from fieldchat.device.identity import Identity
from fieldchat.device.keystore import KeyStore
from fieldchat.schemas import ChainGrant, Control, ControlOp, Grant, Message, Roster, Topics
from fieldchat.schemas.delivery import Delivery, is_delivery
from fieldchat.schemas.errors import FieldchatError, GrantRejected, NotAMember
from fieldchat.schemas.grant import ChainEnd

__all__ = ["MAX_PENDING_GRANTS", "GrantResult", "Keying"]

MAX_PENDING_GRANTS = 256  # deliveries and grants held per conversation until their roster

Seal = Callable[[str, Message, bool], bytes]
"""``(cid, message, force_sign) -> envelope``: the sealer, for our ENDS controls."""


def _pq(roster: Roster, pid: str) -> bool:
    """Whether ``roster`` lists ``pid`` as post-quantum (one it does not list counts as
    such: only a roster's word lets a sender seal with X25519 alone)."""
    return next((m.pq for m in roster.members if m.pid == pid), True)


def _x25519_ok(roster: Roster, sender: str) -> bool:
    """An X25519-only seal is right only from a sender the roster marks as not
    post-quantum, and never in an epoch that requires post-quantum (§5.2, §5.3)."""
    return not roster.policy.require_pq and not _pq(roster, sender)


@dataclass(frozen=True, slots=True)
class GrantResult:
    """``needs_roster``: the delivery or grant is held until the roster of its epoch
    arrives. ``ends``: how many ends of the granter's earlier chains it taught us
    (envelopes held for them can be retried). ``publications``: what keying the epoch
    made us publish (our ENDS control, §6.5)."""

    cid: str
    installed: bool
    needs_roster: bool = False
    ends: int = 0
    publications: tuple[Publication, ...] = ()


class Keying:
    """Epoch secrets in and out, the chains derived from them, re-keyed chains granted.

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
        self.seal: Seal | None = None  # set by the engine once its sealer exists

    def save_identity(self) -> None:
        """Persist the identity (prekeys opened, rotated or deleted)."""
        self._store.save({"identity": self._identity.to_secret_bytes()})

    # -- entering an epoch ------------------------------------------------------------

    def follow_tip(self, conv: Conversation) -> list[Publication]:
        """Enter the newest adopted epoch: at once when we are in the conversation,
        when joining only once a verified roster lists us."""
        if conv.tip == conv.epoch or (
            conv.epoch < 0 and self._pid not in conv.rosters[conv.tip].pids
        ):
            return []
        return self.enter_epoch(conv, conv.rosters[conv.tip])

    def enter_epoch(
        self, conv: Conversation, roster: Roster, secret: bytes | None = None
    ) -> list[Publication]:
        """Enter the epoch of an adopted roster: drop what removed members could use;
        ``secret``: we drew it (we signed the roster): key the epoch and deliver it."""
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
        conv.send = None
        conv.headers = None
        conv.grant_base = None
        conv.owed_to = set()
        publications: list[Publication] = []
        conv.removed = self._pid not in current
        if not conv.removed and secret is not None:
            conv.grant_base = (roster.epoch, secret)  # kept until every member has it
            conv.owed_to = current - {self._pid}
            publications += self._key_epoch(conv, roster, secret)
            publications += self._pay_deliveries(conv)
        writes.update(send_record(conv))
        self._store.save(writes)
        held, conv.held_grants = conv.held_grants, []
        if held:
            # Those still early are held again (and re-saved) by receive.
            self._store.save({held_grant_key(conv.cid, data): None for data in held})
        for data in held:
            try:
                result = self.receive(data)
                publications += result.publications
            except FieldchatError as exc:
                self._counters[exc.reason] += 1
        return publications

    def _key_epoch(self, conv: Conversation, roster: Roster, secret: bytes) -> list[Publication]:
        """Derive every member's chain 0 of ``roster``'s epoch from its secret: our
        sending chain (the current epoch only) and the others' receiving chains."""
        digest = roster.digest()
        writes: Writes = {}
        sending = roster.epoch == conv.epoch and not conv.removed
        for index, member in enumerate(roster.members):
            key = chain_key(secret, digest, index)
            if member.pid == self._pid:
                if sending and conv.send is None:
                    conv.start_sending(roster, self._pid, SendChain(roster.epoch, 0, 0, key, 0))
                continue
            chain_id = (roster.epoch, index, 0)
            if chain_id not in conv.recv:
                chain = RecvChain(roster.epoch, index, 0, 0, key, member.key)
                conv.recv[chain_id] = chain
                writes[recv_key(conv.cid, chain_id)] = recv_record(chain)
        if sending:
            writes.update(send_record(conv))
        self._store.save(writes)
        if not sending:
            return []
        return self._joined_control(conv, roster) + self._ends_control(conv)

    def _joined_control(self, conv: Conversation, roster: Roster) -> list[Publication]:
        """A new member's JOINED control (§6.6), once keyed: members who sent in the
        epoch before we subscribed hear we listen now and send that again (in v1 our
        grants told them). Not from the admin who issued the roster, nor from a member
        of the epoch before (it listened already)."""
        before = conv.rosters.get(roster.epoch - 1)
        if roster.signer == self._pid or (before is not None and self._pid in before.pids):
            return []
        if self.seal is None:
            return []
        envelope = self.seal(conv.cid, Control(op=ControlOp.JOINED), False)
        return [Publication(self._topics.msg(conv.cid), envelope)]

    def _ends_control(self, conv: Conversation) -> list[Publication]:
        """Our signed ENDS control (§6.5) when this epoch closed an earlier one in which
        we sent under a policy that allowed unsigned steps: receivers need the ends to
        accept our unsigned envelopes of it, which the member removed could forge."""
        due = tuple(
            e
            for e in conv.sent_ends
            if e.epoch in conv.closed and conv.sign_every.get(e.epoch) != 1
        )
        if not due or self.seal is None:
            return []
        envelope = self.seal(conv.cid, Control(op=ControlOp.ENDS, ends=due), True)
        return [Publication(self._topics.msg(conv.cid), envelope)]

    def pay_owed_grants(self, cid: str | None = None) -> list[Publication]:
        """Deliveries owed to members whose bundles have arrived since (all or one cid)."""
        out: list[Publication] = []
        convs = self._conversations
        for conv in [convs.joined(cid)] if cid else list(convs.by_cid.values()):
            if conv.owed_to:
                before = len(conv.owed_to)
                out += self._pay_deliveries(conv)
                if len(conv.owed_to) != before:
                    self._store.save(send_record(conv))
        return out

    def _pay_deliveries(self, conv: Conversation) -> list[Publication]:
        if conv.grant_base is None:
            return []
        epoch, secret = conv.grant_base
        roster = conv.rosters[epoch]
        out = []
        for pid in sorted(conv.owed_to):
            bundle = self._bundles.get(pid)
            if bundle is None or (roster.policy.require_pq and not bundle.post_quantum):
                continue  # owed until its (post-quantum) prekey is known
            delivery = make_delivery(secret, bundle, conv.cid, epoch, random=self._random)
            out.append(Publication(self._topics.inbox(pid), delivery.to_bytes()))
            conv.owed_to.discard(pid)
        if not conv.owed_to:
            conv.grant_base = None  # forget the secret: forward secrecy (§6.1)
        return out

    # -- our own re-key ---------------------------------------------------------------

    def rekey_own_chain(self, conv: Conversation) -> list[Publication]:
        """Start our next chain of the current epoch from a fresh random key and grant
        it to every member whose bundle we know (§6.2): no admin needed.

        Raises:
            NotAMember: we have no sending chain in ``conv``.
        """
        if conv.send is None or conv.removed:
            raise NotAMember(f"no sending chain in {conv.cid} to re-key")
        roster = conv.roster
        chain_no = conv.send.chain + 1
        key = self._random(32)
        end = ChainEnd(epoch=conv.send.epoch, chain=conv.send.chain, next_step=conv.send.step)
        conv.sent_ends = (*conv.sent_ends, end)[-(KEEP_EPOCHS - 1) :]
        conv.start_sending(roster, self._pid, SendChain(roster.epoch, chain_no, 0, key, 0))
        payload = ChainGrant(
            epoch=roster.epoch,
            roster=roster.digest(),
            sender=roster.index_of(self._pid),
            chain=chain_no,
            step=0,
            key=key,
        )
        out = []
        for pid in roster.pids:
            bundle = self._bundles.get(pid)
            if pid == self._pid or bundle is None:
                continue
            if roster.policy.require_pq and not bundle.post_quantum:
                # Every grant of such an epoch is hybrid (§5.2): none to a member without ML-KEM.
                self._counters["not_post_quantum"] += 1
                continue
            grant = make_grant(self._identity, bundle, conv.cid, payload, random=self._random)
            out.append(Publication(self._topics.inbox(pid), grant.to_bytes()))
        self._store.save(send_record(conv))
        return out

    # -- what arrives in our inbox ----------------------------------------------------

    def receive(self, data: bytes) -> GrantResult:
        """Accept a delivery or a grant from our inbox.

        Raises:
            WireError, CryptoError, WeakKey: malformed, forged or undecryptable.
            PrekeyUnknown: sealed to a prekey whose private keys are gone.
            GrantRejected: not for us, from a non-member, for another roster, or
                downgraded to X25519 for a post-quantum prekey.
        """
        if is_delivery(data):
            return self.receive_delivery(data)
        return self.receive_grant(data)

    def _hold(self, cid: str, data: bytes) -> GrantResult:
        conv = self._conversations.get(cid)
        if conv is None:
            conv = self._conversations.joining(cid)
        if len(conv.held_grants) >= MAX_PENDING_GRANTS:
            raise GrantRejected(f"too many deliveries and grants waiting for {cid}")
        conv.held_grants.append(bytes(data))
        # Held durably: the inbox message is gone once the client acknowledges it.
        self._store.save({held_grant_key(cid, data): bytes(data)})
        return GrantResult(cid, installed=False, needs_roster=True)

    def receive_delivery(self, data: bytes) -> GrantResult:
        """An epoch secret from the admin who signed that epoch's roster (§5.3)."""
        delivery = Delivery.from_bytes(data)
        cid = delivery.cid
        conv = self._conversations.get(cid)
        if conv is None or not conv.joined or delivery.epoch > conv.epoch:
            return self._hold(cid, data)  # opened once its roster is adopted
        if delivery.epoch not in conv.pids:
            raise GrantRejected(f"delivery for epoch {delivery.epoch}, which is no longer kept")
        roster = conv.rosters[delivery.epoch]
        if self._pid not in roster.pids:
            raise GrantRejected("delivery for an epoch we are not a member of")
        # X25519 only is right from an admin without ML-KEM (a browser, §5.3): the
        # roster says which; from anyone else it is a downgrade.
        secret = open_delivery(
            self._identity, delivery, x25519_ok=_x25519_ok(roster, roster.signer)
        )
        self.save_identity()  # the prekey's use count (rotation by count, §2.5)
        if epoch_commit(secret, conv.cid_bytes, delivery.epoch) != roster.commit:
            raise GrantRejected("delivery of another secret than its roster commits to")
        keyed = all(
            (roster.epoch, i, 0) in conv.recv
            for i, pid in enumerate(roster.pids)
            if pid != self._pid
        ) and (roster.epoch != conv.epoch or conv.send is not None)
        if keyed:
            self._counters["duplicate"] += 1
            return GrantResult(cid, installed=False)
        publications = self._key_epoch(conv, roster, secret)
        return GrantResult(cid, installed=True, publications=tuple(publications))

    def receive_grant(self, data: bytes) -> GrantResult:
        """A member's own re-keyed chain (chain >= 1), signed by it (§5.4)."""
        grant = Grant.from_bytes(data)
        conv = self._conversations.get(grant.cid)
        if conv is None or not conv.joined:
            return self._hold(grant.cid, data)  # opened once a roster lets us in
        # X25519 only is right from a member without ML-KEM (§5.4): the roster says which.
        x25519_ok = _x25519_ok(conv.roster, grant.granter)
        payload = accept_grant(self._identity, grant, x25519_ok=x25519_ok)
        self.save_identity()
        if payload.epoch > conv.epoch:
            return self._hold(grant.cid, data)
        if payload.epoch not in conv.pids:
            raise GrantRejected(f"grant for epoch {payload.epoch}, which is no longer kept")
        if payload.chain == 0:
            raise GrantRejected("chain 0 comes from the epoch secret, never from a grant")
        roster = conv.rosters[payload.epoch]
        if roster.digest() != payload.roster:
            raise GrantRejected("grant for another roster of this epoch")
        try:
            member = roster.member_at(payload.sender)
        except NotAMember:
            raise GrantRejected("grant for a sender index outside the roster") from None
        if member.key != grant.granter_key or member.pid == self._pid:
            raise GrantRejected("grant signed by someone other than the chain's member")
        if self._pid not in roster.pids:
            raise GrantRejected("grant for an epoch we are not a member of")
        key = (payload.epoch, payload.sender, payload.chain)
        if key in conv.recv:
            self._counters["duplicate"] += 1
            return GrantResult(grant.cid, installed=False)
        chain = RecvChain(
            payload.epoch, payload.sender, payload.chain, payload.step, payload.key, member.key
        )
        conv.recv[key] = chain
        self._store.save({recv_key(grant.cid, key): recv_record(chain)})
        return GrantResult(grant.cid, installed=True)

    def learn_ends(self, conv: Conversation, sender: str, ends: tuple[ChainEnd, ...]) -> int:
        """Record where ``sender``'s earlier chains ended (its signed ENDS control,
        §6.5), for chains we hold; how many changed. A lower end stated again wins:
        a sender's end only ever refuses more."""
        learned = 0
        for end in ends:
            pids = conv.pids.get(end.epoch)
            if pids is None or sender not in pids:
                continue
            key = (end.epoch, pids.index(sender), end.chain)
            known = conv.ends.get(key)
            if key in conv.recv and (known is None or end.next_step < known):
                conv.ends[key] = end.next_step
                learned += 1
        if learned:
            self._store.save({ends_key(conv.cid): ends_record(conv)})
        return learned

"""The rosters we issue: founding a conversation and, as its admin, each new epoch
(members added or removed, a new policy, an update asked for) (PROTOCOL.md §5.1-§5.2,
§6.1, §6.7). The admin who signs an epoch draws its secret: the roster commits to it
and the admin delivers it to every other member."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from fieldchat.device._bundles import Bundles
from fieldchat.device._conversation import Conversation, Conversations, Publication
from fieldchat.device._keying import Keying
from fieldchat.device._rosters import RosterChains
from fieldchat.device.epochs import epoch_commit
from fieldchat.device.identity import Identity
from fieldchat.schemas import Member, Policy, Roster, Topics, cid_for, verify_roster_chain
from fieldchat.schemas.delivery import EPOCH_SECRET_BYTES
from fieldchat.schemas.errors import NotAMember, UnknownParticipant
from fieldchat.schemas.ids import decode_id

__all__ = ["Membership"]


class Membership:
    """Issues our rosters; each is adopted and its epoch entered at once."""

    def __init__(
        self,
        identity: Identity,
        *,
        topics: Topics,
        conversations: Conversations,
        bundles: Bundles,
        rosters: RosterChains,
        keying: Keying,
        clock: Callable[[], float],
        random: Callable[[int], bytes],
    ) -> None:
        self._identity = identity
        self._pid = identity.pid
        self._topics = topics
        self._conversations = conversations
        self._bundles = bundles
        self._rosters = rosters
        self._keying = keying
        self._clock = clock
        self._random = random

    def create(
        self, members: Sequence[str], *, policy: Policy | None, admins: Iterable[str]
    ) -> tuple[str, list[Publication]]:
        """See :meth:`Engine.create_conversation`."""
        policy = policy or Policy()
        nonce = self._random(16)
        cid = cid_for(self._pid, nonce)
        admin_set = {self._pid, *admins}
        secret = self._random(EPOCH_SECRET_BYTES)
        roster = Roster.create(
            cid=cid,
            epoch=0,
            nonce=nonce,
            prev=b"",
            members=self._members([self._pid, *members], admin_set, policy),
            policy=policy,
            issued_at=int(self._clock()),
            signer_key=self._identity.public,
            commit=epoch_commit(secret, decode_id(cid), 0),
            sign=self._identity.sign,
        )
        verify_roster_chain(roster, None)
        conv = self._conversations.found(cid)
        self._rosters.adopt(conv, roster)
        return cid, [self._publication(roster), *self._keying.enter_epoch(conv, roster, secret)]

    def add(self, cid: str, pids: Sequence[str]) -> list[Publication]:
        conv = self._conversations.joined(cid)
        current = conv.roster
        new = [p for p in pids if p not in current.pids]
        admins = {m.pid for m in current.members if m.admin}
        return self._rotate(conv, [*current.pids, *new], admins, current.policy)

    def remove(self, cid: str, pids: Sequence[str]) -> list[Publication]:
        conv = self._conversations.joined(cid)
        current = conv.roster
        drop = set(pids)
        keep = [p for p in current.pids if p not in drop]
        admins = {m.pid for m in current.members if m.admin} - drop
        return self._rotate(conv, keep, admins, current.policy)

    def set_policy(self, cid: str, policy: Policy) -> list[Publication]:
        conv = self._conversations.joined(cid)
        current = conv.roster
        admins = {m.pid for m in current.members if m.admin}
        return self._rotate(conv, list(current.pids), admins, policy)

    def _rotate(
        self, conv: Conversation, pids: list[str], admins: set[str], policy: Policy
    ) -> list[Publication]:
        current = conv.roster
        if conv.removed or not current.is_admin(self._pid):
            raise NotAMember(f"only an admin of {conv.cid} can change its roster")
        if not admins & set(pids):
            admins = {self._pid} if self._pid in pids else {pids[0]}
        secret = self._random(EPOCH_SECRET_BYTES)
        roster = Roster.create(
            cid=conv.cid,
            epoch=current.epoch + 1,
            nonce=b"",
            prev=current.digest(),
            members=self._members(pids, admins, policy),
            policy=policy,
            issued_at=int(self._clock()),
            signer_key=self._identity.public,
            commit=epoch_commit(secret, conv.cid_bytes, current.epoch + 1),
            sign=self._identity.sign,
        )
        verify_roster_chain(roster, current)
        # A new member must verify the chain from epoch 0 before it trusts the roster
        # (§5.2): the earlier rosters go to its inbox, one payload each, before its
        # grants, so a device without a gateway gets them too.
        earlier = [conv.rosters[e].to_bytes() for e in sorted(conv.rosters)]
        joined = [p for p in roster.pids if p not in current.pids]
        history = [Publication(self._topics.inbox(p), data) for p in joined for data in earlier]
        self._rosters.adopt(conv, roster)
        # We drew the secret: we key the epoch and deliver it (if the roster no longer
        # lists us, we are removed: nothing is delivered and the secret is dropped).
        entered = self._keying.enter_epoch(conv, roster, secret)
        return [self._publication(roster), *history, *entered]

    def _members(self, pids: Sequence[str], admins: set[str], policy: Policy) -> tuple[Member, ...]:
        out = []
        for pid in dict.fromkeys(pids):
            bundle = self._bundles.get(pid)
            if bundle is None:
                raise UnknownParticipant(f"no bundle known for {pid}: fetch it first")
            if policy.require_pq and not bundle.post_quantum:
                raise NotAMember(f"{pid} has no ML-KEM key and the policy requires one")
            out.append(Member(key=bundle.ed25519, admin=pid in admins, pq=bundle.post_quantum))
        return tuple(out)

    def _publication(self, roster: Roster) -> Publication:
        """A new roster goes to ``c/{cid}/propose``, not retained: a verifier (the
        embedded broker, or the gateway) retains it on ``c/{cid}/roster`` once it
        chains (schemas.topics)."""
        return Publication(self._topics.propose(roster.cid), roster.to_bytes())

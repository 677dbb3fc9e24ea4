"""Reading an engine's state back from its key store, at start.

The inverse of :mod:`fieldchat.device._records`, one pass per record kind, in the order
the records depend on each other (rosters before the chains of their epochs).
"""

from __future__ import annotations

from collections import OrderedDict

from fieldchat.device._conversation import KEEP_EPOCHS, Conversations
from fieldchat.device._records import (
    BUNDLE_PREFIX,
    CANDIDATE_PREFIX,
    ENDS_PREFIX,
    PENDING_PREFIX,
    RECV_PREFIX,
    ROSTER_PREFIX,
    UNUSED_STEPS_PREFIX,
    VERIFIED_PREFIX,
)
from fieldchat.device.chains import RecvChain, SendChain
from fieldchat.device.keystore import SEND_CHAIN_PREFIX, KeyStore
from fieldchat.schemas import Bundle, Roster
from fieldchat.schemas._codec import fields, unpack
from fieldchat.schemas.errors import KeyStoreError, WireError
from fieldchat.schemas.grant import ChainEnd

__all__ = ["load_state"]


def load_state(
    store: KeyStore,
    pid: str,
    bundles: dict[str, Bundle],
    verified: set[str],
    conversations: Conversations,
) -> None:
    """Fill ``bundles``, ``verified`` and ``conversations`` (ours, as ``pid``) from ``store``.

    Raises:
        KeyStoreError: a record is corrupt.
    """
    try:
        for raw in store.load_prefix(BUNDLE_PREFIX).values():
            bundle = Bundle.from_bytes(raw)
            bundles[bundle.pid] = bundle
        for key in store.load_prefix(VERIFIED_PREFIX):
            verified.add(key.split("/", 1)[1])
        _load_conversations(store, pid, conversations)
    except (WireError, TypeError, ValueError, KeyError) as exc:
        raise KeyStoreError("the key store holds corrupt engine state") from exc


def _load_conversations(  # noqa: PLR0912 - one pass per record kind
    store: KeyStore, pid: str, conversations: Conversations
) -> None:
    convs = conversations.by_cid
    for _, raw in sorted(store.load_prefix(ROSTER_PREFIX).items()):
        roster = Roster.from_bytes(raw)
        conv = conversations.ensure(roster.cid)
        conv.rosters[roster.epoch] = roster
        conv.tip = max(conv.tip, roster.epoch)
    for conv in convs.values():
        for epoch in sorted(conv.rosters)[-KEEP_EPOCHS:]:
            conv.keep(conv.rosters[epoch])
    for key, raw in store.load_prefix(SEND_CHAIN_PREFIX).items():
        conv = convs[key.split("/", 1)[1]]
        record = unpack(raw, "send record")
        if isinstance(record, tuple) and len(record) == 6:  # written before chain ends
            record = (*record, ())
        epoch, chain_no, reserved, reserved_key, grant_base, owed, ends = fields(
            record, 7, "send record"
        )
        # The epoch entered: the tip once joined (an older store may hold a newer
        # roster it never entered; the engine then enters it on the next roster).
        conv.epoch = epoch
        conv.removed = chain_no is None or pid not in conv.roster.pids
        conv.sent_ends = tuple(ChainEnd(epoch=e, chain=c, next_step=n) for e, c, n in ends)
        # chain_no -1: waiting for the epoch secret (§6.6), which its delivery brings.
        if chain_no is not None and chain_no >= 0 and epoch == conv.epoch:
            # Resume at the reservation: steps before it may have been used (§6.3).
            chain = SendChain(epoch, chain_no, reserved, reserved_key, reserved)
            conv.start_sending(conv.roster, pid, chain)
            conv.grant_base = tuple(grant_base) if grant_base else None
            conv.owed_to = set(owed)
    _unpark(store, conversations)
    for _, raw in sorted(store.load_prefix(CANDIDATE_PREFIX).items()):
        roster = Roster.from_bytes(raw)
        conversations.ensure(roster.cid).candidates[roster.digest()] = roster
    for key, raw in store.load_prefix(PENDING_PREFIX).items():
        conversations.ensure(key.split("/")[1]).held_grants.append(raw)
    for key, raw in store.load_prefix(RECV_PREFIX).items():
        cid = key.split("/")[1]
        epoch, sender, chain_no, step, ck, signer, evicted, skipped = fields(
            unpack(raw, "recv record"), 8, "recv record"
        )
        held = convs.get(cid)
        if held is None or epoch not in held.pids:
            continue
        held.recv[(epoch, sender, chain_no)] = RecvChain(
            epoch, sender, chain_no, step, ck, signer, OrderedDict(skipped), evicted
        )
    for key, raw in store.load_prefix(ENDS_PREFIX).items():
        held = convs.get(key[len(ENDS_PREFIX) :])
        if held is not None:
            for epoch, sender, chain_no, step in unpack(raw, "chain ends"):
                held.ends[(epoch, sender, chain_no)] = step
    for conv in convs.values():
        if conv.joined:
            conv.closed = conv.closed_epochs()


def _unpark(store: KeyStore, conversations: Conversations) -> None:
    """Adopt the unused steps :meth:`Engine.park` kept, if they still fit the
    reservation on disk, then delete the records durably before anything can be sealed."""
    parked = store.load_prefix(UNUSED_STEPS_PREFIX)
    if not parked:
        return
    for key, raw in parked.items():
        conv = conversations.get(key.split("/", 1)[1])
        chain = conv.send if conv is not None else None
        try:
            epoch, chain_no, step, keys = fields(unpack(raw, "unused steps"), 4, "unused")
        except WireError:
            continue  # an optimisation only: the reservation stands, as after a crash
        if (
            chain is not None
            and (epoch, chain_no) == (chain.epoch, chain.chain)
            and chain.step == chain.reserved
            and isinstance(step, int)
            and isinstance(keys, tuple)
            and 0 < len(keys) == chain.reserved - step
            and all(isinstance(k, bytes) and len(k) == 32 for k in keys)
        ):
            chain.step = step
            chain.ahead.extend(keys)
    store.save(dict.fromkeys(parked))

"""The engine's records in the key store: their names and their msgpack encodings.

One record per thing that must survive a restart (PROTOCOL.md §6.3 for the sending
chain's reservation). Names are ``kind/cid[/...]``; the loader
(:mod:`fieldchat.device._loader`) reads them back by prefix.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fieldchat.device._coverage import Pending, Waiting
from fieldchat.device.chains import RecvChain, SendChain
from fieldchat.device.keystore import SEND_CHAIN_PREFIX
from fieldchat.schemas._codec import pack
from fieldchat.schemas.crypto import sha256

if TYPE_CHECKING:
    from fieldchat.device._conversation import ChainId, Conversation

BUNDLE_PREFIX = "bundle/"
VERIFIED_PREFIX = "verified/"
ROSTER_PREFIX = "roster/"
PENDING_PREFIX = "pending/"  # grants held until the roster of their epoch is adopted
RECV_PREFIX = "recv/"
# Unused reserved steps of a cleanly stopped engine (Engine.park), one record per
# conversation, consumed at the next load.
UNUSED_STEPS_PREFIX = "unused/"
CANDIDATE_PREFIX = "rosterpool/"  # rosters waiting for the epochs between (§5.2)
ENDS_PREFIX = "ends/"  # chain ends stated by senders, one record per conversation (§6.4)
# Delayed authentication (§6.5), per receiving chain: one record per pending unsigned
# step and one per signed envelope waiting for its covered steps, each written when it
# changes and deleted when settled, so a message costs O(1) writes, never the chain's.
COVERED_PREFIX = "covered/"
COVERING_PREFIX = "covering/"
# Our own unsigned envelopes since our last signed one, per conversation, kept by a
# clean stop (Engine.park) so the next signed envelope covers them; consumed at load.
SENT_COVER_PREFIX = "sentcover/"

Writes = dict[str, bytes | None]
"""Records to write in one :meth:`KeyStore.save` (``None`` deletes)."""


def bundle_key(pid: str) -> str:
    return f"{BUNDLE_PREFIX}{pid}"


def verified_key(pid: str) -> str:
    return f"{VERIFIED_PREFIX}{pid}"


def held_grant_key(cid: str, grant: bytes) -> str:
    return f"{PENDING_PREFIX}{cid}/{sha256(grant).hex()[:32]}"


def roster_key(cid: str, epoch: int) -> str:
    return f"{ROSTER_PREFIX}{cid}/{epoch:08d}"


def candidate_key(cid: str, digest: bytes) -> str:
    return f"{CANDIDATE_PREFIX}{cid}/{digest.hex()[:32]}"


def ends_key(cid: str) -> str:
    return f"{ENDS_PREFIX}{cid}"


def recv_key(cid: str, chain: ChainId) -> str:
    return f"{RECV_PREFIX}{cid}/{chain[0]}/{chain[1]}/{chain[2]}"


def covered_key(cid: str, chain: ChainId, step: int) -> str:
    return f"{COVERED_PREFIX}{cid}/{chain[0]}/{chain[1]}/{chain[2]}/{step}"


def covering_key(cid: str, chain: ChainId, step: int) -> str:
    return f"{COVERING_PREFIX}{cid}/{chain[0]}/{chain[1]}/{chain[2]}/{step}"


def unused_steps_key(cid: str) -> str:
    return f"{UNUSED_STEPS_PREFIX}{cid}"


def recv_record(chain: RecvChain) -> bytes:
    return pack(
        (
            chain.epoch,
            chain.sender,
            chain.chain,
            chain.step,
            chain.key,
            chain.signer_key,
            chain.evicted,
            tuple(chain.skipped.items()),
        )
    )


def send_record(conv: Conversation, reservation: tuple[int, bytes] | None = None) -> Writes:
    """Our sending chain of ``conv`` (with ``reservation`` instead of the chain's own:
    the next one, persisted before it is used), the epoch secret while deliveries of it
    are owed (``grant_base`` = (epoch, secret)), our chain ends."""
    key = f"{SEND_CHAIN_PREFIX}{conv.cid}"
    chain = conv.send
    ends = tuple((e.epoch, e.chain, e.next_step) for e in conv.sent_ends)
    if chain is None:
        # -1: a member waiting for its epoch secret (§6.6); None: removed.
        waiting = None if conv.removed else -1
        return {key: pack((conv.epoch, waiting, None, None, None, (), ends))}
    reserved, chain_key = reservation or (chain.reserved, chain.key)
    return {
        key: pack(
            (
                conv.epoch,
                chain.chain,
                reserved,
                chain_key,
                conv.grant_base,
                tuple(sorted(conv.owed_to)),
                ends,
            )
        )
    }


def ends_record(conv: Conversation) -> bytes:
    return pack(tuple((*key, step) for key, step in sorted(conv.ends.items())))


def sent_cover_key(cid: str) -> str:
    return f"{SENT_COVER_PREFIX}{cid}"


def sent_cover_record(chain: SendChain, digests: list[bytes]) -> bytes:
    """The digests of our unsigned envelopes just before ``chain``'s next step."""
    return pack((chain.epoch, chain.chain, chain.step, tuple(digests)))


def unused_steps_record(chain: SendChain) -> bytes:
    return pack((chain.epoch, chain.chain, chain.step, tuple(chain.ahead)))


def covered_record(chain: ChainId, step: int, pending: Pending) -> bytes:
    return pack((*chain, step, pending.digest, pending.key, pending.others))


def covering_record(chain: ChainId, signed: Waiting, cid_bytes: bytes) -> bytes:
    """Its associated data without the trailing cid bytes (the record's name has the
    cid): a record of the largest envelope then stays within the codec's object limit."""
    assert signed.aad.endswith(cid_bytes)
    header = signed.aad[: len(signed.aad) - len(cid_bytes)]
    return pack((*chain, signed.step, signed.cover, signed.key, signed.sealed, header))

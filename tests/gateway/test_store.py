"""The history store on both engines: idempotent archive, cursors, rosters, grants,
pending envelopes, accounts and migrations."""

from __future__ import annotations

import time

import pytest

from fieldchat.gateway import ArchiveBatch, NameTaken
from fieldchat.gateway._store import GrantRecord, NewEnvelope, PendingEnvelope, RosterRecord
from fieldchat.schemas import Topics
from tests.gateway._support import Party

CID = "a" * 25 + "a"
OTHER = "b" * 25 + "a"
PID = "c" * 25 + "a"
PID2 = "d" * 25 + "a"


def env(step: int, cid: str = CID, sender: int = 0, epoch: int = 0) -> NewEnvelope:
    return NewEnvelope(
        cid=cid,
        epoch=epoch,
        sender=sender,
        sender_pid=PID,
        chain=0,
        step=step,
        data=b"\x01\x81" + bytes([step % 256]) * 40,
        received_at=time.time(),
    )


async def test_archive_is_idempotent_and_pages_newest_first(store):
    first = await store.commit(ArchiveBatch(envelopes=[env(i) for i in range(10)]))
    assert (first.archived, first.duplicates) == (10, 0)
    again = await store.commit(ArchiveBatch(envelopes=[env(i) for i in range(12)]))
    assert (again.archived, again.duplicates) == (2, 10)
    await store.commit(ArchiveBatch(envelopes=[env(0, cid=OTHER)]))

    page = await store.history(CID, limit=5)
    assert [e.step for e in page] == [11, 10, 9, 8, 7]
    older = await store.history(CID, before=page[-1].seq, limit=5)
    assert [e.step for e in older] == [6, 5, 4, 3, 2]
    assert older[0].data == env(6).data  # verbatim
    gap = await store.history(CID, after=older[0].seq, limit=100)
    assert [e.step for e in gap] == [7, 8, 9, 10, 11]
    assert {e.cid for e in await store.since(0, limit=100)} == {CID, OTHER}
    assert len(await store.since(0, cids=[OTHER])) == 1
    assert await store.max_seq() == max(e.seq for e in await store.since(0, limit=100))


async def test_an_epochs_start_skips_what_a_later_member_cannot_open(store):
    assert await store.epoch_start(CID, 1) == 0  # nothing archived yet
    await store.commit(ArchiveBatch(envelopes=[env(i) for i in range(5)]))
    assert await store.epoch_start(CID, 1) == await store.max_seq()  # past every envelope
    await store.commit(ArchiveBatch(envelopes=[env(0, cid=OTHER, epoch=3)]))
    await store.commit(ArchiveBatch(envelopes=[env(i, epoch=1) for i in range(3)]))
    await store.commit(ArchiveBatch(envelopes=[env(9, epoch=0)]))  # a late one of epoch 0
    start = await store.epoch_start(CID, 1)
    rows = await store.history(CID, after=start, limit=100)
    assert [(e.epoch, e.step) for e in rows] == [(1, 0), (1, 1), (1, 2), (0, 9)]
    assert await store.epoch_start(CID, 0) == 0


async def test_rosters_membership_and_grants(store):
    r0 = RosterRecord(CID, 0, b"0" * 32, (PID, PID2), b"roster-0")
    r1 = RosterRecord(CID, 1, b"1" * 32, (PID,), b"roster-1")
    result = await store.commit(ArchiveBatch(rosters=[r0]))
    assert result.rosters == 1
    assert await store.conversations_of([PID2]) == {CID: (PID, PID2)}
    await store.commit(ArchiveBatch(rosters=[r1, r0]))  # r0 again: ignored
    assert await store.conversations_of([PID2]) == {}  # removed at epoch 1
    assert await store.was_member(CID, [PID2])  # but may read epoch-0 history
    assert not await store.was_member(OTHER, [PID])
    assert await store.roster(CID, 1) == b"roster-1"
    assert [r.epoch for r in await store.rosters(CID)] == [0, 1]

    g = GrantRecord(PID2, CID, PID, b"g" * 32, b"grant", time.time())
    assert (await store.commit(ArchiveBatch(grants=[g, g]))).grants == 1
    assert (await store.commit(ArchiveBatch(grants=[g]))).grants == 0
    mine = await store.grants_for([PID2])
    assert [x.data for x in mine] == [b"grant"]
    assert await store.grants_for([PID]) == []
    assert await store.max_grant_seq() == mine[0].seq


async def test_bundles_keep_the_newest(store):
    await store.commit(ArchiveBatch(bundles=[(PID, 5, b"five"), (PID, 3, b"three")]))
    assert await store.bundle(PID) == b"five"
    await store.commit(ArchiveBatch(bundles=[(PID, 4, b"four")]))
    assert await store.bundle(PID) == b"five"
    await store.commit(ArchiveBatch(bundles=[(PID, 9, b"nine")]))
    assert await store.bundle(PID) == b"nine"


async def test_pending_envelopes_wait_and_resolve(store):
    p = PendingEnvelope(cid=CID, epoch=0, sender=0, data=b"x" * 40, received_at=1.0, sender_pid=PID)
    await store.commit(ArchiveBatch(pending=[p, p]))
    assert await store.pending_count() == 2
    waiting = await store.pending(pids=[PID])
    assert len(waiting) == 2
    assert await store.pending(cids=[OTHER]) == []
    await store.commit(ArchiveBatch(resolved=[w.id for w in waiting], envelopes=[env(1)]))
    assert await store.pending_count() == 0


async def test_accounts_sessions_and_migrations(store):
    assert await store.migrate() == await store.migrate()  # idempotent
    uid = await store.create_account("alice", "hash", is_admin=False)
    with pytest.raises(NameTaken):
        await store.create_account("alice", "hash2", is_admin=True)
    assert await store.account_login("alice") == (uid, "hash")
    assert await store.account_login("nobody") is None
    other = await store.create_account("bob", "hash", is_admin=False)
    party = Party(Topics("x/v1"), post_quantum=False)
    await store.add_participant(uid, party.pid, party.bundle)
    await store.add_participant(uid, party.pid, party.bundle)  # again: fine
    with pytest.raises(NameTaken):
        await store.add_participant(other, party.pid, party.bundle)
    assert await store.bundle(party.pid) == party.bundle
    await store.create_session(b"t" * 32, uid, time.time() + 60)
    account = await store.session_account(b"t" * 32, time.time())
    assert account is not None and account.pids == (party.pid,)
    assert await store.session_account(b"t" * 32, time.time() + 120) is None  # expired
    await store.delete_session(b"t" * 32)
    assert await store.session_account(b"t" * 32, time.time()) is None
    assert [a.username for a in await store.list_accounts()] == ["alice", "bob"]

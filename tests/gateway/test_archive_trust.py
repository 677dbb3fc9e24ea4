"""What the gateway's archive trusts (issue 13), through real brokers and databases:

* a roster is adopted only when it chains to epoch 0 — from ``c/{cid}/roster``,
  ``c/{cid}/propose``, an inbox, or a browser — and held until its predecessor arrives;
* a roster the gateway verified goes out retained on ``c/{cid}/roster``, and an older or
  erased retained roster is put back (once: no loop);
* unsigned junk can never displace or block the genuine envelope of its key: history
  and the live feed deliver it in every order of arrival, opened by the real engine;
* quotas (pending envelopes, held rosters, conversations founded) refuse, count and log.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import logging
import os
import time
import uuid

import aiomqtt
import pytest
from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    Float,
    Index,
    LargeBinary,
    MetaData,
    Table,
    UniqueConstraint,
    insert,
)

from fieldchat.device.history import GatewayHistory
from fieldchat.gateway import ArchiveBatch, open_store
from fieldchat.gateway._schema import MIGRATIONS, SeqType, metadata, schema_version
from fieldchat.gateway._store import NewEnvelope
from fieldchat.schemas import Envelope, Member, Policy, Roster, TextMessage, Topics
from fieldchat.schemas.errors import FieldchatError
from fieldchat.schemas.ids import decode_id
from tests.gateway._support import (
    Party,
    converse,
    eventually,
    login,
    make_settings,
    publish_all,
    pubs,
    serve_gateway,
)
from tests.gateway.test_ws import Browser

pytestmark = pytest.mark.mosquitto  # all but the first two (store only) need it

CID = "a" * 25 + "a"
LATEST = MIGRATIONS[-1][0]
PID = "c" * 25 + "a"


# -- helpers ----------------------------------------------------------------------------


def roster_of(publications) -> bytes:
    return next(p.payload for p in publications if p.topic.endswith(("/roster", "/propose")))


def junk(genuine: bytes) -> bytes:
    """What a member can publish under another member's key: the same header fields,
    random ciphertext, no signature (a member holds no other member's signing key)."""
    env = Envelope.from_bytes(genuine)
    noise = os.urandom(len(env.ciphertext))
    return dataclasses.replace(env, ciphertext=noise, signature=None, cover=0).to_bytes()


def signed_by(party: Party, cid: str, like: bytes, *, step: int) -> bytes:
    """An envelope at ``step`` of ``like``'s chain, validly signed by ``party`` (its
    ciphertext is noise: the gateway checks signatures, never contents)."""
    env = dataclasses.replace(
        Envelope.from_bytes(like), step=step, ciphertext=os.urandom(40), signature=bytes(64)
    )
    body = env.to_bytes()[:-64]
    return body + party.engine.identity.sign(body + decode_id(cid))


def forged_roster(by: Party, cid: str, *, epoch: int, prev: bytes, members: list[Party]) -> bytes:
    """A validly signed roster that does not chain (signed by a non-admin, or after a
    predecessor nobody has)."""
    return Roster.create(
        cid=cid,
        epoch=epoch,
        nonce=b"",
        prev=prev,
        members=tuple(Member(key=p.engine.identity.public, admin=True) for p in members),
        policy=Policy(),
        issued_at=int(time.time()),
        signer_key=by.engine.identity.public,
        commit=bytes(32),
        sign=by.engine.identity.sign,
    ).to_bytes()


async def retained(url: str, topic: str, wait: float = 2.0) -> bytes | None:
    """What a fresh subscriber of ``topic`` is given as the retained message."""
    host, port = url.removeprefix("mqtt://").split(":")
    async with aiomqtt.Client(host, int(port), identifier=f"r-{uuid.uuid4().hex[:8]}") as c:
        await c.subscribe(topic, qos=1)
        try:
            async with asyncio.timeout(wait):
                async for message in c.messages:
                    return bytes(message.payload)
        except TimeoutError:
            return None
    return None


async def retained_becomes(url: str, topic: str, expected: bytes, what: str) -> None:
    await eventually(lambda: _is_retained(url, topic, expected), what)


async def _is_retained(url: str, topic: str, expected: bytes) -> bool:
    return await retained(url, topic) == expected


async def epochs(gw, cid: str) -> list[int]:
    return [r.epoch for r in await gw.state.store.rosters(cid)]


def opened_texts(party: Party, cid: str, envelopes: list[bytes]) -> list[str]:
    """Open every candidate as a receiver does: the ones that fail AES-GCM are junk."""
    texts = []
    for data in envelopes:
        try:
            opened = party.engine.open(cid, data)
        except FieldchatError:
            continue
        if opened is not None:
            assert isinstance(opened.message, TextMessage)
            texts.append(opened.message.text)
    return texts


def envelope(step: int, data: bytes, *, signed: bool, sender: int = 0) -> NewEnvelope:
    return NewEnvelope(
        cid=CID,
        epoch=0,
        sender=sender,
        sender_pid=PID,
        chain=0,
        step=step,
        data=data,
        received_at=time.time(),
        signed=signed,
    )


# -- the store: candidates ----------------------------------------------------------------


async def test_unsigned_candidates_never_displace_or_block_the_signed_envelope(store):
    junk1, junk2 = b"\x01\x01\x00\x00\x00\x05" + b"j" * 30, b"\x01\x01\x00\x00\x00\x05" + b"k" * 30
    genuine, second = (
        b"\x01\x81\x00\x00\x00\x05" + b"g" * 94,
        b"\x01\x81\x00\x00\x00\x05" + b"h" * 94,
    )
    first = await store.commit(ArchiveBatch(envelopes=[envelope(5, junk1, signed=False)]))
    assert first.archived == 1
    again = await store.commit(
        ArchiveBatch(envelopes=[envelope(5, junk1, signed=False), envelope(5, junk2, signed=False)])
    )
    assert (again.archived, again.duplicates) == (1, 1)  # the same bytes once, others kept
    signed = await store.commit(ArchiveBatch(envelopes=[envelope(5, genuine, signed=True)]))
    assert signed.archived == 1  # unsigned junk of its key came first: it is archived anyway
    other = await store.commit(
        ArchiveBatch(
            envelopes=[envelope(5, second, signed=True), envelope(5, genuine, signed=True)]
        )
    )
    assert (other.archived, other.duplicates) == (0, 2)  # one signed envelope per key
    rows = await store.history(CID, after=0, limit=10)
    assert [r.data for r in rows] == [junk1, junk2, genuine]
    assert [r.seq for r in rows] == sorted(r.seq for r in rows)


def _legacy_tables(md: MetaData) -> None:
    """``envelopes`` and ``rosters`` as schema version 1 made them (before candidates)."""
    Table(
        "envelopes",
        md,
        Column("seq", SeqType, primary_key=True, autoincrement=True),
        Column("cid", metadata.tables["envelopes"].c.cid.type, nullable=False),
        Column("epoch", BigInteger, nullable=False),
        Column("sender", BigInteger, nullable=False),
        Column("sender_pid", metadata.tables["envelopes"].c.cid.type, nullable=False),
        Column("chain", BigInteger, nullable=False),
        Column("step", BigInteger, nullable=False),
        Column("data", LargeBinary, nullable=False),
        Column("received_at", Float, nullable=False),
        UniqueConstraint("cid", "epoch", "sender", "chain", "step", name="envelopes_dedupe"),
        Index("envelopes_cid_seq", "cid", "seq"),
        sqlite_autoincrement=True,
    )
    Table(
        "rosters",
        md,
        Column("cid", metadata.tables["rosters"].c.cid.type, primary_key=True),
        Column("epoch", BigInteger, primary_key=True),
        Column("digest", LargeBinary, nullable=False),
        Column("data", LargeBinary, nullable=False),
    )


async def test_migration_3_keeps_every_envelope_and_cursor_and_admits_candidates(database_url):
    legacy = MetaData()
    _legacy_tables(legacy)
    others = [
        t
        for t in metadata.sorted_tables
        if t.name not in ("envelopes", "rosters", "held_rosters", "fieldchat_schema")
    ]
    unsigned = b"\x01\x01\x00\x00\x00\x01" + b"u" * 30
    signed = b"\x01\x81\x00\x00\x00\x02" + b"s" * 94
    db = open_store(database_url)
    try:

        def schema_1(conn: Connection) -> None:
            legacy.create_all(conn)
            metadata.create_all(conn, tables=[schema_version, *others])
            conn.execute(insert(schema_version).values(version=1))
            for step, data in ((1, unsigned), (2, signed), (3, signed[:-1] + b"t")):
                row = dataclasses.asdict(envelope(step, data, signed=True))
                del row["signed"]
                conn.execute(insert(legacy.tables["envelopes"]).values(**row))

        await db.db.write("making schema 1", schema_1)
        assert await db.migrate() == LATEST  # 3, and those after it
        before = await db.history(CID, after=0, limit=10)
        assert [(r.seq, r.step, r.data) for r in before] == [
            (1, 1, unsigned),
            (2, 2, signed),
            (3, 3, signed[:-1] + b"t"),
        ]
        result = await db.commit(
            ArchiveBatch(
                envelopes=[
                    envelope(1, unsigned, signed=False),  # the old row again: a duplicate
                    envelope(1, unsigned[:-1] + b"v", signed=False),  # a second candidate
                    envelope(2, signed[:-1] + b"x", signed=True),  # a second signed one
                ]
            )
        )
        assert (result.archived, result.duplicates) == (1, 2)
        assert result.max_seq is not None
        assert result.max_seq > 3  # the cursor goes on from the old rows
        assert await db.migrate() == LATEST  # idempotent
    finally:
        await db.close()


# -- rosters --------------------------------------------------------------------------------


async def test_a_roster_is_adopted_only_once_it_chains_to_epoch_0(gateway, mosquitto, prefix):
    """The issue's attack: a member signs a later-epoch roster listing an outsider; the
    archive must not adopt it "as a base" (the outsider would read the history)."""
    topics = Topics(prefix)
    admin, member, joiner, outsider = (Party(topics) for _ in range(4))
    conv = converse(topics, [admin, member])
    cid = conv.cid
    r0 = roster_of(conv.publications)
    admin.engine.learn_bundle(joiner.bundle)
    r1 = roster_of(admin.engine.add_members(cid, [joiner.pid]))
    r2 = roster_of(admin.engine.remove_members(cid, [joiner.pid]))
    attack = forged_roster(member, cid, epoch=7, prev=os.urandom(32), members=[member, outsider])
    bundles = [p for p in pubs(conv.publications) if p[0].endswith("/bundle")]
    roster_topic = topics.roster(cid)
    await publish_all(
        mosquitto.url,
        [
            *bundles,
            (roster_topic, attack, True),
            (roster_topic, r2, True),
            (topics.bundle(outsider.pid), outsider.bundle, True),  # last: a barrier
        ],
    )
    await eventually(lambda: gateway.state.store.bundle(outsider.pid), "the barrier")
    assert await epochs(gateway, cid) == []  # neither adopted "as a base"
    path = f"/v1/conversations/{cid}/envelopes"
    async with gateway.client() as http:
        r = await http.get(path, headers=outsider.sign_request("GET", path, host=gateway.host))
        assert r.status_code == 403, r.text

    await publish_all(mosquitto.url, [(roster_topic, r0, True)])
    await eventually(lambda: _epochs_are(gateway, cid, [0]), "epoch 0")
    await publish_all(mosquitto.url, [(roster_topic, r1, True)])  # then the held epoch 2
    await eventually(lambda: _epochs_are(gateway, cid, [0, 1, 2]), "the chain 0, 1, 2")
    assert [h.epoch for h in await gateway.state.store.held_rosters()] == [7]  # the attack
    assert gateway.state.archiver.counters["held"] == 2
    async with gateway.client() as http:
        r = await http.get(path, headers=outsider.sign_request("GET", path, host=gateway.host))
        assert r.status_code == 403, r.text


async def _epochs_are(gw, cid: str, expected: list[int]) -> bool:
    return await epochs(gw, cid) == expected


async def test_a_proposed_roster_is_verified_archived_and_retained(gateway, mosquitto, prefix):
    topics = Topics(prefix)
    admin, member, joiner = Party(topics), Party(topics), Party(topics)
    conv = converse(topics, [admin, member])
    cid = conv.cid
    r0 = roster_of(conv.publications)
    proposed = [
        (topics.propose(cid), payload, False) if topic.endswith("/roster") else (topic, payload, r)
        for topic, payload, r in pubs(conv.publications)
    ]
    await publish_all(mosquitto.url, proposed)
    await retained_becomes(mosquitto.url, topics.roster(cid), r0, "epoch 0 retained")
    assert await epochs(gateway, cid) == [0]

    admin.engine.learn_bundle(joiner.bundle)
    r1 = roster_of(admin.engine.add_members(cid, [joiner.pid]))
    by_member = forged_roster(
        member, cid, epoch=1, prev=Roster.from_bytes(r0).digest(), members=[member, joiner]
    )
    await publish_all(
        mosquitto.url, [(topics.propose(cid), by_member, False), (topics.propose(cid), r1, False)]
    )
    await retained_becomes(mosquitto.url, topics.roster(cid), r1, "the admin's epoch 1 retained")
    assert [r.data for r in await gateway.state.store.rosters(cid)] == [r0, r1]
    assert gateway.state.metrics.rejected_count("mqtt", "roster") >= 1  # the member's
    counters = gateway.state.archiver.counters
    assert counters["republished"] == 2
    # proposed again (its admin retries after a gateway that adopted it died before
    # republishing it): it goes out again; an older epoch proposed again does not
    await publish_all(
        mosquitto.url, [(topics.propose(cid), r0, False), (topics.propose(cid), r1, False)]
    )
    await eventually(lambda: counters["republished"] == 3, "the current roster republished")
    assert await retained(mosquitto.url, topics.roster(cid)) == r1


async def test_rosters_sent_to_an_inbox_are_archived_as_rosters_never_as_grants(
    gateway, mosquitto, prefix
):
    """An admin who adds a member sends it the earlier rosters of the chain (kind 0x12 on
    ``p/{pid}/inbox``): the gateway checks and archives them as rosters."""
    topics = Topics(prefix)
    admin, member, joiner = Party(topics), Party(topics), Party(topics)
    conv = converse(topics, [admin, member])
    r0 = roster_of(conv.publications)
    admin.engine.learn_bundle(joiner.bundle)
    r1 = roster_of(admin.engine.add_members(conv.cid, [joiner.pid]))
    inbox = topics.inbox(joiner.pid)
    metrics = gateway.state.metrics
    malformed = metrics.rejected_count("mqtt", "malformed")
    await publish_all(mosquitto.url, [(inbox, r1, False), (inbox, r0, False)])  # any order
    await eventually(lambda: _epochs_are(gateway, conv.cid, [0, 1]), "the chain from the inbox")
    assert await gateway.state.store.grants_for([joiner.pid]) == []
    assert metrics.rejected_count("mqtt", "malformed") == malformed
    assert gateway.state.archiver.counters["republished"] == 0  # old rosters: not retained


async def test_an_older_or_erased_retained_roster_is_put_back_once(gateway, mosquitto, prefix):
    topics = Topics(prefix)
    admin, member = Party(topics), Party(topics)
    heads = {}
    for _ in range(2):
        conv = converse(topics, [admin, member])
        r1 = roster_of(admin.engine.set_policy(conv.cid, Policy(sign_every=2)))
        r0 = roster_of(conv.publications)
        await publish_all(mosquitto.url, pubs(conv.publications))  # epoch 0 proposed
        await retained_becomes(mosquitto.url, topics.roster(conv.cid), r0, "epoch 0 retained")
        await publish_all(mosquitto.url, [(topics.roster(conv.cid), r1, True)])
        heads[conv.cid] = (r0, r1, conv)
        await eventually(lambda c=conv.cid: _epochs_are(gateway, c, [0, 1]), "epochs 0 and 1")
    (older, (r0, r1a, conv)), (erased, (_, r1b, _)) = heads.items()
    counters = gateway.state.archiver.counters
    before = (counters["healed"], counters["republished"])  # the proposals' republications

    await publish_all(
        mosquitto.url,
        [(topics.roster(older), r0, True), (topics.roster(erased), b"", True)],
    )
    await retained_becomes(mosquitto.url, topics.roster(older), r1a, "epoch 1 put back")
    await retained_becomes(mosquitto.url, topics.roster(erased), r1b, "the erased one put back")
    barrier = conv.seal(admin, "after the heal")  # once archived, the heals' echoes were seen
    await publish_all(mosquitto.url, [(topics.msg(older), barrier, False)])
    await eventually(lambda: _archived(gateway, older, barrier), "the barrier envelope")
    after = (counters["healed"], counters["republished"])
    assert (after[0] - before[0], after[1] - before[1]) == (2, 2)  # no loop on our own echo


async def _archived(gw, cid: str, data: bytes) -> bool:
    return data in [r.data for r in await gw.state.store.history(cid, after=0, limit=500)]


async def test_a_browser_roster_goes_out_only_when_it_chains(gateway, mosquitto, prefix):
    topics = Topics(prefix)
    device, web, outsider = Party(topics), Party(topics), Party(topics)
    http = await login(gateway, f"web{uuid.uuid4().hex[:6]}", web)
    conv = converse(topics, [device, web])
    r0 = roster_of(conv.publications)
    await publish_all(mosquitto.url, pubs(conv.publications))
    await eventually(lambda: _epochs_are(gateway, conv.cid, [0]), "epoch 0")
    not_admin = forged_roster(
        web, conv.cid, epoch=1, prev=Roster.from_bytes(r0).digest(), members=[web, outsider]
    )
    unchained = forged_roster(web, conv.cid, epoch=5, prev=os.urandom(32), members=[web])
    own_cid, own = web.engine.create_conversation([device.pid])
    try:
        async with Browser(gateway, http) as socket:
            await socket.next("caught_up")
            refused = await socket.publish("roster", not_admin)
            assert (refused["op"], refused["reason"]) == ("error", "roster")
            refused = await socket.publish("roster", unchained)
            assert (refused["op"], refused["reason"]) == ("error", "roster_unchained")
            assert (await socket.publish("roster", roster_of(own)))["op"] == "ack"
            web.engine.learn_bundle(outsider.bundle)
            grown = roster_of(web.engine.add_members(own_cid, [outsider.pid]))
            host, port = mosquitto.url.removeprefix("mqtt://").split(":")
            async with aiomqtt.Client(host, int(port)) as inbox:
                await inbox.subscribe(topics.inbox(outsider.pid), qos=1)
                assert (await socket.publish("roster", grown))["op"] == "ack"  # it chains
                # The joiner gets the earlier chain on its inbox, relayed by the gateway
                # from its archive (a device without a gateway verifies it from epoch 0).
                async with asyncio.timeout(10):
                    message = await anext(aiter(inbox.messages))
                assert bytes(message.payload) == roster_of(own)
    finally:
        await http.aclose()
    assert await epochs(gateway, own_cid) == [0, 1]  # archived before the ack
    await retained_becomes(mosquitto.url, topics.roster(own_cid), grown, "retained")
    assert await retained(mosquitto.url, topics.roster(conv.cid)) == r0  # nothing replaced it
    assert await epochs(gateway, conv.cid) == [0]


# -- candidates -------------------------------------------------------------------------------

ORDERS = (
    ("junk", "genuine"),
    ("genuine", "junk"),
    ("junk", "junk", "genuine"),
    ("junk", "genuine", "junk"),
)


async def test_history_and_the_live_feed_deliver_the_genuine_envelope_in_every_order(
    gateway, mosquitto, prefix
):
    """The issue's attack: with ``sign_every`` ≠ 1 a member publishes junk under another
    member's next steps first. Receivers (a device reading history, a browser on /ws)
    must still open every genuine message."""
    topics = Topics(prefix)
    victim, reader, attacker = Party(topics), Party(topics), Party(topics)
    web = Party(topics)
    http = await login(gateway, f"web{uuid.uuid4().hex[:6]}", web)
    conv = converse(topics, [victim, reader, web, attacker], policy=Policy(sign_every=4))
    await publish_all(mosquitto.url, pubs(conv.publications))
    await eventually(lambda: gateway.state.store.conversations_of([web.pid]), "the roster")
    texts = [f"step {i}" for i in range(12)]
    sealed = [conv.seal(victim, t) for t in texts]
    items, expected = [], 0
    for i, genuine in enumerate(sealed):
        signed = Envelope.from_bytes(genuine).signature is not None
        for what in ORDERS[i % len(ORDERS)]:
            items.append(genuine if what == "genuine" else junk(genuine))
            expected += 1 if what == "genuine" or not signed else 0  # unsigned junk: refused
    msg = topics.msg(conv.cid)
    start = await gateway.state.store.max_seq()
    live: list[bytes] = []
    try:
        async with Browser(gateway, http, cursor=start) as socket:
            await socket.next("caught_up")
            await publish_all(mosquitto.url, [(msg, data, False) for data in items])
            while len(live) < expected:
                frame = await socket.next("envelope")
                live.append(base64.b64decode(frame["data"]))
    finally:
        await http.aclose()
    assert set(sealed) <= set(live)
    assert sorted(opened_texts(web, conv.cid, live)) == sorted(texts)  # each exactly once

    history = GatewayHistory(gateway.base, reader.engine.identity)
    archived = await asyncio.to_thread(history.conversation, conv.cid)
    assert len(archived) == expected  # every distinct candidate, in archive order
    assert sorted(opened_texts(reader, conv.cid, archived)) == sorted(texts)
    assert gateway.state.metrics.rejected_count("mqtt", "unsigned") == 3  # junk at 0, 4, 8


async def test_a_signed_envelope_is_kept_after_unsigned_junk_of_its_key(gateway, mosquitto, prefix):
    topics = Topics(prefix)
    sender, member = Party(topics), Party(topics)
    conv = converse(topics, [sender, member], policy=Policy(sign_every=2))
    await publish_all(mosquitto.url, pubs(conv.publications))
    first = conv.seal(sender, "step 0")  # signed (0 % 2 == 0)
    genuine = signed_by(sender, conv.cid, first, step=1)  # step 1 may be unsigned; it is not
    again = signed_by(sender, conv.cid, first, step=1)  # a second valid signature: not kept
    spoof = junk(genuine)
    msg = topics.msg(conv.cid)
    await publish_all(mosquitto.url, [(msg, spoof, False), (msg, genuine, False)])
    await eventually(lambda: _archived(gateway, conv.cid, genuine), "the signed envelope")
    await publish_all(mosquitto.url, [(msg, again, False), (msg, first, False)])
    await eventually(lambda: _archived(gateway, conv.cid, first), "the barrier")
    rows = await gateway.state.store.history(conv.cid, after=0, limit=10)
    assert [r.data for r in rows] == [spoof, genuine, first]


# -- quotas -----------------------------------------------------------------------------------


async def test_quotas_refuse_count_and_log_once(mosquitto, prefix, database_url, caplog):
    settings = make_settings(
        mosquitto,
        prefix,
        database_url,
        pending_per_sender_max=3,
        pending_per_conversation_max=5,
        held_rosters_per_conversation_max=2,
        held_rosters_max=3,
        founding_max=2,
    )
    topics = Topics(prefix)
    a, b, founder = Party(topics), Party(topics), Party(topics)
    conv = converse(topics, [a, b])
    msg = topics.msg(conv.cid)
    others = [converse(topics, [a, b]) for _ in range(2)]
    held = [
        forged_roster(b, others[0].cid, epoch=e, prev=os.urandom(32), members=[b])
        for e in (3, 4, 5)
    ] + [forged_roster(b, others[1].cid, epoch=e, prev=os.urandom(32), members=[b]) for e in (3, 4)]
    foundings = [founder.engine.create_conversation()[1] for _ in range(3)]
    with caplog.at_level(logging.WARNING, logger="fieldchat.gateway.quota"):
        async with serve_gateway(settings) as gw:
            m = gw.state.metrics
            # no roster yet: the envelopes wait, within the quotas
            await publish_all(
                mosquitto.url,
                [(msg, conv.seal(a, f"a{i}"), False) for i in range(5)]
                + [(msg, conv.seal(b, f"b{i}"), False) for i in range(3)],
            )
            await eventually(
                lambda: _both(_pending_is(gw, 5), m, "pending_conversation_full"),
                "five envelopes pending, the sixth refused",
            )
            assert m.rejected_count("mqtt", "pending_sender_full") == 2
            # unchained rosters: held within their quotas
            await publish_all(
                mosquitto.url,
                [(topics.roster(Roster.from_bytes(r).cid), r, False) for r in held],
            )
            await eventually(
                lambda: _both(_held_is(gw, 3), m, "held_full"), "three rosters held, one refused"
            )
            assert m.rejected_count("mqtt", "held_conversation_full") == 1
            # three conversations founded by one signer through propose: two go through
            await publish_all(
                mosquitto.url,
                [
                    (topics.propose(Roster.from_bytes(roster_of(f)).cid), roster_of(f), False)
                    for f in foundings
                ],
            )
            founded = [Roster.from_bytes(roster_of(f)).cid for f in foundings]
            await eventually(
                lambda: _both(_epochs_are(gw, founded[1], [0]), m, "founding_quota"),
                "two foundings, the third refused",
            )
            assert [bool(await gw.state.store.rosters(c)) for c in founded] == [True, True, False]
            # the conversation's roster arrives: what waited within the quotas is archived
            await publish_all(mosquitto.url, pubs(conv.publications))
            await eventually(lambda: _count(gw, conv.cid, 5), "the five pending envelopes")
            async with gw.client() as http:
                text = (await http.get("/metrics")).text
    assert 'fieldchat_gateway_rejected_total{reason="founding_quota",source="mqtt"} 1.0' in text
    warnings = [r.getMessage() for r in caplog.records if "pending_sender_full" in r.getMessage()]
    assert len(warnings) == 1  # two refusals, one line


async def _both(archived, metrics, reason: str) -> bool:
    """A commit seen and a refusal counted (they may land in different batches)."""
    return await archived and metrics.rejected_count("mqtt", reason) == 1


async def _pending_is(gw, n: int) -> bool:
    return await gw.state.store.pending_count() == n


async def _held_is(gw, n: int) -> bool:
    return len(await gw.state.store.held_rosters()) == n


async def _count(gw, cid: str, n: int) -> bool:
    return len(await gw.state.store.history(cid, after=0, limit=500)) >= n


async def test_a_held_roster_expires_like_a_pending_envelope(mosquitto, prefix, database_url):
    settings = make_settings(mosquitto, prefix, database_url, pending_ttl_s=0.5)
    topics = Topics(prefix)
    a, b = Party(topics), Party(topics)
    conv = converse(topics, [a, b])
    unchained = forged_roster(b, conv.cid, epoch=4, prev=os.urandom(32), members=[b])
    async with serve_gateway(settings) as gw:
        await publish_all(mosquitto.url, [(topics.roster(conv.cid), unchained, False)])
        m = gw.state.metrics

        async def expired() -> bool:
            return (
                m.rejected_count("mqtt", "roster_expired") == 1
                and await gw.state.store.held_rosters() == []
                and m.rosters_held._value.get() == 0
            )

        await eventually(expired, "its expiry")
        assert await epochs(gw, conv.cid) == []

"""The archive's trust rules through the embedded broker (hardened aMQTT, the default
deployment): there the broker checks membership, not who a header names, so a member
can still publish junk under another member's key; and admins send the earlier rosters
of a chain to a new member's inbox."""

from __future__ import annotations

import asyncio
from collections import defaultdict

from fieldchat.broker.testing import broker_config, embedded_broker  # noqa: F401 - fixtures
from fieldchat.device.history import GatewayHistory
from fieldchat.schemas import Grant, Policy, Topics
from fieldchat.schemas.delivery import Delivery, is_delivery
from tests.gateway._support import Party, converse, eventually, serve_gateway
from tests.gateway.test_archive_trust import junk, opened_texts, roster_of
from tests.gateway.test_embedded_broker import _publish_as, gateway_settings


async def test_junk_first_and_inbox_rosters_through_the_embedded_broker(
    embedded_broker,  # noqa: F811
    tmp_path,
):
    broker = embedded_broker
    topics = Topics(broker.config.prefix)
    victim, reader, attacker, late = (Party(topics) for _ in range(4))
    conv = converse(topics, [victim, reader, attacker], policy=Policy(sign_every=4))
    # each publishes what it may
    by_publisher: dict[str, list[tuple[str, bytes, bool]]] = defaultdict(list)
    for p in conv.publications:
        where = topics.parse(p.topic)
        if where.kind == "inbox" and is_delivery(p.payload):
            who = victim.pid  # the admin who drew the epoch secret (PROTOCOL.md §5.3)
        elif where.kind == "inbox":
            who = Grant.from_bytes(p.payload).granter
        else:
            who = where.pid or victim.pid  # bundles: their owner; the roster: its creator
        by_publisher[who].append((p.topic, p.payload, p.retain))
    parties = {p.pid: p for p in (victim, reader, attacker, late)}
    texts = [f"field report {i}" for i in range(8)]
    sealed = [conv.seal(victim, t) for t in texts]
    msg = topics.msg(conv.cid)
    async with serve_gateway(gateway_settings(broker, "trust-1", tmp_path)) as gw:

        async def publish(party: Party, items: list[tuple[str, bytes, bool]]) -> None:
            await _publish_as(broker, party, broker.enroll(party.pid), items)

        for pid, items in by_publisher.items():
            await publish(parties[pid], items)
        await eventually(lambda: gw.state.store.roster(conv.cid, 0), "the roster")
        await publish(attacker, [(msg, junk(s), False) for s in sealed])  # first, every step
        await publish(victim, [(msg, s, False) for s in sealed])

        async def all_archived() -> bool:
            rows = await gw.state.store.history(conv.cid, after=0, limit=100)
            return set(sealed) <= {r.data for r in rows}

        await eventually(all_archived, "the genuine envelopes after the junk")
        history = GatewayHistory(gw.base, reader.engine.identity)
        archived = await asyncio.to_thread(history.conversation, conv.cid)
        assert sorted(opened_texts(reader, conv.cid, archived)) == sorted(texts)

        # a member joins: the admin sends it the chain so far on its inbox
        r0 = roster_of(conv.publications)
        victim.engine.learn_bundle(late.bundle)
        added = victim.engine.add_members(conv.cid, [late.pid])
        r1 = roster_of(added)
        await publish(late, [(topics.bundle(late.pid), late.bundle, True)])
        inbox = topics.inbox(late.pid)
        m = gw.state.metrics
        malformed = m.rejected_count("mqtt", "malformed")
        await publish(
            victim,
            [(inbox, r0, False), (inbox, r1, False)]
            + [(p.topic, p.payload, p.retain) for p in added],
        )
        await eventually(lambda: gw.state.store.grants_for([late.pid]), "the new member's grant")
        assert [r.data for r in await gw.state.store.rosters(conv.cid)] == [r0, r1]
        for grant in await gw.state.store.grants_for([late.pid]):
            # deliveries only: the rosters went to the rosters
            assert Delivery.from_bytes(grant.data).cid == conv.cid
        assert m.rejected_count("mqtt", "malformed") == malformed

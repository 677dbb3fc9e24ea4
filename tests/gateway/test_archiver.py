"""The archiver against real Mosquitto, on SQLite and PostgreSQL: envelopes sealed by
the real engine are archived verbatim and exactly once, early envelopes wait for their
roster, bad input is refused and counted, and nothing valid is lost."""

from __future__ import annotations

import base64
import dataclasses
import itertools

import pytest

from fieldchat.gateway import StoredEnvelope
from fieldchat.schemas import Envelope, TextMessage, Topics
from fieldchat.schemas.frame import pack_frame
from tests.gateway._support import (
    Party,
    converse,
    eventually,
    publish_all,
    pubs,
)

pytestmark = pytest.mark.mosquitto


async def archived(gw, cid: str) -> list[StoredEnvelope]:
    return await gw.state.store.history(cid, after=0, limit=500)


async def test_envelopes_are_archived_once_and_served_verbatim(gateway, mosquitto, prefix):
    topics = Topics(prefix)
    a, b = Party(topics), Party(topics)
    conv = converse(topics, [a, b])
    await publish_all(mosquitto.url, pubs(conv.publications))
    sealed = [conv.seal(a, f"from a {i}") for i in range(5)]
    sealed += [conv.seal(b, f"from b {i}") for i in range(5)]
    items = [(topics.msg(conv.cid), data, False) for data in sealed]
    await publish_all(mosquitto.url, items + items)  # every envelope twice

    await eventually(lambda: _count(gateway, conv.cid, 10), "10 archived envelopes")
    await eventually(
        lambda: gateway.state.archiver.counters["duplicate"] >= 10,
        f"the duplicates to be seen {gateway.state.archiver.counters}",
    )
    assert len(await archived(gateway, conv.cid)) == 10

    # b fills its gap over plain HTTP, signing the request with its identity key
    path = f"/v1/conversations/{conv.cid}/envelopes"
    async with gateway.client() as http:
        r = await http.get(
            path,
            params={"after": 0, "limit": 100},
            headers=b.sign_request("GET", path, "after=0&limit=100", host=gateway.host),
        )
    assert r.status_code == 200, r.text
    body = r.json()
    assert sorted(base64.b64decode(i["envelope"]) for i in body["items"]) == sorted(sealed)
    assert [i["seq"] for i in body["items"]] == sorted(i["seq"] for i in body["items"])
    texts = []
    for item in body["items"]:
        opened = b.engine.open(conv.cid, base64.b64decode(item["envelope"]))
        if opened is not None:
            assert isinstance(opened.message, TextMessage)
            texts.append(opened.message.text)
    assert sorted(texts) == [f"from a {i}" for i in range(5)]
    assert {i["sender_pid"] for i in body["items"]} == {a.pid, b.pid}


async def _count(gw, cid: str, n: int) -> bool:
    return len(await archived(gw, cid)) >= n


async def test_an_envelope_before_its_roster_waits_and_is_archived(gateway, mosquitto, prefix):
    topics = Topics(prefix)
    a, b = Party(topics), Party(topics)
    conv = converse(topics, [a, b])
    early = conv.seal(a, "early")
    await publish_all(mosquitto.url, [(topics.msg(conv.cid), early, False)])
    await eventually(
        lambda: gateway.state.metrics.pending._value.get() >= 1, "the early envelope to be pending"
    )
    assert await archived(gateway, conv.cid) == []
    await publish_all(mosquitto.url, pubs(conv.publications))
    rows = await eventually(lambda: archived(gateway, conv.cid), "the early envelope")
    assert [r.data for r in rows] == [early]
    assert await gateway.state.store.pending_count() == 0


async def test_bad_input_is_refused_counted_and_valid_survive(gateway, mosquitto, prefix):
    topics = Topics(prefix)
    a, b = Party(topics), Party(topics)
    conv = converse(topics, [a, b])
    await publish_all(mosquitto.url, pubs(conv.publications))
    good = [conv.seal(a, f"ok {i}") for i in range(6)]
    valid = Envelope.from_bytes(conv.seal(a, "template"))
    forged = dataclasses.replace(valid, step=valid.step + 100)  # signature no longer covers it
    outsider = dataclasses.replace(valid, sender=9, step=valid.step + 1)
    unsigned = dataclasses.replace(valid, signature=None, step=valid.step + 2)
    roster = next(p.payload for p in conv.publications if p.topic.endswith(("/roster", "/propose")))
    bad_roster = bytearray(roster)
    bad_roster[-1] ^= 1
    msg = topics.msg(conv.cid)
    bad = [
        (msg, b"\x00garbage", False),
        (msg, b"\x01", False),
        (msg, b"\x01\x81" + b"\xff" * 70_000, False),
        (msg, forged.to_bytes(), False),
        (msg, outsider.to_bytes(), False),
        (msg, unsigned.to_bytes(), False),
        (f"{prefix}/c/NOT-AN-ID/msg", good[0], False),
        (topics.roster(conv.cid), bytes(bad_roster), True),
    ]
    mixed = [
        item
        for pair in itertools.zip_longest(bad, [(msg, g, False) for g in good])
        for item in pair
        if item is not None
    ]
    await publish_all(mosquitto.url, mixed)

    rows = await eventually(lambda: _count(gateway, conv.cid, 6), "the six good envelopes")
    assert rows
    assert sorted(r.data for r in await archived(gateway, conv.cid)) == sorted(good)
    m = gateway.state.metrics
    reasons = ("version", "malformed", "limit", "auth", "not_member", "unsigned", "topic")
    await eventually(
        lambda: sum(m.rejected_count("mqtt", r) for r in reasons) >= len(bad),
        "every bad message to be counted",
    )
    for reason in reasons:
        assert m.rejected_count("mqtt", reason) >= 1, reason
    assert m.rejected_count("mqtt", "auth") == 2  # the forged envelope and the forged roster
    async with gateway.client() as http:
        text = (await http.get("/metrics")).text
    assert 'fieldchat_gateway_rejected_total{reason="not_member",source="mqtt"}' in text


async def test_grants_are_archived_for_their_recipient_only(gateway, mosquitto, prefix):
    topics = Topics(prefix)
    a, b, outsider = Party(topics), Party(topics), Party(topics)
    conv = converse(topics, [a, b])
    await publish_all(
        mosquitto.url,
        [*pubs(conv.publications), (topics.bundle(outsider.pid), outsider.bundle, True)],
    )
    sent_to_b = [p.payload for p in conv.publications if p.topic == topics.inbox(b.pid)]
    assert sent_to_b

    async def grants_of(party: Party) -> list[bytes]:
        async with gateway.client() as http:
            r = await http.get(
                "/v1/grants", headers=party.sign_request("GET", "/v1/grants", host=gateway.host)
            )
        assert r.status_code == 200, r.text
        return [base64.b64decode(g["grant"]) for g in r.json()["items"]]

    await eventually(lambda: gateway.state.store.bundle(outsider.pid), "the outsider's bundle")
    got = await eventually(lambda: grants_of(b), "b's grants")
    assert sorted(got) == sorted(sent_to_b)
    assert await grants_of(outsider) == []
    path = f"/v1/conversations/{conv.cid}/envelopes"
    async with gateway.client() as http:
        r = await http.get(path, headers=outsider.sign_request("GET", path, host=gateway.host))
        assert r.status_code == 403
        r = await http.get(
            f"/v1/conversations/{conv.cid}/rosters",
            headers=b.sign_request(
                "GET", f"/v1/conversations/{conv.cid}/rosters", host=gateway.host
            ),
        )
        assert r.status_code == 200
        assert sorted(r.json()[0]["members"]) == sorted([a.pid, b.pid])


async def test_a_frame_is_archived_envelope_by_envelope(gateway, mosquitto, prefix):
    """A frame (PROTOCOL.md §3.4) is only transport: each envelope in it is verified,
    archived and served on its own; a forged one is refused without its neighbours,
    and a malformed frame is refused whole and counted, valid frames around it kept."""
    topics = Topics(prefix)
    a, b = Party(topics), Party(topics)
    conv = converse(topics, [a, b])
    await publish_all(mosquitto.url, pubs(conv.publications))
    good = [conv.seal(a if i % 2 else b, f"framed {i}") for i in range(7)]
    valid = Envelope.from_bytes(conv.seal(a, "template"))
    forged = dataclasses.replace(valid, step=valid.step + 100).to_bytes()
    msg = topics.msg(conv.cid)
    m = gateway.state.metrics
    auth_before = m.rejected_count("mqtt", "auth")
    malformed_before = m.rejected_count("mqtt", "malformed")
    await publish_all(
        mosquitto.url,
        [
            (msg, pack_frame([good[0], forged, good[1], good[2]]), False),
            (msg, pack_frame([good[3], good[4]])[:-3], False),  # truncated: refused whole
            (msg, pack_frame([good[5], good[6]]), False),
        ],
    )

    await eventually(lambda: _count(gateway, conv.cid, 5), "the five framed envelopes")
    rows = await archived(gateway, conv.cid)
    assert sorted(r.data for r in rows) == sorted(good[:3] + good[5:])  # verbatim, unframed
    await eventually(
        lambda: m.rejected_count("mqtt", "malformed") > malformed_before, "the bad frame counted"
    )
    assert m.rejected_count("mqtt", "auth") == auth_before + 1  # only the forged envelope

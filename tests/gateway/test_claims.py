"""Claiming a participant for a web account needs proof of possession of its identity
key (issue 13, item 1): a public bundle alone gives nothing, a challenge is single-use,
short-lived, bound to one account and to the gateway's origin, and claims made before
proofs existed give no rights until proven."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
from typing import Any

import pytest
from sqlalchemy import Connection, text, update
from websockets.asyncio.client import connect

from fieldchat.gateway import NameTaken
from fieldchat.gateway._schema import participants
from fieldchat.schemas import Topics
from tests.gateway._support import (
    Party,
    archived_conversation,
    claim,
    login,
    make_settings,
    serve_gateway,
)

pytestmark = pytest.mark.mosquitto


async def _hello(gw, http) -> dict[str, Any]:
    """The first frame of a /ws with ``http``'s session cookie."""
    cookie = {"Cookie": f"fc_session={http.cookies.get('fc_session')}"}
    async with connect(f"{gw.ws_base}/ws?cursor=0", additional_headers=cookie) as ws:
        return json.loads(await asyncio.wait_for(ws.recv(), 20))


async def test_a_public_bundle_does_not_claim_its_participant(gateway, mosquitto, prefix):
    """The attack that worked: a fresh account posts the victim's public bundle."""
    victim, conv = await archived_conversation(gateway, mosquitto, prefix)
    mallory = await login(gateway, "mallory")
    try:
        public = (await mallory.get(f"/v1/participants/{victim.pid}/bundle")).json()["bundle"]
        r = await mallory.post("/v1/me/participants", json={"bundle": public})
        assert r.status_code != 201, "a public bundle claimed its participant"
        assert r.status_code == 422  # the proof is required
        # with a challenge of her own she still cannot sign for the victim's key
        challenge = (await mallory.post("/v1/me/participants/challenge", json={})).json()
        forged = {
            "bundle": public,
            "challenge": challenge["challenge"],
            "signature": base64.b64encode(bytes(64)).decode(),
        }
        r = await mallory.post("/v1/me/participants", json=forged)
        assert r.status_code == 403 and r.json()["error"] == "claim_refused"

        me = (await mallory.get("/v1/me")).json()
        assert me["pids"] == [] and me["unverified"] == []
        assert (await mallory.get("/v1/conversations")).json()["conversations"] == {}
        path = f"/v1/conversations/{conv.cid}"
        assert (await mallory.get(f"{path}/envelopes")).status_code == 403
        assert (await mallory.get(f"{path}/rosters")).status_code == 403
        assert (await mallory.get("/v1/grants")).json()["items"] == []
        hello = await _hello(gateway, mallory)
        assert hello["pids"] == [] and hello["conversations"] == {}
        assert gateway.state.metrics.rejected_count("http", "claim_refused") == 1
    finally:
        await mallory.aclose()


async def test_the_holder_of_the_key_claims_it_and_reads(gateway, mosquitto, prefix):
    victim, conv = await archived_conversation(gateway, mosquitto, prefix)
    owner = await login(gateway, "owner")
    try:
        r = await claim(owner, victim)
        assert r.status_code == 201, r.text
        assert (await owner.get("/v1/me")).json()["pids"] == [victim.pid]
        r = await owner.get(f"/v1/conversations/{conv.cid}/envelopes")
        assert r.status_code == 200 and len(r.json()["items"]) == 1
        assert (await _hello(gateway, owner))["pids"] == [victim.pid]
    finally:
        await owner.aclose()


async def test_a_challenge_is_single_use_bound_to_its_account_and_origin(gateway, prefix):
    topics = Topics(prefix)
    alice, bob = Party(topics), Party(topics)
    a = await login(gateway, "alice")
    b = await login(gateway, "bob")
    try:
        # replayed: the same body twice
        challenge = (await a.post("/v1/me/participants/challenge", json={})).json()
        assert challenge["origin"] == gateway.base and challenge["expires_in"] == 120
        body = alice.prove(challenge, gateway.base)
        assert (await a.post("/v1/me/participants", json=body)).status_code == 201
        r = await a.post("/v1/me/participants", json=body)
        assert r.status_code == 403 and "challenge" in r.json()["detail"]

        # another account's challenge: bob signs correctly for his account, with
        # alice's challenge; and alice's complete proof posted by bob
        theirs = (await a.post("/v1/me/participants/challenge", json={})).json()
        stolen = {**theirs, "account": (await b.get("/v1/me")).json()["id"]}
        assert (
            await b.post("/v1/me/participants", json=bob.prove(stolen, gateway.base))
        ).status_code == 403
        theirs = (await a.post("/v1/me/participants/challenge", json={})).json()
        assert (
            await b.post("/v1/me/participants", json=bob.prove(theirs, gateway.base))
        ).status_code == 403

        # signed for another origin (a look-alike gateway that relayed the challenge)
        mine = (await b.post("/v1/me/participants/challenge", json={})).json()
        r = await b.post("/v1/me/participants", json=bob.prove(mine, "http://evil.example"))
        assert r.status_code == 403
        # the refused attempt used the challenge up: the right proof needs a fresh one
        r = await b.post("/v1/me/participants", json=bob.prove(mine, gateway.base))
        assert r.status_code == 403
        assert (await claim(b, bob)).status_code == 201
        assert (await b.get("/v1/me")).json()["pids"] == [bob.pid]
        assert (await a.get("/v1/me")).json()["pids"] == [alice.pid]
    finally:
        await a.aclose()
        await b.aclose()


async def test_claims_are_bound_to_the_public_origin_when_set(mosquitto, prefix, tmp_path):
    settings = make_settings(
        mosquitto,
        prefix,
        f"sqlite:///{tmp_path / 'h.db'}",
        public_origin="https://Chat.Example:443/",
    )
    party = Party(Topics(prefix), post_quantum=False)
    async with serve_gateway(settings) as gw:
        http = await login(gw, "carol")
        try:
            assert (await claim(http, party)).status_code == 403  # signed for 127.0.0.1
            assert (await claim(http, party, "https://chat.example")).status_code == 201
        finally:
            await http.aclose()


async def test_challenges_expire_and_only_the_newest_are_kept(store):
    uid = await store.create_account("alice", "hash", is_admin=False)
    other = await store.create_account("bob", "hash", is_admin=False)
    now = 1_800_000_000.0

    def digest(n: int) -> bytes:
        return hashlib.sha256(str(n).encode()).digest()

    await store.add_challenge(digest(0), uid, now + 120, now=now, keep=8)
    assert not await store.take_challenge(digest(0), other, now + 1)  # not bob's
    assert not await store.take_challenge(digest(0), uid, now + 120)  # expired
    await store.add_challenge(digest(1), uid, now + 120, now=now, keep=8)
    assert await store.take_challenge(digest(1), uid, now + 119)
    assert not await store.take_challenge(digest(1), uid, now + 119)  # used
    for n in range(2, 12):
        await store.add_challenge(digest(n), uid, now + 120 + n, now=now, keep=8)
    kept = [n for n in range(2, 12) if await store.take_challenge(digest(n), uid, now)]
    assert kept == list(range(4, 12))  # the 8 newest


async def _downgrade_to_schema_1(store) -> None:
    """Make the migrated test database look like one of schema version 1: participants
    without ``verified``, none of version 2's tables."""

    def downgrade(conn: Connection) -> None:
        conn.execute(text("DROP TABLE participants"))
        conn.execute(
            text(
                "CREATE TABLE participants (pid VARCHAR(26) NOT NULL PRIMARY KEY, "
                "account_id BIGINT NOT NULL REFERENCES accounts (id) ON DELETE CASCADE)"
            )
        )
        for table in ("claim_challenges", "request_nonces", "gateway_secrets"):
            conn.execute(text(f"DROP TABLE {table}"))
        conn.execute(text("DELETE FROM fieldchat_schema"))
        conn.execute(text("INSERT INTO fieldchat_schema (version) VALUES (1)"))

    await store.db.write("downgrading", downgrade)


async def test_claims_from_before_proofs_are_unverified_after_the_migration(store):
    party = Party(Topics("x/v1"), post_quantum=False)
    uid = await store.create_account("mallory", "hash", is_admin=False)
    await _downgrade_to_schema_1(store)
    await store.db.write(
        "claiming without proof",
        lambda conn: conn.execute(
            text("INSERT INTO participants (pid, account_id) VALUES (:p, :a)"),
            {"p": party.pid, "a": uid},
        ),
    )
    assert await store.migrate() >= 2
    account = await store.account(uid)
    assert account.pids == () and account.unverified == (party.pid,)
    # the holder of the key takes over an unproven claim; a proven one stays refused
    owner = await store.create_account("owner", "hash", is_admin=False)
    await store.add_participant(owner, party.pid, party.bundle)
    assert (await store.account(owner)).pids == (party.pid,)
    assert (await store.account(uid)).unverified == ()
    with pytest.raises(NameTaken):
        await store.add_participant(uid, party.pid, party.bundle)


async def test_an_unverified_participant_gives_no_rights_until_proven(gateway, mosquitto, prefix):
    """A row claimed without proof (as before schema 2): not in the caller's pids, not
    on /ws; ``/v1/me`` lists it as unverified, and proving it restores it."""
    victim, conv = await archived_conversation(gateway, mosquitto, prefix)
    http = await login(gateway, "early")
    try:
        assert (await claim(http, victim)).status_code == 201
        await gateway.state.store.db.write(
            "unverifying",
            lambda conn: conn.execute(
                update(participants).where(participants.c.pid == victim.pid).values(verified=False)
            ),
        )
        gateway.state.accounts.forget((await http.get("/v1/me")).json()["id"])  # its cache
        me = (await http.get("/v1/me")).json()
        assert me["pids"] == [] and me["unverified"] == [victim.pid]
        assert (await http.get(f"/v1/conversations/{conv.cid}/envelopes")).status_code == 403
        assert (await _hello(gateway, http))["pids"] == []
        assert (await claim(http, victim)).status_code == 201
        me = (await http.get("/v1/me")).json()
        assert me["pids"] == [victim.pid] and me["unverified"] == []
        assert (await http.get(f"/v1/conversations/{conv.cid}/envelopes")).status_code == 200
    finally:
        await http.aclose()


def test_claim_message_is_the_documented_string():
    from fieldchat.gateway import claim_message

    assert claim_message("https://chat.example", 7, "p" * 26, "c" * 43) == (
        b"fieldchat-claim-v1\nhttps://chat.example\n7\n" + b"p" * 26 + b"\n" + b"c" * 43
    )

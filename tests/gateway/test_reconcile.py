"""Reconciling the archive with what a device sent, and a tail that skips what the device
holds (issue 14, items 1 and 5): ``POST …/archive/check``, ``POST …/envelopes`` and
``GET …/envelopes?after=N&have=…``, through a real gateway on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
from collections import defaultdict
from typing import Any

import pytest

from fieldchat.gateway._reconcile import (
    CHECK_CHAINS_MAX,
    CHECK_STEPS_MAX,
    HAVE_MAX,
    UPLOAD_MAX,
    body_digest,
    parse_have,
    skip_held,
)
from fieldchat.gateway._store import EnvelopeKey
from fieldchat.schemas import Envelope, Policy, Topics
from fieldchat.schemas.errors import LimitExceeded, WireError
from fieldchat.schemas.frame import pack_frame
from tests.gateway._support import (
    Party,
    converse,
    eventually,
    publish_all,
    pubs,
)
from tests.gateway.test_archive_trust import junk
from tests.gateway.test_ws import Browser, setup

# -- pure rules -------------------------------------------------------------------------


def test_have_parses_chains_and_refuses_what_is_not_four_numbers():
    assert parse_have("") == {}
    assert parse_have("0.1.2.30,1.0.0.7,0.1.2.12") == {(0, 1, 2): 30, (1, 0, 0): 7}
    for bad in ("1.2.3", "1.2.3.4.5", "a.1.2.3", "1.2.3.-4", "1.2.3.4,", " 1.2.3.4"):
        with pytest.raises(WireError):
            parse_have(bad)
    with pytest.raises(WireError):
        parse_have(f"0.0.0.{2**63}")
    assert len(parse_have(",".join(f"0.{i}.0.1" for i in range(HAVE_MAX)))) == HAVE_MAX
    with pytest.raises(LimitExceeded):
        parse_have(",".join(f"0.{i}.0.1" for i in range(HAVE_MAX + 1)))


def _keys(*rows: tuple[int, int, int]) -> list[EnvelopeKey]:
    """(seq, sender, step) rows of epoch 0, chain 0."""
    return [EnvelopeKey(seq, 0, sender, 0, step) for seq, sender, step in rows]


def test_skip_held_moves_the_cursor_past_what_the_caller_holds():
    keys = _keys((11, 0, 1), (12, 1, 1), (13, 0, 2), (14, 1, 2), (15, 0, 3))
    have = {(0, 0, 0): 2}  # sender 0 up to step 2, nothing of sender 1
    assert skip_held(keys, have, after=10, limit=50, scan=500) == ([12, 14, 15], 15, False)
    # the page is full: the cursor stops at its last row, the rest comes next time
    assert skip_held(keys, have, after=10, limit=2, scan=20) == ([12, 14], 14, True)
    assert skip_held(keys, have, after=10, limit=3, scan=20) == ([12, 14, 15], 15, False)
    # everything held: no rows, the cursor past all of them
    everything = {(0, 0, 0): 3, (0, 1, 0): 2}
    assert skip_held(keys, everything, after=10, limit=50, scan=500) == ([], 15, False)
    # the scan bound reached (one key more was read to tell): ask again from there
    assert skip_held(keys[:4], everything, after=10, limit=1, scan=3) == ([], 13, True)
    assert skip_held(keys[:3], everything, after=10, limit=1, scan=3) == ([], 13, False)
    assert skip_held([], everything, after=10, limit=1, scan=10) == ([], 10, False)


# -- helpers ----------------------------------------------------------------------------


def key_of(data: bytes) -> tuple[int, int, int, int]:
    env = Envelope.from_bytes(data)
    return env.epoch, env.sender, env.chain, env.step


def digest(data: bytes) -> str:
    return base64.b64encode(hashlib.sha256(data).digest()[:16]).decode()


def check_body(sent: list[bytes], digests: dict[bytes, str] | None = None) -> dict[str, Any]:
    chains: dict[tuple[int, int, int], list[list[Any]]] = defaultdict(list)
    for data in sent:
        epoch, sender, chain, step = key_of(data)
        chains[(epoch, sender, chain)].append([step, (digests or {}).get(data, digest(data))])
    return {
        "chains": [
            {"epoch": e, "sender": s, "chain": c, "steps": steps}
            for (e, s, c), steps in chains.items()
        ]
    }


async def signed_post(gw, party: Party, path: str, body: Any, *, bind: bool = True):
    content = json.dumps(body, separators=(",", ":")).encode()
    query = f"body_sha256={body_digest(content)}" if bind else ""
    headers = party.sign_request("POST", path, query, host=gw.host)
    headers["content-type"] = "application/json"
    async with gw.client() as http:
        return await http.post(
            f"{path}?{query}" if query else path, content=content, headers=headers
        )


async def signed_get(gw, party: Party, path: str, query: str):
    headers = party.sign_request("GET", path, query, host=gw.host)
    async with gw.client() as http:
        return await http.get(f"{path}?{query}", headers=headers)


def upload_body(items: list[bytes]) -> dict[str, Any]:
    return {"envelopes": [base64.b64encode(d).decode() for d in items]}


async def conversation(gateway, mosquitto, prefix, *, policy: Policy | None = None):
    topics = Topics(prefix)
    a, b = Party(topics), Party(topics)
    conv = converse(topics, [a, b], policy=policy)
    await publish_all(mosquitto.url, pubs(conv.publications))
    await eventually(lambda: gateway.state.store.roster(conv.cid, 0), "the roster")
    await eventually(lambda: gateway.state.store.bundle(b.pid), "the bundles")
    return topics, a, b, conv


async def archived_bytes(gw, cid: str) -> list[bytes]:
    return [r.data for r in await gw.state.store.history(cid, after=0, limit=500)]


# -- the archive check and the upload -------------------------------------------------


@pytest.mark.mosquitto
async def test_check_lists_what_the_archive_lacks_and_an_upload_fills_it(
    gateway, mosquitto, prefix
):
    topics, a, _b, conv = await conversation(gateway, mosquitto, prefix)
    sent = [conv.seal(a, f"m{i}") for i in range(6)]
    # the broker lost steps 2 and 4 on their way to the archive (members got them)
    published = [sent[i] for i in (0, 1, 3, 5)]
    await publish_all(mosquitto.url, [(topics.msg(conv.cid), d, False) for d in published])
    await eventually(
        lambda: _has(gateway, conv.cid, len(published)), "the published envelopes archived"
    )
    check = f"/v1/conversations/{conv.cid}/archive/check"
    r = await signed_post(gateway, a, check, check_body(sent))
    assert r.status_code == 200, r.text
    assert r.json() == {"missing": [list(key_of(sent[2])), list(key_of(sent[4]))]}
    # a signed row matches only its own bytes: another digest at an archived step
    wrong = check_body([sent[0]], {sent[0]: digest(b"not what was sent")})
    r = await signed_post(gateway, a, check, wrong)
    assert r.json() == {"missing": [list(key_of(sent[0]))]}

    upload = f"/v1/conversations/{conv.cid}/envelopes"
    r = await signed_post(gateway, a, upload, upload_body([sent[2], sent[4], sent[3]]))
    assert r.status_code == 200, r.text
    assert r.json() == {"archived": 2, "duplicates": 1, "pending": 0, "refused": []}
    r = await signed_post(gateway, a, check, check_body(sent))
    assert r.json() == {"missing": []}
    assert sorted(await archived_bytes(gateway, conv.cid)) == sorted(sent)  # each once
    # unpadded digests are accepted too (2,000 steps fit the body limit more easily)
    unpadded = check_body(sent)
    for chain in unpadded["chains"]:
        chain["steps"] = [[step, d.rstrip("=")] for step, d in chain["steps"]]
    assert (await signed_post(gateway, a, check, unpadded)).json() == {"missing": []}


async def _has(gw, cid: str, n: int) -> bool:
    return len(await archived_bytes(gw, cid)) >= n


@pytest.mark.mosquitto
async def test_a_junk_candidate_at_a_step_is_not_the_senders_envelope(gateway, mosquitto, prefix):
    topics, a, b, conv = await conversation(gateway, mosquitto, prefix, policy=Policy(sign_every=0))
    genuine = conv.seal(a, "the real one")
    forged = junk(genuine)  # b publishes unsigned junk under a's next step first
    await publish_all(mosquitto.url, [(topics.msg(conv.cid), forged, False)])
    await eventually(lambda: _has(gateway, conv.cid, 1), "the junk archived as a candidate")
    check = f"/v1/conversations/{conv.cid}/archive/check"
    r = await signed_post(gateway, a, check, check_body([genuine]))
    assert r.json() == {"missing": [list(key_of(genuine))]}
    r = await signed_post(
        gateway, a, f"/v1/conversations/{conv.cid}/envelopes", upload_body([genuine])
    )
    assert r.json() == {"archived": 1, "duplicates": 0, "pending": 0, "refused": []}
    assert (await signed_post(gateway, a, check, check_body([genuine]))).json() == {"missing": []}
    assert sorted(await archived_bytes(gateway, conv.cid)) == sorted([forged, genuine])
    # b may not check or upload a's chain, even its own junk of it
    r = await signed_post(gateway, b, check, check_body([genuine]))
    assert r.status_code == 403


@pytest.mark.mosquitto
async def test_envelopes_of_another_sender_refuse_the_whole_request(gateway, mosquitto, prefix):
    _topics, a, b, conv = await conversation(gateway, mosquitto, prefix)
    mine, theirs = conv.seal(a, "mine"), conv.seal(b, "theirs")
    upload = f"/v1/conversations/{conv.cid}/envelopes"
    r = await signed_post(gateway, a, upload, upload_body([mine, theirs]))
    assert r.status_code == 403, r.text
    assert await archived_bytes(gateway, conv.cid) == []  # not even the caller's own
    r = await signed_post(
        gateway, a, f"/v1/conversations/{conv.cid}/archive/check", check_body([theirs])
    )
    assert r.status_code == 403
    assert gateway.state.metrics.rejected_count("http", "not_sender") == 2
    # an outsider is refused before anything is read
    outsider = Party(Topics(prefix))
    await publish_all(mosquitto.url, pubs([outsider.engine.bundle_publication()]))
    await eventually(lambda: gateway.state.store.bundle(outsider.pid), "the outsider's bundle")
    assert (await signed_post(gateway, outsider, upload, upload_body([mine]))).status_code == 403


@pytest.mark.mosquitto
async def test_reconciliation_limits_and_bad_items_get_clear_answers(gateway, mosquitto, prefix):
    _topics, a, _b, conv = await conversation(gateway, mosquitto, prefix)
    check = f"/v1/conversations/{conv.cid}/archive/check"
    upload = f"/v1/conversations/{conv.cid}/envelopes"
    d = digest(b"x")
    chain = {"epoch": 0, "sender": 0, "chain": 0}
    too_many_chains = {"chains": [{**chain, "steps": []}] * (CHECK_CHAINS_MAX + 1)}
    r = await signed_post(gateway, a, check, too_many_chains)
    assert r.status_code == 422
    half = CHECK_STEPS_MAX // 2 + 1  # two chains: more than 2,000 steps in all
    too_many_steps = {"chains": [{**chain, "steps": [[i, d[:22]] for i in range(half)]}] * 2}
    r = await signed_post(gateway, a, check, too_many_steps)
    assert r.status_code == 400 and r.json()["error"] == "limit", r.text
    bad_digest = {"chains": [{**chain, "steps": [[1, "abc"]]}]}
    assert (await signed_post(gateway, a, check, bad_digest)).status_code == 422
    # the most: 2,000 steps fit the 64 KiB body with 4-digit steps and unpadded digests
    most = {"chains": [{**chain, "steps": [[8000 + i, d[:22]] for i in range(2000)]}]}
    r = await signed_post(gateway, a, check, most)
    assert r.status_code == 200 and len(r.json()["missing"]) == 2000

    good = conv.seal(a, "good")
    r = await signed_post(gateway, a, upload, upload_body([good] * (UPLOAD_MAX + 1)))
    assert r.status_code == 422
    later = conv.seal(a, "in a frame")
    items = [
        "not base64!",
        base64.b64encode(pack_frame([later, later])).decode(),
        base64.b64encode(b"\x01\x02garbage").decode(),
        base64.b64encode(good).decode(),
    ]
    r = await signed_post(gateway, a, upload, {"envelopes": items})
    assert r.status_code == 200, r.text
    assert r.json() == {
        "archived": 1,
        "duplicates": 0,
        "pending": 0,
        "refused": [[0, "malformed"], [1, "frame"], [2, "malformed"]],
    }
    # an envelope of an epoch whose roster is not archived: refused, try later
    future = Envelope.from_bytes(later)
    ahead = Envelope(
        kind=future.kind,
        epoch=5,
        sender=0,
        chain=future.chain,
        step=future.step,
        ciphertext=future.ciphertext,
        signature=future.signature,
    ).to_bytes()
    r = await signed_post(gateway, a, upload, upload_body([ahead]))
    assert r.json()["refused"] == [[0, "roster_unknown"]]
    assert gateway.state.metrics.rejected_count("http", "frame") == 1


@pytest.mark.mosquitto
async def test_a_body_that_does_not_match_its_signed_digest_is_refused(gateway, mosquitto, prefix):
    _topics, a, _b, conv = await conversation(gateway, mosquitto, prefix)
    path = f"/v1/conversations/{conv.cid}/envelopes"
    signed_for = json.dumps(upload_body([conv.seal(a, "signed")])).encode()
    query = f"body_sha256={body_digest(signed_for)}"
    swapped = json.dumps(upload_body([conv.seal(a, "swapped on the way")])).encode()
    headers = {
        **a.sign_request("POST", path, query, host=gateway.host),
        "content-type": "application/json",
    }
    async with gateway.client() as http:
        r = await http.post(f"{path}?{query}", content=swapped, headers=headers)
    assert r.status_code == 400, r.text
    assert await archived_bytes(gateway, conv.cid) == []
    # without the digest (not recommended) the body is taken as it is
    r = await signed_post(gateway, a, path, json.loads(swapped), bind=False)
    assert r.json()["archived"] == 1


@pytest.mark.mosquitto
async def test_an_uploaded_envelope_reaches_browsers_at_once(gateway, mosquitto, prefix):
    _topics, device, _browser, http, conv = await setup(gateway, mosquitto, prefix)
    try:
        async with Browser(gateway, http) as web:
            await web.next("caught_up")
            sent = conv.seal(device, "uploaded")
            r = await signed_post(
                gateway, device, f"/v1/conversations/{conv.cid}/envelopes", upload_body([sent])
            )
            assert r.json()["archived"] == 1
            frame = await web.next("envelope", timeout=5)
            assert base64.b64decode(frame["data"]) == sent
    finally:
        await http.aclose()


# -- the tail that skips what the device holds ----------------------------------------


@pytest.mark.mosquitto
async def test_a_tail_with_have_returns_only_what_the_device_lacks(gateway, mosquitto, prefix):
    topics, a, b, conv = await conversation(gateway, mosquitto, prefix)
    sent = [conv.seal(a if i % 3 else b, f"t{i}") for i in range(30)]
    await publish_all(mosquitto.url, [(topics.msg(conv.cid), d, False) for d in sent])
    await eventually(lambda: _has(gateway, conv.cid, 30), "every envelope archived")
    rows = await gateway.state.store.history(conv.cid, after=0, limit=500)
    top = rows[-1].seq
    path = f"/v1/conversations/{conv.cid}/envelopes"
    chains: dict[tuple[int, int, int], int] = {}
    for d in sent:
        e, s, c, step = key_of(d)
        chains[(e, s, c)] = max(step, chains.get((e, s, c), -1))
    everything = ",".join(f"{e}.{s}.{c}.{h}" for (e, s, c), h in chains.items())
    r = await signed_get(gateway, a, path, f"after=0&limit=50&have={everything}")
    assert r.json() == {"items": [], "more": False, "next_before": None, "next_after": top}
    # b's chain held up to its 5th step: the rest of b's, none of a's
    b_sent = [d for d in sent if key_of(d)[1] == key_of(sent[0])[1]]
    b_key = key_of(b_sent[4])
    a_mark = next(f"{e}.{s}.{c}.{h}" for (e, s, c), h in chains.items() if s != b_key[1])
    held = f"{a_mark},{b_key[0]}.{b_key[1]}.{b_key[2]}.{b_key[3]}"
    r = await signed_get(gateway, a, path, f"after=0&limit=50&have={held}")
    page = r.json()
    assert [base64.b64decode(i["envelope"]) for i in page["items"]] == b_sent[5:]
    assert page["next_after"] == top and page["more"] is False
    # a small limit: the scan reads at most 10 x limit rows, then says "more"
    cursor, pages, got = 0, 0, []
    while True:
        page = (
            await signed_get(gateway, a, path, f"after={cursor}&limit=1&have={everything}")
        ).json()
        pages += 1
        got += page["items"]
        cursor = page["next_after"]
        if not page["more"]:
            break
    assert got == [] and cursor == top and pages == 3  # 30 rows, 10 a request
    # with from_epoch and without have the old answers stand
    r = await signed_get(gateway, a, path, "after=0&limit=500&from_epoch=0")
    assert len(r.json()["items"]) == 30
    r = await signed_get(gateway, a, path, f"have={everything}")
    assert r.status_code == 400
    r = await signed_get(gateway, a, path, "after=0&have=1.2.3")
    assert r.status_code == 400 and r.json()["error"] == "malformed"


@pytest.mark.mosquitto
async def test_the_tail_of_an_up_to_date_device_costs_under_1_kb(gateway, mosquitto, prefix):
    """A reconnect after a quiet period: one request, one answer, both counted on the
    wire (request line, headers, body), for a device in a group of five senders."""
    topics = Topics(prefix)
    parties = [Party(topics) for _ in range(5)]
    conv = converse(topics, parties)
    await publish_all(mosquitto.url, pubs(conv.publications))
    await eventually(lambda: gateway.state.store.roster(conv.cid, 0), "the roster")
    sent = [conv.seal(parties[i % 5], f"q{i}") for i in range(20)]
    await publish_all(mosquitto.url, [(topics.msg(conv.cid), d, False) for d in sent])
    await eventually(lambda: _has(gateway, conv.cid, 20), "every envelope archived")
    cursor = (await gateway.state.store.history(conv.cid, after=0, limit=500))[4].seq
    marks: dict[tuple[int, int, int], int] = {}
    for d in sent:
        e, s, c, step = key_of(d)
        marks[(e, s, c)] = max(step, marks.get((e, s, c), -1))
    have = ",".join(f"{e}.{s}.{c}.{h}" for (e, s, c), h in sorted(marks.items()))
    path = f"/v1/conversations/{conv.cid}/envelopes"
    query = f"after={cursor}&limit=500&have={have}"
    headers = parties[0].sign_request("GET", path, query, host=gateway.host)
    request = (
        f"GET {path}?{query} HTTP/1.1\r\nHost: {gateway.host}\r\n"
        + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        + "\r\n"
    ).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    try:
        writer.write(request)
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(
            next(
                line.split(b":", 1)[1]
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
        )
        body = await reader.readexactly(length)
    finally:
        writer.close()
    assert head.startswith(b"HTTP/1.1 200"), head
    answer = json.loads(body)
    assert answer["items"] == [] and answer["more"] is False
    total = len(request) + len(head) + len(body)
    print(f"tail after reconnect: request {len(request)} B, response {len(head) + len(body)} B")
    assert total < 1024, (len(request), len(head), len(body))

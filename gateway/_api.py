"""The HTTP API: history, key objects, accounts (OpenAPI at ``/docs`` and ``/openapi.json``).

Byte strings (envelopes, rosters, bundles, grants) travel as standard base64. Cursors
are the server sequence numbers (``seq``): non-negative integers, opaque to clients.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import secrets
import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from fieldchat.gateway._accounts import (
    DEVICE_COOKIE,
    MAX_PASSWORD,
    MAX_USERNAME,
    MIN_PASSWORD,
    SESSION_COOKIE,
    address_key,
)
from fieldchat.gateway._auth import Caller, claim_message, request_origin
from fieldchat.gateway._errors import ClaimRefused, Forbidden, TooManyRequests
from fieldchat.gateway._metrics import RejectSource
from fieldchat.gateway._reconcile import (
    HAVE_MAX,
    HAVE_SCAN_FACTOR,
    CheckIn,
    UploadIn,
    body_digest,
    check_chains,
    decode_envelopes,
    missing_steps,
    parse_have,
    skip_held,
)
from fieldchat.gateway._state import Gateway
from fieldchat.gateway._store import StoredEnvelope
from fieldchat.schemas import Bundle
from fieldchat.schemas.crypto import ed25519_verify
from fieldchat.schemas.errors import CryptoError

__all__ = ["MAX_OPEN_CHALLENGES", "MAX_PAGE", "router"]

MAX_PAGE = 500
MAX_OPEN_CHALLENGES = 8  # unanswered claim challenges kept per account; older ones lapse
MAX_CURSOR = 2**63 - 1
_ITEM = (
    '{"seq":%d,"cid":"%s","epoch":%d,"sender":%d,"sender_pid":"%s","chain":%d,"step":%d,'
    '"envelope":"%s"}'
)
IdPath = Annotated[str, Path(pattern=r"^[a-z2-7]{25}[aeimquy4]$")]
Cursor = Annotated[int | None, Query(ge=0, le=MAX_CURSOR)]

router = APIRouter(prefix="/v1")


async def gateway(request: Request) -> Gateway:
    """The app's resources. ``async`` on purpose: FastAPI runs a plain ``def``
    dependency in a worker thread, a thread hop per request for a lookup."""
    state: Gateway = request.app.state.gateway
    return state


GatewayDep = Annotated[Gateway, Depends(gateway)]


async def caller(request: Request, gw: GatewayDep) -> Caller:
    found = await gw.auth(request)
    if found is None:
        raise HTTPException(401, "log in, or sign the request as a participant")
    return found


CallerDep = Annotated[Caller, Depends(caller)]


async def account_caller(who: CallerDep) -> Caller:
    if who.account is None:
        raise HTTPException(401, "this needs a web session")
    return who


AccountDep = Annotated[Caller, Depends(account_caller)]


# -- models ---------------------------------------------------------------------------


class _Out(BaseModel):
    model_config = ConfigDict(frozen=True)


class EnvelopeOut(_Out):
    seq: int = Field(description="Server sequence number; the cursor.")
    cid: str
    epoch: int
    sender: int = Field(description="The sender's index in the roster of `epoch`.")
    sender_pid: str
    chain: int
    step: int
    envelope: str = Field(description="The envelope bytes exactly as published, base64.")


class EnvelopePage(_Out):
    items: list[EnvelopeOut]
    more: bool = Field(description="True when a full page was returned: ask again.")
    next_before: int | None = Field(description="Cursor for the next older page.")
    next_after: int | None = Field(description="Cursor for the next newer page.")


class CheckOut(_Out):
    missing: list[tuple[int, int, int, int]] = Field(
        description="`[epoch, sender, chain, step]` the archive holds no envelope of with "
        "exactly the digest named: upload them."
    )


class UploadOut(_Out):
    archived: int = Field(description="Envelopes newly archived.")
    duplicates: int = Field(description="Envelopes the archive held already.")
    pending: int = Field(
        description="Stored until the sender's bundle arrives (archived then, not lost)."
    )
    refused: list[tuple[int, str]] = Field(
        description="`[index, reason]` of the envelopes refused, the reason a "
        "`fieldchat_gateway_rejected_total` label."
    )


class RosterOut(_Out):
    cid: str
    epoch: int
    members: list[str]
    roster: str


class GrantOut(_Out):
    seq: int
    cid: str
    recipient: str
    granter: str
    grant: str


class GrantPage(_Out):
    items: list[GrantOut]
    more: bool
    next_after: int


class BundleOut(_Out):
    pid: str
    bundle: str


class Credentials(BaseModel):
    model_config = ConfigDict(extra="forbid")
    username: Annotated[
        str, Field(min_length=3, max_length=MAX_USERNAME, pattern=r"^[A-Za-z0-9_.-]+$")
    ]
    password: Annotated[str, Field(min_length=MIN_PASSWORD, max_length=MAX_PASSWORD)]


class NewAccount(Credentials):
    is_admin: bool = False


class AccountOut(_Out):
    id: int
    username: str
    is_admin: bool
    pids: list[str] = Field(description="Participants the account proved it holds.")
    unverified: list[str] = Field(
        default=[],
        description="Participants claimed before proofs existed: no rights until proven "
        "(`POST /v1/me/participants`).",
    )


class ChallengeOut(_Out):
    challenge: str = Field(description="Single use; sign it within `expires_in` seconds.")
    account: int = Field(description="The account id the claim names.")
    origin: str = Field(
        description="The origin this gateway checks claims against. A client signs the "
        "origin it connected to, never this value on trust."
    )
    expires_in: int


class ParticipantIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    bundle: Annotated[str, Field(max_length=16_384, description="The signed bundle, base64.")]
    challenge: Annotated[
        str,
        Field(
            pattern=r"^[A-Za-z0-9_-]{43}$",
            description="From `POST /v1/me/participants/challenge`.",
        ),
    ]
    signature: Annotated[
        str,
        Field(
            max_length=100,
            description="Ed25519 signature (base64) by the bundle's identity key over "
            '"fieldchat-claim-v1\\n" ORIGIN "\\n" ACCOUNT_ID "\\n" PID "\\n" CHALLENGE.',
        ),
    ]


class ConversationsOut(_Out):
    conversations: dict[str, list[str]] = Field(description="cid -> members of its roster.")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise HTTPException(400, "not valid base64") from None


async def _member(gw: Gateway, cid: str, who: Caller) -> None:
    if not await gw.store.was_member(cid, who.pids):
        raise Forbidden("not a member of this conversation")


# -- history --------------------------------------------------------------------------


@router.get("/conversations", tags=["history"])
async def list_conversations(gw: GatewayDep, who: CallerDep) -> ConversationsOut:
    """Conversations whose current roster lists one of the caller's participants."""
    found = await gw.store.conversations_of(who.pids)
    return ConversationsOut(conversations={c: list(m) for c, m in found.items()})


def _page(
    rows: list[StoredEnvelope],
    *,
    limit: int,
    after: int | None,
    scanned: tuple[int, bool] | None = None,
) -> Response:
    """An :class:`EnvelopePage` as JSON, written directly.

    The most frequent answer of the API: through pydantic each of up to 500 items
    was a model built, validated and serialised again (≈ 1 ms for 50 on these cores,
    more than the query). Same fields, same order; ``response_model`` documents it.
    """
    # Every value is an integer, a validated base32 id or base64: nothing to escape,
    # so the items are formatted directly (json.dumps of dicts: 281 µs for 50, this: 99 µs).
    items = ",".join(
        [
            _ITEM % (r.seq, r.cid, r.epoch, r.sender, r.sender_pid, r.chain, r.step, _b64(r.data))
            for r in rows
        ]
    )
    nxt_before: int | None
    nxt_after: int | None
    more = len(rows) == limit
    if scanned is not None:  # a tail that skipped rows: its cursor passed them
        nxt_before, (nxt_after, more) = None, scanned
    elif after is not None:
        nxt_before, nxt_after = None, (rows[-1].seq if rows else after)
    else:
        nxt_before = rows[-1].seq if rows else None
        nxt_after = rows[0].seq if rows else None
    tail = json.dumps(
        {"more": more, "next_before": nxt_before, "next_after": nxt_after},
        separators=(",", ":"),
    )
    body = '{"items":[' + items + "]," + tail[1:]
    return Response(body, media_type="application/json")


@router.get("/conversations/{cid}/envelopes", tags=["history"], response_model=EnvelopePage)
async def history(
    cid: IdPath,
    gw: GatewayDep,
    who: CallerDep,
    before: Cursor = None,
    after: Cursor = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50,
    from_epoch: Annotated[
        int | None,
        Query(
            ge=0,
            le=MAX_CURSOR,
            description="With ``after``: start no earlier than this roster epoch's first "
            "envelope (a member that joined at that epoch cannot open older ones).",
        ),
    ] = None,
    have: Annotated[
        str | None,
        Query(
            max_length=HAVE_MAX * 80,
            description="With ``after``: ``EPOCH.SENDER.CHAIN.STEP,…`` (at most 256), the "
            "highest step of each chain the caller holds contiguously. Rows of those chains "
            "at or below it are skipped (``next_after`` still moves past them); at most "
            "10 x ``limit`` rows are read per request, ``more`` says when to ask again.",
        ),
    ] = None,
) -> Response:
    """Archived envelopes of a conversation, cursor-paginated.

    Without cursors: the newest ``limit``, newest first. ``before=N``: the next older
    page, newest first. ``after=N``: envelopes archived after cursor N, oldest first —
    gap filling for a device or browser that was away (repeat while ``more``).
    ``from_epoch=E`` (with ``after``) moves the cursor past the envelopes archived
    before epoch E began, so a new member does not download what it cannot open.
    ``have`` (with ``after``) skips the steps the caller holds: a device that missed
    nothing pays one small answer.
    """
    if before is not None and after is not None:
        raise HTTPException(400, "give before or after, not both")
    if from_epoch is not None and after is None:
        raise HTTPException(400, "from_epoch goes with after")
    if have is not None and after is None:
        raise HTTPException(400, "have goes with after")
    marks = parse_have(have) if have is not None else None
    await _member(gw, cid, who)
    if from_epoch is not None and after is not None:
        after = max(after, await gw.store.epoch_start(cid, from_epoch))
    if marks is not None and after is not None:
        scan = limit * HAVE_SCAN_FACTOR
        keys = await gw.store.history_keys(cid, after=after, limit=scan + 1)
        picked, cursor, more = skip_held(keys, marks, after=after, limit=limit, scan=scan)
        rows = await gw.store.history_rows(cid, picked)
        return _page(rows, limit=limit, after=after, scanned=(cursor, more))
    rows = await gw.store.history(cid, before=before, after=after, limit=limit)
    return _page(rows, limit=limit, after=after)


BodySha256 = Annotated[
    str | None,
    Query(
        pattern=r"^[A-Za-z0-9_-]{43}$",
        description="SHA-256 of the exact body, base64url without padding. The signature "
        "of a device's request covers the query, not the body: with this the body is "
        "bound to it (send it; a mismatch is 400).",
    ),
]


async def _bound_body(request: Request, digest: str | None) -> None:
    if digest is not None and body_digest(await request.body()) != digest:
        raise HTTPException(400, "the body does not match body_sha256")


async def _sender_of_chains(gw: Gateway, cid: str, body: CheckIn, who: Caller) -> None:
    """Raises Forbidden unless the caller is the sender of every chain named (the
    roster of the chain's epoch maps its sender index to one of the caller's pids)."""
    for c in body.chains:
        roster = await gw.archiver.roster(cid, c.epoch)
        pids = roster.pids if roster is not None else ()
        if c.sender >= len(pids) or pids[c.sender] not in who.pids:
            gw.metrics.reject(RejectSource.HTTP, "not_sender")
            raise Forbidden(
                f"epoch {c.epoch} sender {c.sender} of {cid} is not yours"
                + ("" if roster is not None else " (that roster is not archived)")
            )


@router.post("/conversations/{cid}/archive/check", tags=["reconciliation"])
async def archive_check(
    cid: IdPath,
    body: CheckIn,
    request: Request,
    gw: GatewayDep,
    who: CallerDep,
    body_sha256: BodySha256 = None,
) -> CheckOut:
    """Which of the caller's own envelopes the archive lacks.

    Name steps of your chains (at most 64 chains, 2,000 steps in all), each with the
    first 16 bytes of the SHA-256 of the envelope you sent at it, standard base64; the
    answer lists those the archive holds no envelope of with exactly those bytes (an
    unsigned candidate of another digest at that step does not count). Upload them
    with ``POST …/envelopes``. Every chain must be the caller's: 403 otherwise.
    """
    await _bound_body(request, body_sha256)
    chains = check_chains(body)
    await _member(gw, cid, who)
    await _sender_of_chains(gw, cid, body, who)
    archived = await gw.store.archived_digests(cid, chains)
    return CheckOut(missing=missing_steps(body, archived))


@router.post("/conversations/{cid}/envelopes", tags=["reconciliation"])
async def upload(
    cid: IdPath,
    body: UploadIn,
    request: Request,
    gw: GatewayDep,
    who: CallerDep,
    body_sha256: BodySha256 = None,
) -> UploadOut:
    """Archive the caller's own envelopes (at most 64, envelopes not frames, base64),
    exactly as the archiver would from ``c/{cid}/msg``: the same checks, unsigned
    candidates, pending store and quotas; the live feed sees them at once.

    An envelope of another sender makes the whole request 403 (nothing archived); each
    other refusal is listed with its index and reason (``malformed``, ``frame``,
    ``roster_unknown`` — its epoch's roster is not archived yet: try later —,
    ``not_member``, ``unsigned``, ``auth``, ``limit``, ``pending_…_full``).
    """
    await _bound_body(request, body_sha256)
    await _member(gw, cid, who)
    done = await gw.archiver.upload(cid, decode_envelopes(body.envelopes), who.pids)
    return UploadOut(
        archived=done.archived,
        duplicates=done.duplicates,
        pending=done.pending,
        refused=done.refused,
    )


@router.get("/conversations/{cid}/rosters", tags=["history"])
async def rosters(cid: IdPath, gw: GatewayDep, who: CallerDep) -> list[RosterOut]:
    """Every archived roster of a conversation, oldest epoch first."""
    await _member(gw, cid, who)
    return [
        RosterOut(cid=r.cid, epoch=r.epoch, members=list(r.members), roster=_b64(r.data))
        for r in await gw.store.rosters(cid)
    ]


@router.get("/participants/{pid}/bundle", tags=["history"])
async def bundle(pid: IdPath, gw: GatewayDep) -> BundleOut:
    """A participant's newest archived bundle (public, as on ``p/{pid}/bundle``)."""
    data = await gw.store.bundle(pid)
    if data is None:
        raise HTTPException(404, "no bundle archived for this participant")
    return BundleOut(pid=pid, bundle=_b64(data))


@router.get("/grants", tags=["history"])
async def grants(
    gw: GatewayDep,
    who: CallerDep,
    after: Annotated[int, Query(ge=0, le=MAX_CURSOR)] = 0,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
) -> GrantPage:
    """Key grants addressed to the caller's participants, oldest first after a cursor."""
    rows = await gw.store.grants_for(who.pids, after=after, limit=limit)
    return GrantPage(
        items=[
            GrantOut(
                seq=g.seq, cid=g.cid, recipient=g.recipient, granter=g.granter, grant=_b64(g.data)
            )
            for g in rows
        ],
        more=len(rows) == limit,
        next_after=rows[-1].seq if rows else after,
    )


# -- accounts -------------------------------------------------------------------------


def _account_out(who: Caller) -> AccountOut:
    assert who.account is not None
    a = who.account
    return AccountOut(
        id=a.id,
        username=a.username,
        is_admin=a.is_admin,
        pids=list(a.pids),
        unverified=list(a.unverified),
    )


def _client(request: Request) -> str:
    """The client's address key: the peer, or what a trusted proxy forwarded
    (``forwarded_allow_ips``; uvicorn rewrites the peer only for those)."""
    return address_key(request.client.host if request.client else None)


@router.post("/accounts", status_code=201, tags=["accounts"])
async def register(body: Credentials, request: Request, gw: GatewayDep) -> dict[str, Any]:
    """Create a web account (when ``allow_registration``). Limited per client address
    (``register_attempts`` in ``register_window_s``; then 429 with ``Retry-After``)."""
    if not gw.settings.allow_registration:
        raise HTTPException(403, "registration is closed; ask an administrator")
    attempt = gw.accounts.registrations.acquire(_client(request))
    try:
        account_id = await gw.accounts.create(body.username, body.password)
    finally:
        attempt.done(record=True)  # taken or not, each one cost a hash
    return {"id": account_id, "username": body.username}


@router.post("/session", tags=["accounts"])
async def login(
    body: Credentials, request: Request, response: Response, gw: GatewayDep
) -> AccountOut:
    """Log in: sets the ``fc_session`` cookie (HttpOnly, SameSite=Strict, Secure with TLS)
    and the ``fc_device`` cookie that marks this browser as the user's.

    A login with a valid ``fc_device`` of this user is limited per device cookie;
    others per user name and per client address. Past a limit (attempts in flight
    count) the answer is 429 with ``Retry-After``, before any password is checked.
    """
    accounts = gw.accounts
    device = await accounts.device_key(request.cookies.get(DEVICE_COOKIE), body.username)
    keys = (device,) if device else (f"user:{body.username.lower()}", _client(request))
    try:
        attempt = accounts.logins.acquire(*keys)
    except TooManyRequests:
        gw.metrics.logins.labels(outcome="limited").inc()
        raise
    failed = False
    try:
        account_id = await accounts.check_password(body.username, body.password)
        failed = account_id is None
    finally:
        attempt.done(record=failed)  # a database error is no failed guess
    if account_id is None:
        gw.metrics.logins.labels(outcome="failed").inc()
        raise HTTPException(401, "wrong user name or password")
    if device:
        accounts.logins.forget(device)
    gw.metrics.logins.labels(outcome="ok").inc()
    token = await accounts.new_session(account_id)
    secure = gw.settings.secure_cookies
    response.set_cookie(
        SESSION_COOKIE,
        token,
        max_age=gw.settings.session_ttl_s,
        path="/",
        httponly=True,
        samesite="strict",
        secure=secure,
    )
    response.set_cookie(
        DEVICE_COOKIE,
        await accounts.device_cookie(body.username),
        max_age=gw.settings.device_cookie_ttl_s,
        path="/v1/session",
        httponly=True,
        samesite="strict",
        secure=secure,
    )
    account = await gw.store.account(account_id)
    assert account is not None
    return _account_out(Caller(frozenset(account.pids), account))


@router.delete("/session", status_code=204, tags=["accounts"])
async def logout(response: Response, gw: GatewayDep, who: AccountDep) -> None:
    """End the session and clear its cookie."""
    assert who.session_token is not None
    await gw.accounts.end_session(who.session_token)
    response.delete_cookie(
        SESSION_COOKIE,
        path="/",
        httponly=True,
        samesite="strict",
        secure=gw.settings.secure_cookies,
    )


@router.get("/me", tags=["accounts"])
async def me(who: AccountDep) -> AccountOut:
    """The logged-in account and the participants it owns."""
    return _account_out(who)


def _origin(request: Request, gw: Gateway) -> str:
    """This gateway's origin, as claims are bound to it (docs/gateway.md, Which origin)."""
    try:
        return request_origin(request, gw.settings.public_origin)
    except ValueError:
        raise HTTPException(400, "the Host header is not a host[:port]") from None


@router.post("/me/participants/challenge", status_code=201, tags=["accounts"])
async def claim_challenge(request: Request, gw: GatewayDep, who: AccountDep) -> ChallengeOut:
    """A single-use challenge, bound to this account, valid ``claim_challenge_ttl_s``
    (120 s): sign it with the participant's identity key to claim it (next route)."""
    assert who.account is not None
    origin = _origin(request, gw)
    challenge = secrets.token_urlsafe(32)
    ttl = gw.settings.claim_challenge_ttl_s
    now = time.time()
    await gw.store.add_challenge(
        hashlib.sha256(challenge.encode()).digest(),
        who.account.id,
        now + ttl,
        now=now,
        keep=MAX_OPEN_CHALLENGES,
    )
    return ChallengeOut(challenge=challenge, account=who.account.id, origin=origin, expires_in=ttl)


def _refuse_claim(gw: Gateway, detail: str) -> ClaimRefused:
    gw.metrics.reject(RejectSource.HTTP, ClaimRefused.reason)
    return ClaimRefused(detail)


@router.post("/me/participants", status_code=201, tags=["accounts"])
async def add_participant(
    body: ParticipantIn, request: Request, gw: GatewayDep, who: AccountDep
) -> BundleOut:
    """Claim a participant for this account, proving its identity key: the bundle, a
    challenge from ``/v1/me/participants/challenge`` and the key's signature over
    ``"fieldchat-claim-v1\\n" ORIGIN "\\n" ACCOUNT_ID "\\n" PID "\\n" CHALLENGE`` (ORIGIN:
    ``scheme://host[:port]`` of this gateway as the client reached it). A well-formed
    claim consumes its challenge whatever the outcome. A pid another account proved
    is refused (409); a claim made before proofs existed is taken over. The bundle is
    archived and published, retained, on ``p/{pid}/bundle``."""
    assert who.account is not None
    data = _unb64(body.bundle)
    signature = _unb64(body.signature)
    parsed = Bundle.from_bytes(data)
    origin = _origin(request, gw)
    digest = hashlib.sha256(body.challenge.encode()).digest()
    if not await gw.store.take_challenge(digest, who.account.id, time.time()):
        raise _refuse_claim(gw, "unknown, used or expired challenge: ask for a new one")
    signed = claim_message(origin, who.account.id, parsed.pid, body.challenge)
    try:
        ed25519_verify(parsed.ed25519, signature, signed)
    except CryptoError:
        raise _refuse_claim(
            gw, f"the signature does not prove {parsed.pid}'s key for {origin}"
        ) from None
    await gw.store.add_participant(who.account.id, parsed.pid, data)
    gw.accounts.forget(who.account.id)
    gw.archiver.learn_bundle(parsed)
    await gw.publish_best_effort(gw.topics.bundle(parsed.pid), data, retain=True)
    return BundleOut(pid=parsed.pid, bundle=body.bundle)


async def _admin(who: AccountDep) -> Caller:
    assert who.account is not None
    if not who.account.is_admin:
        raise Forbidden("administrators only")
    return who


@router.get("/admin/accounts", tags=["admin"])
async def list_accounts(gw: GatewayDep, _: Annotated[Caller, Depends(_admin)]) -> list[AccountOut]:
    return [
        AccountOut(id=a.id, username=a.username, is_admin=a.is_admin, pids=[])
        for a in await gw.store.list_accounts()
    ]


@router.post("/admin/accounts", status_code=201, tags=["admin"])
async def create_account(
    body: NewAccount, gw: GatewayDep, _: Annotated[Caller, Depends(_admin)]
) -> dict[str, Any]:
    account_id = await gw.accounts.create(body.username, body.password, is_admin=body.is_admin)
    return {"id": account_id, "username": body.username}

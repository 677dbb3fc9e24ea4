"""Reconciling the archive with a device's own view: the rules behind three requests.

* ``POST /v1/conversations/{cid}/archive/check`` — a sender names steps of its chains
  with the digest of each envelope it sent; the answer lists the steps the archive
  lacks (:func:`missing_steps`). It then uploads them:
* ``POST /v1/conversations/{cid}/envelopes`` — archived as if they came over MQTT
  (``Archiver.upload``).
* ``GET /v1/conversations/{cid}/envelopes?after=N&have=E.S.C.H,…`` — the tail skips
  what the device holds (:func:`parse_have`, :func:`skip_held`), so a device that
  missed nothing pays one small request.

A broker may lose envelopes on their way to the gateway while members got them
(Mosquitto restores no ``$share/…`` subscription after a restart, issue 14): the
sender is the one that knows what it sent, so it asks, and fills the holes.
docs/gateway.md, "Reconciliation", has the request and answer shapes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Sequence
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from fieldchat.gateway._store import ChainSteps, EnvelopeKey
from fieldchat.schemas.errors import LimitExceeded, WireError

__all__ = [
    "CHECK_CHAINS_MAX",
    "CHECK_STEPS_MAX",
    "HAVE_MAX",
    "HAVE_SCAN_FACTOR",
    "UPLOAD_MAX",
    "ChainCheck",
    "CheckIn",
    "UploadIn",
    "body_digest",
    "check_chains",
    "decode_envelopes",
    "missing_steps",
    "parse_have",
    "skip_held",
]

CHECK_CHAINS_MAX = 64  # chains named in one archive check
CHECK_STEPS_MAX = 2000  # steps of all its chains together
UPLOAD_MAX = 64  # envelopes in one upload (and the body limit, 64 KiB, holds too)
HAVE_MAX = 256  # chains in one ``have``
# A tail with ``have`` reads at most HAVE_SCAN_FACTOR * limit rows' keys (no bytes) per
# request: a device that holds everything moves its cursor 5,000 rows a request (limit
# 500) for the price of an index scan, and the gateway's cost per request is bounded.
HAVE_SCAN_FACTOR = 10
DIGEST_BYTES = 16  # the first 16 bytes of the envelope's SHA-256 (gateway._schema)
_INT_MAX = 2**63 - 1
_HAVE_ENTRY = re.compile(r"(\d{1,19})\.(\d{1,19})\.(\d{1,19})\.(\d{1,19})")
_HAVE_TEXT_MAX = HAVE_MAX * 80

Number = Annotated[int, Field(ge=0, le=_INT_MAX)]
# standard base64 of 16 bytes: 22 characters and "==", the padding optional
Digest = Annotated[str, Field(pattern=r"^[A-Za-z0-9+/]{21}[AQgw](==)?$")]


class ChainCheck(BaseModel):
    """Steps of one sending chain, each with the digest of the envelope sent at it."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    epoch: Number
    sender: Number = Field(description="The sender's index in the roster of `epoch`.")
    chain: Number
    steps: Annotated[
        list[tuple[Number, Digest]],
        Field(
            max_length=CHECK_STEPS_MAX,
            description="`[step, base64 of the first 16 bytes of the SHA-256 of the envelope]`",
        ),
    ]


class CheckIn(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    chains: Annotated[list[ChainCheck], Field(max_length=CHECK_CHAINS_MAX)]


class UploadIn(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    envelopes: Annotated[
        list[Annotated[str, Field(max_length=90_000)]],
        Field(min_length=1, max_length=UPLOAD_MAX, description="Envelopes (not frames), base64."),
    ]


def _digest(text: str) -> bytes:
    return base64.b64decode(text.rstrip("=") + "==")


def check_chains(body: CheckIn) -> list[ChainSteps]:
    """The chains of an archive check, for the store.

    Raises:
        LimitExceeded: more than ``CHECK_STEPS_MAX`` steps in all.
    """
    total = sum(len(c.steps) for c in body.chains)
    if total > CHECK_STEPS_MAX:
        raise LimitExceeded(f"{total} steps: at most {CHECK_STEPS_MAX} in one check")
    return [
        ChainSteps(c.epoch, c.sender, c.chain, {step for step, _ in c.steps}) for c in body.chains
    ]


def missing_steps(
    body: CheckIn, archived: set[tuple[int, int, int, int, bytes]]
) -> list[tuple[int, int, int, int]]:
    """The named steps the archive holds no envelope of with exactly the named bytes,
    in the order asked. A candidate of another digest at that step (unsigned junk a
    member published first) does not count as the sender's envelope."""
    missing: list[tuple[int, int, int, int]] = []
    for c in body.chains:
        for step, digest in c.steps:
            if (c.epoch, c.sender, c.chain, step, _digest(digest)) not in archived:
                missing.append((c.epoch, c.sender, c.chain, step))
    return missing


def parse_have(text: str) -> dict[tuple[int, int, int], int]:
    """``E.S.C.H,…`` → ``{(epoch, sender, chain): highest step held contiguously}``
    (a chain named twice keeps its higher step).

    Raises:
        LimitExceeded: more than ``HAVE_MAX`` entries.
        WireError: an entry that is not four non-negative integers joined by dots.
    """
    if not text:
        return {}
    if len(text) > _HAVE_TEXT_MAX or text.count(",") >= HAVE_MAX:
        raise LimitExceeded(f"have: at most {HAVE_MAX} chains")
    marks: dict[tuple[int, int, int], int] = {}
    for entry in text.split(","):
        match = _HAVE_ENTRY.fullmatch(entry)
        if match is None:
            raise WireError(f"have: {entry[:40]!r} is not EPOCH.SENDER.CHAIN.STEP")
        epoch, sender, chain, step = (int(g) for g in match.groups())
        if max(epoch, sender, chain, step) > _INT_MAX:
            raise WireError("have: a number is too large")
        key = (epoch, sender, chain)
        marks[key] = max(step, marks.get(key, -1))
    return marks


def skip_held(
    keys: Sequence[EnvelopeKey],
    have: dict[tuple[int, int, int], int],
    *,
    after: int,
    limit: int,
    scan: int,
) -> tuple[list[int], int, bool]:
    """Pick the rows of a tail the caller lacks: ``(their seqs, next cursor, more)``.

    ``keys`` are the next rows after ``after``, oldest first: ``scan`` of them and
    one more when there are more. Rows of a chain named in ``have`` at a step at or
    below its mark are skipped, but the cursor moves past them. The scan ends at
    ``limit`` rows picked (the cursor stops at the last one) or after ``scan`` rows;
    ``more`` is true when rows are left after the cursor (as far as ``keys`` tell).
    """
    picked: list[int] = []
    cursor = after
    for i, key in enumerate(keys[:scan]):
        cursor = key.seq
        mark = have.get((key.epoch, key.sender, key.chain))
        if mark is not None and key.step <= mark:
            continue
        picked.append(key.seq)
        if len(picked) == limit:
            return picked, cursor, i + 1 < len(keys)
    return picked, cursor, len(keys) > scan


def body_digest(body: bytes) -> str:
    """The ``body_sha256`` query value of a request with this body: SHA-256, base64url
    without padding."""
    return base64.urlsafe_b64encode(hashlib.sha256(body).digest()).decode().rstrip("=")


def decode_envelopes(items: Sequence[str]) -> list[bytes | None]:
    """Base64 items of an upload; ``None`` for one that is not base64."""
    out: list[bytes | None] = []
    for text in items:
        try:
            out.append(base64.b64decode(text, validate=True))
        except (binascii.Error, ValueError):
            out.append(None)
    return out

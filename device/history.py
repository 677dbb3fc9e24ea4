"""The gateway's history API as the device's :class:`~device.client.HistorySource`.

Requests are signed with the device's identity key (docs/gateway.md, "Device
authentication"): ``X-Fieldchat-Pid``, ``X-Fieldchat-Time``, a fresh random
``X-Fieldchat-Nonce`` and an Ed25519 signature over
``fieldchat-http-v2 \\n METHOD \\n HOST \\n PATH?QUERY \\n TIME \\n NONCE``, where HOST is
the gateway's ``host[:port]`` as this device addresses it (lower case, no default
port): a request is good for one gateway, once. Synchronous and stdlib-only
(``urllib``): it runs on the device's history thread, a Pi needs nothing more.
The envelopes it returns are opened like live ones, so a duplicate or a forgery
from a misbehaving gateway costs a lookup, never a wrong message on screen.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from fieldchat.device.identity import Identity
from fieldchat.schemas import validate_id
from fieldchat.schemas.delivery import is_delivery
from fieldchat.schemas.errors import ConfigError, NotAuthorized, TransportError, WireError

__all__ = ["Checked", "GatewayHistory", "Uploaded", "digest", "gateway_base"]

MAX_DELIVERY_PAGES = 8  # of 500 inbox payloads each, per fetch of deliveries

SIGNING_LABEL = "fieldchat-http-v2"
_DEFAULT_PORTS = {"http": 80, "https": 443}
PAGE = 500
MAX_PAGES = 40  # per conversation() call: 20,000 envelopes; the next call goes on
# The gateway's bounds (docs/gateway.md, "Reconciliation"): an archive check names at most
# 64 chains and 2,000 steps (and its body fits 64 KiB: a step costs ≤ 38 bytes of JSON,
# so 1,500 always fit); an upload carries at most 64 envelopes in a 64 KiB body (base64).
CHECK_CHAINS = 64
CHECK_STEPS = 1_500
UPLOAD_ENVELOPES = 64
UPLOAD_BYTES = 45_000  # raw envelope bytes per upload: 60 KB in base64, with room for JSON
HAVE_MAX = 256  # chains named in one tail request's ``have``
DIGEST_BYTES = 16

Key = tuple[int, int, int, int]  # epoch, sender index, chain, step


def digest(envelope: bytes) -> bytes:
    """What an archive check names an envelope by: the first 16 bytes of its SHA-256."""
    return hashlib.sha256(envelope).digest()[:DIGEST_BYTES]


@dataclass(frozen=True, slots=True)
class Checked:
    """The answer to one archive check: the steps named that the archive lacks."""

    missing: list[Key]


@dataclass(frozen=True, slots=True)
class Uploaded:
    """The answer to one upload: counts, and ``(index, reason)`` of each refused."""

    archived: int
    duplicates: int
    pending: int
    refused: list[tuple[int, str]]


def gateway_base(url: str) -> str:
    """``scheme://host[:port]`` of a gateway URL.

    Raises:
        ConfigError: not an http(s) URL with a host.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"gateway URL must be http(s)://host[:port], not {url[:80]!r}")
    return f"{parts.scheme}://{parts.netloc}"


def signed_host(base: str) -> str:
    """The HOST a request to ``base`` signs: ``host[:port]``, lower case, without the
    scheme's default port (as the gateway's ``canonical_origin``).

    Raises:
        ConfigError: a port that is not a number.
    """
    parts = urlsplit(base)
    host = (parts.hostname or "").lower()
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        raise ConfigError(f"gateway URL has a bad port: {base[:80]!r}") from None
    if port is None or port == _DEFAULT_PORTS.get(parts.scheme):
        return host
    return f"{host}:{port}"


class GatewayHistory:
    """Fetches a conversation's archived envelopes after a per-conversation cursor.

    Raises:
        ConfigError: from the constructor, for a URL that is not http(s)://host[:port].
    """

    def __init__(
        self,
        base_url: str,
        identity: Identity,
        *,
        timeout: float = 10.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.base = gateway_base(base_url)
        self.host = signed_host(self.base)
        self.identity = identity
        self.timeout = timeout
        self._clock = clock
        self._cursors: dict[str, int] = {}

    def conversation(self, cid: str) -> list[bytes]:
        """Everything archived for ``cid`` after this object's own cursor, oldest first
        (at most MAX_PAGES pages a call): a reader for tools and tests; the device
        itself keeps its cursor durably and calls :meth:`since`.

        Raises:
            NotAuthorized: the gateway refused us (not a member, unknown bundle).
            TransportError: the gateway is unreachable or answered with an error.
            WireError: the answer is not the documented JSON.
        """
        out: list[bytes] = []
        for _ in range(MAX_PAGES):
            envelopes, after, more = self.since(cid, self._cursors.get(cid, 0), PAGE)
            out += envelopes
            self._cursors[cid] = after
            if not more:
                break
        return out

    def since(
        self,
        cid: str,
        after: int,
        limit: int,
        *,
        from_epoch: int = 0,
        have: Sequence[Key] = (),
    ) -> tuple[list[bytes], int, bool]:
        """One page of what was archived for ``cid`` after the gateway's cursor
        ``after``, oldest first: ``(envelopes, next cursor, more)``. The caller keeps
        the cursor (the device, durably: :meth:`device.client.Device` tail checks).
        With ``from_epoch``, the gateway starts no earlier than that epoch's first
        envelope: a device that joined late does not download what it cannot open.
        ``have``: ``(epoch, sender, chain, step)``, the highest step of each chain
        the caller holds contiguously (at most 256): the gateway skips those steps and
        still moves the cursor past them, so a device that missed nothing gets an
        empty page (docs/gateway.md, "Reconciliation").

        Raises:
            NotAuthorized: the gateway refused us (not a member, unknown bundle).
            TransportError: the gateway is unreachable or answered with an error.
            WireError: the answer is not the documented JSON.
        """
        validate_id(cid, "cid")
        limit = max(1, min(limit, PAGE))
        query = f"after={after}&limit={limit}"
        if from_epoch:
            query += f"&from_epoch={from_epoch}"
        if have:
            marks = ",".join(".".join(str(n) for n in key) for key in list(have)[:HAVE_MAX])
            query += f"&have={marks}"
        page = self._request("GET", f"/v1/conversations/{cid}/envelopes", query)
        try:
            items = page["items"]
            envelopes = [base64.b64decode(item["envelope"], validate=True) for item in items]
            return envelopes, int(page["next_after"]), bool(page["more"])
        except (KeyError, TypeError, ValueError):
            raise WireError("the gateway's history page is malformed") from None

    def rosters(self, cid: str, *, from_epoch: int = 0) -> list[bytes]:
        """Every roster the gateway archived for ``cid``, oldest epoch first: the chain a
        device verifies from epoch 0 before it trusts a roster (PROTOCOL.md §5.2).

        ``from_epoch`` names the first epoch the device lacks (it is sent as the query;
        the gateway may start there, today it answers them all). The rosters are
        checked by the engine like any other: a wrong answer is refused there.

        Raises:
            NotAuthorized: the gateway refused us (no archived roster lists us).
            TransportError: the gateway is unreachable or answered with an error.
            WireError: the answer is not the documented JSON.
        """
        validate_id(cid, "cid")
        answer = self._request(
            "GET", f"/v1/conversations/{cid}/rosters", f"from_epoch={max(0, from_epoch)}"
        )
        try:
            items = sorted(answer, key=lambda item: int(item["epoch"]))
            return [base64.b64decode(item["roster"], validate=True) for item in items]
        except (KeyError, TypeError, ValueError):
            raise WireError("the gateway's roster list is malformed") from None

    def deliveries(self, cid: str) -> list[bytes]:
        """The epoch-secret deliveries the gateway archived for us in ``cid``, oldest
        first (PROTOCOL.md §5.3): what a device whose inbox queue lost one fetches once it
        has entered an epoch without its secret. At most MAX_DELIVERY_PAGES pages.

        Raises:
            NotAuthorized, TransportError, WireError: as :meth:`rosters`.
        """
        validate_id(cid, "cid")
        out: list[bytes] = []
        after = 0
        for _ in range(MAX_DELIVERY_PAGES):
            page = self._request("GET", "/v1/grants", f"after={after}&limit=500")
            try:
                for item in page["items"]:
                    data = base64.b64decode(item["grant"], validate=True)
                    if item["cid"] == cid and is_delivery(data):
                        out.append(data)
                after, more = int(page["next_after"]), bool(page["more"])
            except (KeyError, TypeError, ValueError):
                raise WireError("the gateway's grant page is malformed") from None
            if not more:
                break
        return out

    def check_archive(self, cid: str, steps: Sequence[tuple[Key, bytes]]) -> Checked:
        """Which of our own envelopes the archive lacks: ``steps`` names each by its
        key and :func:`digest` (at most 64 chains, 1,500 steps: the caller batches).

        Raises:
            NotAuthorized: the gateway refused us (not a member, or a chain that is not
                ours by the rosters it archived).
            TransportError: the gateway is unreachable or answered with an error.
            WireError: the answer is not the documented JSON.
        """
        validate_id(cid, "cid")
        chains: dict[tuple[int, int, int], list[list[int | str]]] = {}
        for (epoch, sender, chain, step), hashed in steps:
            text = base64.b64encode(hashed).decode().rstrip("=")
            chains.setdefault((epoch, sender, chain), []).append([step, text])
        body = {
            "chains": [
                {"epoch": e, "sender": s, "chain": c, "steps": named}
                for (e, s, c), named in chains.items()
            ]
        }
        answer = self._request("POST", f"/v1/conversations/{cid}/archive/check", "", body)
        try:
            missing = [tuple(int(n) for n in key) for key in answer["missing"]]
            return Checked([(e, s, c, st) for e, s, c, st in missing])
        except (KeyError, TypeError, ValueError):
            raise WireError("the gateway's archive check answer is malformed") from None

    def upload(self, cid: str, envelopes: Sequence[bytes]) -> Uploaded:
        """Archive our own envelopes (1 to 64, at most ≈ 45 KB: the caller batches).

        Raises:
            NotAuthorized: the gateway refused us (not a member, or not our envelopes).
            TransportError: the gateway is unreachable or answered with an error.
            WireError: the answer is not the documented JSON.
        """
        validate_id(cid, "cid")
        body = {"envelopes": [base64.b64encode(e).decode() for e in envelopes]}
        answer = self._request("POST", f"/v1/conversations/{cid}/envelopes", "", body)
        try:
            return Uploaded(
                int(answer["archived"]),
                int(answer["duplicates"]),
                int(answer["pending"]),
                [(int(i), str(reason)) for i, reason in answer["refused"]],
            )
        except (KeyError, TypeError, ValueError):
            raise WireError("the gateway's upload answer is malformed") from None

    def _request(
        self,
        method: str,
        path: str,
        query: str,
        body: object = None,
    ) -> Any:  # noqa: ANN401 - JSON, checked by the caller
        data = None
        headers = {"Accept": "application/json"}
        if body is not None:
            # The signature covers the query, not the body: the body's digest goes in the
            # query so a signed request binds its body (docs/gateway.md, body_sha256).
            data = json.dumps(body, separators=(",", ":")).encode()
            bound = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).decode().rstrip("=")
            query = f"{query}&body_sha256={bound}" if query else f"body_sha256={bound}"
            headers["Content-Type"] = "application/json"
        stamp = str(int(self._clock()))
        nonce = secrets.token_urlsafe(16)  # the gateway accepts each nonce once
        signed = f"{SIGNING_LABEL}\n{method}\n{self.host}\n{path}?{query}\n{stamp}\n{nonce}"
        signature = base64.urlsafe_b64encode(self.identity.sign(signed.encode()))
        headers |= {
            "X-Fieldchat-Pid": self.identity.pid,
            "X-Fieldchat-Time": stamp,
            "X-Fieldchat-Nonce": nonce,
            "X-Fieldchat-Signature": signature.decode().rstrip("="),
        }
        request = urllib.request.Request(  # noqa: S310 - the scheme is checked in __init__
            f"{self.base}{path}?{query}", data=data, headers=headers, method=method
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:  # noqa: S310
                return json.loads(response.read(8 * 1024 * 1024))
        except urllib.error.HTTPError as exc:
            if exc.code in (401, 403):
                raise NotAuthorized(
                    f"the gateway refused our history request ({exc.code})"
                ) from None
            raise TransportError(f"the gateway answered {exc.code} to history") from None
        except (urllib.error.URLError, OSError) as exc:
            raise TransportError(f"cannot reach the gateway at {self.base}: {exc}") from exc
        except ValueError:
            raise WireError("the gateway's history answer is not JSON") from None

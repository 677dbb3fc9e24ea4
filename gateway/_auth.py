"""Who is calling: a web session (cookie) or a participant signing its request.

Browsers log in and carry the ``fc_session`` cookie; their account owns one or more
participant ids. Devices have no account: they sign each history request with their
identity key, which the gateway checks against the bundle it archived
(``p/{pid}/bundle``)::

    X-Fieldchat-Pid: <pid>
    X-Fieldchat-Time: <unix seconds>
    X-Fieldchat-Signature: <base64url Ed25519 signature, padding optional>

    signed bytes = "fieldchat-http-v1\\n" METHOD "\\n" PATH ["?" QUERY] "\\n" TIME

PATH and QUERY exactly as sent. The clock window is ``request_clock_skew_s``; requests
are reads, so a replay within the window reveals nothing new to the replayer.
"""

from __future__ import annotations

import base64
import binascii
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from starlette.requests import HTTPConnection

from gateway._accounts import SESSION_COOKIE, Accounts
from gateway._store import Account
from schemas import Bundle, is_valid_id
from schemas.crypto import ed25519_verify
from schemas.errors import CryptoError

__all__ = ["SIGNING_LABEL", "Caller", "authenticate", "signed_message"]

SIGNING_LABEL = "fieldchat-http-v1"
BundleLookup = Callable[[str], Awaitable[Bundle | None]]


@dataclass(frozen=True, slots=True)
class Caller:
    """An authenticated caller: the participant ids it may act and read for."""

    pids: frozenset[str]
    account: Account | None = None
    session_token: str | None = None


def signed_message(method: str, path: str, query: str, timestamp: str) -> bytes:
    """The bytes a device signs for one request (see the module docstring)."""
    target = f"{path}?{query}" if query else path
    return f"{SIGNING_LABEL}\n{method.upper()}\n{target}\n{timestamp}".encode()


async def authenticate(  # noqa: PLR0911 - each failed proof returns None
    conn: HTTPConnection,
    accounts: Accounts,
    bundle_of: BundleLookup,
    *,
    skew_s: int,
) -> Caller | None:
    """The caller of ``conn``, or ``None`` when it proves nothing."""
    token = conn.cookies.get(SESSION_COOKIE)
    if token:
        account = await accounts.session(token)
        if account is not None:
            return Caller(frozenset(account.pids), account, token)
    pid = conn.headers.get("x-fieldchat-pid")
    stamp = conn.headers.get("x-fieldchat-time", "")
    sig_text = conn.headers.get("x-fieldchat-signature", "")
    if not pid or not is_valid_id(pid) or not stamp.isdigit() or len(stamp) > 12:
        return None
    if abs(time.time() - int(stamp)) > skew_s:
        return None
    try:
        signature = base64.urlsafe_b64decode(sig_text + "=" * (-len(sig_text) % 4))
    except (binascii.Error, ValueError):
        return None
    bundle = await bundle_of(pid)
    if bundle is None:
        return None
    method = conn.scope.get("method", "GET")
    query = conn.scope.get("query_string", b"").decode("latin-1")
    try:
        ed25519_verify(
            bundle.ed25519, signature, signed_message(method, conn.url.path, query, stamp)
        )
    except CryptoError:
        return None
    return Caller(frozenset({pid}))

"""The web client's static files (``gateway/web/``), served with a strict
Content-Security-Policy.

Mounted last by the app factory: ``app.mount("/", web_app())``, so the API, ``/ws``,
``/healthz`` and ``/metrics`` match first and every other path is a file of the page.

The policy allows scripts, styles and connections from this origin only: no inline
script, no ``eval``, no third-party request; message text is inserted as text by the
page itself, so the policy is the second wall against script injection, not the first.
"""

from __future__ import annotations

from pathlib import Path

from starlette.middleware.gzip import GZipMiddleware
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["CONTENT_SECURITY_POLICY", "WEB_ROOT", "web_app"]

WEB_ROOT = Path(__file__).with_name("web")

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; manifest-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)

_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"permissions-policy", b"camera=(), microphone=(), geolocation=()"),
    # Revalidate on every load (ETag): a new deployment's JavaScript is never mixed
    # with a cached older module.
    (b"cache-control", b"no-cache"),
)


class _SecurityHeaders:
    """Adds the page's security headers to every response of the wrapped app."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                names = {k.lower() for k, _ in message.get("headers", [])}
                extra = [(k, v) for k, v in _HEADERS if k not in names]
                message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        await self.app(scope, receive, send_with_headers)


# The page's files, gzip-compressed for clients that accept it (every browser): the
# index, the modules and the style sheet (17 files) went from 145 KB to 57 KB on the
# wire, headers included (BENCHMARKS.md): most of a first load on a slow field link.
# Only here: API answers are small JSON and WebSocket frames are ciphertext. Level 6,
# not 9: 0.1 % larger, 11 % less CPU (≈ 12 ms for all 17 files on this machine).
GZIP_MIN_BYTES = 500  # smaller files would not shrink by the gzip header's cost
GZIP_LEVEL = 6


def web_app(root: Path = WEB_ROOT) -> ASGIApp:
    """The static files of the web client, gzip-compressed, behind the security headers.

    Raises:
        RuntimeError: ``root`` is not a directory (Starlette checks at creation).
    """
    files = StaticFiles(directory=root, html=True)
    return _SecurityHeaders(
        GZipMiddleware(files, minimum_size=GZIP_MIN_BYTES, compresslevel=GZIP_LEVEL)
    )

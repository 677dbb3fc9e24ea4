"""The ASGI application: ``create_app(settings, *, store=None, mqtt=None)``.

Resources (store, archiver, hub, worker threads) are opened in the lifespan and
kept on ``app.state.gateway``; nothing lives in module globals, so several apps can
run in one process (the tests do).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fieldchat.gateway._accounts import SESSION_COOKIE, Accounts
from fieldchat.gateway._api import router
from fieldchat.gateway._archiver import Archiver, MqttFactory
from fieldchat.gateway._auth import Authenticator, ReplayGuard
from fieldchat.gateway._errors import Forbidden, NameTaken, TooManyRequests
from fieldchat.gateway._hub import Hub
from fieldchat.gateway._metrics import GatewayMetrics, RejectSource
from fieldchat.gateway._settings import GatewaySettings
from fieldchat.gateway._sql import open_store
from fieldchat.gateway._state import Gateway
from fieldchat.gateway._store import GatewayStore
from fieldchat.gateway._web import web_app
from fieldchat.gateway._ws import RAW_SEND_KEY, websocket_endpoint
from fieldchat.schemas import Topics
from fieldchat.schemas.errors import (
    FieldchatError,
    InvalidId,
    ProtocolError,
    TransportError,
    WireError,
)

__all__ = ["create_app"]

log = logging.getLogger("fieldchat.gateway")
_UNSAFE = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def _status_of(exc: FieldchatError) -> int:
    if isinstance(exc, Forbidden):
        return 403
    if isinstance(exc, NameTaken):
        return 409
    if isinstance(exc, TooManyRequests):
        return 429
    if isinstance(exc, TransportError):
        return 503
    if isinstance(exc, (WireError, InvalidId, ProtocolError)):
        return 400
    return 400


class _Guard:
    """CSRF defence and HTTP latency, as one pure ASGI middleware.

    CSRF: the session cookie is SameSite=Strict, so other sites' requests do not carry
    it; as a second layer, a state-changing request with the cookie must come from
    this origin (``Origin``, when sent, names this host) and POST bodies must be JSON,
    which a cross-site form cannot send without a CORS preflight we never grant.
    """

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "websocket":
                # for the fan-out's direct writes (gateway._ws._Direct): the server's own
                # send, before Starlette's wrappers
                scope[RAW_SEND_KEY] = send
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        method = scope["method"]
        if method in _UNSAFE and f"{SESSION_COOKIE}=" in headers.get("cookie", ""):
            origin = headers.get("origin")
            if origin is not None and urlsplit(origin).netloc != headers.get("host", ""):
                await self._refuse(send, 403, "cross-origin request refused")
                return
            ctype = headers.get("content-type", "")
            if method == "POST" and not ctype.startswith("application/json"):
                await self._refuse(send, 415, "send JSON (application/json)")
                return
        status = 500
        start = time.perf_counter()

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", "unmatched")
            self.metrics.http_latency.labels(method, path, str(status)).observe(
                time.perf_counter() - start
            )

    @staticmethod
    async def _refuse(send: Send, status: int, detail: str) -> None:
        response = JSONResponse({"error": "csrf", "detail": detail}, status_code=status)
        await response({"type": "http"}, _no_receive, send)


async def _no_receive() -> Message:  # pragma: no cover - responses never read
    return {"type": "http.disconnect"}


class _BodyLimit:
    """At most ``max_bytes`` of request body on every route, as one pure ASGI middleware
    (so ``gateway run``, ``fieldchat up`` and any other server get it).

    A declared ``Content-Length`` over the limit is refused before a byte of the body is
    read; a body without one (chunked) is read here, counting, and refused as soon as it
    passes the limit, then handed to the app from memory. The 413 closes the connection
    (``Connection: close``), so the rest of a large body is never read either.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, metrics: GatewayMetrics) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length: bytes | None = None
        chunked = False
        for name, value in scope["headers"]:
            if name == b"content-length":
                length = value
            elif name == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
        if length is not None:
            if not length.isdigit() or int(length) > self.max_bytes:
                await self._refuse(send)
                return
            await self.app(scope, receive, send)
            return
        if not chunked:
            await self.app(scope, receive, send)
            return
        parts: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left: nothing to answer
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._refuse(send)
                return
            parts.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(parts)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, send: Send) -> None:
        self.metrics.reject(RejectSource.HTTP, "body_too_large")
        response = JSONResponse(
            {
                "error": "body_too_large",
                "detail": f"request bodies are limited to {self.max_bytes} bytes",
            },
            status_code=413,
            headers={"connection": "close"},
        )
        await response({"type": "http"}, _no_receive, send)


def create_app(
    settings: GatewaySettings,
    *,
    store: GatewayStore | None = None,
    mqtt: MqttFactory | None = None,
) -> FastAPI:
    """The gateway as an ASGI app.

    Args:
        settings: configuration (see :class:`GatewaySettings`).
        store: a history/account store; default opened from ``settings.database_url``
            (and closed at shutdown; an injected store is left open for its owner).
        mqtt: makes the archiver's MQTT client; default from the settings.
    """
    metrics = GatewayMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        own_store = store is None
        db: GatewayStore = open_store(settings.database_url) if store is None else store
        tasks: list[asyncio.Task[None]] = []
        archiver: Archiver | None = None
        try:
            await db.migrate()
            hub = Hub(db, metrics, poll_s=settings.feed_poll_s, queue_max=settings.ws_queue_max)
            archiver = Archiver(settings, db, metrics, listener=hub, mqtt=mqtt)
            accounts = Accounts(db, settings)
            app.state.gateway = Gateway(
                settings=settings,
                store=db,
                accounts=accounts,
                metrics=metrics,
                archiver=archiver,
                hub=hub,
                topics=Topics(settings.topic_prefix),
                auth=Authenticator(settings, accounts, archiver.bundle, ReplayGuard(db), metrics),
            )
            tasks = [
                asyncio.create_task(archiver.run(), name="fieldchat-archiver"),
                asyncio.create_task(hub.run(), name="fieldchat-hub"),
            ]
            yield
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if archiver is not None:
                archiver.close()
            if own_store:
                await db.close()

    app = FastAPI(
        title="fieldchat gateway",
        summary="Encrypted history, accounts and the WebSocket bridge of fieldchat.",
        description=(
            "The gateway never decrypts. History endpoints accept a web session cookie "
            "or a participant-signed request (headers `X-Fieldchat-Pid`, `X-Fieldchat-Time`, "
            "`X-Fieldchat-Nonce`, `X-Fieldchat-Signature`: Ed25519 over "
            "`fieldchat-http-v2\\nMETHOD\\nHOST\\nPATH?QUERY\\nTIME\\nNONCE`). Bytes are "
            "base64; cursors are server sequence numbers."
        ),
        version="1",
        lifespan=lifespan,
    )
    app.include_router(router)
    app.add_api_websocket_route("/ws", websocket_endpoint)
    app.add_middleware(_Guard, metrics=metrics)
    app.add_middleware(_BodyLimit, max_bytes=settings.max_body_bytes, metrics=metrics)  # outermost

    @app.exception_handler(FieldchatError)
    async def _fieldchat_error(_request: Request, exc: FieldchatError) -> JSONResponse:
        headers = None
        if isinstance(exc, TooManyRequests):
            metrics.reject(RejectSource.HTTP, exc.reason)
            headers = {"Retry-After": str(max(int(exc.retry_after + 0.999), 1))}
        return JSONResponse(
            {"error": exc.reason, "detail": str(exc)[:200]},
            status_code=_status_of(exc),
            headers=headers,
        )

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        problems: list[dict[str, Any]] = [
            {"loc": list(e.get("loc", ())), "msg": e.get("msg", "")} for e in exc.errors()
        ]
        return JSONResponse({"error": "invalid_request", "detail": problems}, status_code=422)

    @app.get("/healthz", tags=["operations"])
    async def healthz(request: Request) -> JSONResponse:
        """200 when the broker and the database are reachable, 503 otherwise."""
        gw: Gateway = request.app.state.gateway
        database = True
        try:
            await gw.store.ping()
        except TransportError:
            database = False
        broker = gw.archiver.connected.is_set()
        return JSONResponse(
            {"broker": broker, "database": database},
            status_code=200 if broker and database else 503,
        )

    @app.get("/metrics", tags=["operations"])
    async def prometheus() -> Response:
        """Prometheus text exposition."""
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    app.mount("/", web_app())  # the browser client; last, so API routes take precedence
    return app

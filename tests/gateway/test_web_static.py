"""The web client's files go out gzip-compressed to clients that accept it, with the
page's security headers, and as they are to clients that do not."""

from __future__ import annotations

import gzip

import httpx

from fieldchat.gateway._web import CONTENT_SECURITY_POLICY, WEB_ROOT, web_app


async def _get(path: str, accept: str) -> tuple[httpx.Response, bytes]:
    """The response and its body as sent (not decoded)."""
    transport = httpx.ASGITransport(app=web_app())
    async with (
        httpx.AsyncClient(transport=transport, base_url="http://gw") as http,
        http.stream("GET", path, headers={"accept-encoding": accept}) as r,
    ):
        return r, b"".join([chunk async for chunk in r.aiter_raw()])


async def test_the_page_and_its_modules_are_gzipped_for_clients_that_accept_it() -> None:
    for path, file in (
        ("/", "index.html"),
        ("/js/engine.js", "js/engine.js"),
        ("/app.css", "app.css"),
    ):
        plain = (WEB_ROOT / file).read_bytes()
        r, sent = await _get(path, "gzip, deflate, br")
        assert r.status_code == 200
        assert r.headers["content-encoding"] == "gzip"
        assert "accept-encoding" in r.headers["vary"].lower()
        assert r.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
        assert gzip.decompress(sent) == plain
        assert len(sent) < len(plain) / 2


async def test_a_client_without_gzip_gets_the_files_as_they_are() -> None:
    r, sent = await _get("/js/engine.js", "identity")
    assert r.status_code == 200
    assert "content-encoding" not in r.headers
    assert sent == (WEB_ROOT / "js/engine.js").read_bytes()

"""The page itself: its Content-Security-Policy, size, requests, fingerprints and the
warning shown when a member's key changes."""

from __future__ import annotations

import base64
import os
import re
from urllib.parse import urlsplit

import httpx
import pytest

from fieldchat.device.identity import Identity
from fieldchat.gateway import claim_message
from fieldchat.gateway._web import CONTENT_SECURITY_POLICY, WEB_ROOT
from fieldchat.schemas import Bundle
from tests.web._stack import ARTIFACTS
from tests.web._ui import PASSWORD, PHONE, WebUser

pytestmark = pytest.mark.chromium

MAX_PAGE_BYTES = 150_000


def test_csp_header_and_no_inline_script(stack):
    r = httpx.get(stack.base + "/", timeout=10)
    assert r.status_code == 200
    csp = r.headers["content-security-policy"]
    assert csp == CONTENT_SECURITY_POLICY
    assert "script-src 'self'" in csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert r.headers["x-content-type-options"] == "nosniff"
    for path in WEB_ROOT.rglob("*.html"):
        html = path.read_text()
        assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", html), path
        assert not re.search(r"\son[a-z]+\s*=", html, re.IGNORECASE), path
    for path in WEB_ROOT.rglob("*.js"):
        source = path.read_text()
        # message text reaches the DOM as text only
        assert not re.search(r"innerHTML|outerHTML|insertAdjacentHTML|document\.write", source)
        assert "eval(" not in source and "new Function" not in source


def test_page_is_small_and_makes_no_third_party_request(stack, browser):
    user = WebUser(browser, stack.base, "grace")
    try:
        sizes: list[int] = []
        user.page.on("response", lambda r: sizes.append(len(r.body())) if r.ok else None)
        user.register()
        assert sum(sizes) < MAX_PAGE_BYTES
        origins = {
            urlsplit(u)._replace(path="", query="", fragment="").geturl()
            for u in user.requests
            if not u.startswith("data:")
        }
        assert origins == {stack.base}
        # and the WebSocket to the same host
        assert any(f.startswith('{"op":"hello"') for f in user.frames)
        assert not user.errors
    finally:
        user.close()


def test_fingerprints_stay_through_a_prekey_rotation(stack, browser):
    """The fingerprint is the identity key's (PROTOCOL.md §2.3): kim rotates her prekey
    (a newer bundle of the same pid, §2.5) and the page shows the same fingerprint, no
    warning, and keeps it verified."""
    kim_identity = Identity.from_seed(bytes(range(32)), created_at=1_000)
    first = kim_identity.bundle
    with httpx.Client(base_url=stack.base, timeout=20) as kim:
        assert (
            kim.post("/v1/accounts", json={"username": "kim", "password": PASSWORD}).status_code
            == 201
        )
        assert (
            kim.post("/v1/session", json={"username": "kim", "password": PASSWORD}).status_code
            == 200
        )

        def register(bundle: Bundle) -> None:
            challenge = kim.post("/v1/me/participants/challenge", json={}).json()
            signed = claim_message(
                stack.base, challenge["account"], kim_identity.pid, challenge["challenge"]
            )
            r = kim.post(
                "/v1/me/participants",
                json={
                    "bundle": base64.b64encode(bundle.to_bytes()).decode(),
                    "challenge": challenge["challenge"],
                    "signature": base64.b64encode(kim_identity.sign(signed)).decode(),
                },
            )
            assert r.status_code == 201, r.text

        register(first)
        alice = WebUser(browser, stack.base, "alice", viewport=PHONE).register()
        try:
            cid = alice.create([kim_identity.pid])
            alice.page.click("#members-toggle")
            row = f'#member-list li[data-pid="{kim_identity.pid}"]'
            shown = alice.page.text_content(f'[data-fingerprint="{kim_identity.pid}"]')
            assert shown == first.fingerprint()
            alice.page.click(f"{row} button:has-text('Mark verified')")
            alice.page.wait_for_selector(f"{row} .badge.pq:has-text('verified')")
            kim_identity.rotate(2_000, os.urandom)
            register(kim_identity.bundle)
            alice.reload()
            alice.open(cid)
            alice.page.click("#members-toggle")
            assert alice.page.text_content(f'[data-fingerprint="{kim_identity.pid}"]') == shown
            assert "verified" in str(alice.page.text_content(row))
            ARTIFACTS.mkdir(exist_ok=True)
            alice.page.screenshot(path=str(ARTIFACTS / "web-fingerprint-phone.png"))
        finally:
            alice.close()

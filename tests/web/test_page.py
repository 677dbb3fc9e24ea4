"""The page itself: its Content-Security-Policy, size, requests, fingerprints and the
warning shown when a member's key changes."""

from __future__ import annotations

import base64
import re
from urllib.parse import urlsplit

import httpx
import pytest

from fieldchat.device.identity import Identity
from fieldchat.gateway import claim_message
from fieldchat.gateway._web import CONTENT_SECURITY_POLICY, WEB_ROOT
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


def test_fingerprints_and_key_change_warning(stack, browser):
    # kim: a participant whose X25519 key changes (same Ed25519 key, so the same pid;
    # an ML-KEM key, as the default policy admits only post-quantum members)
    seed, kem = bytes(range(32)), b"\x03" * 64
    first = Identity(
        ed25519_seed=seed, x25519_private=b"\x01" * 32, mlkem_seed=kem, created_at=1_000
    )
    second = Identity(
        ed25519_seed=seed, x25519_private=b"\x02" * 32, mlkem_seed=kem, created_at=2_000
    )
    assert first.pid == second.pid
    with httpx.Client(base_url=stack.base, timeout=20) as kim:
        assert (
            kim.post("/v1/accounts", json={"username": "kim", "password": PASSWORD}).status_code
            == 201
        )
        assert (
            kim.post("/v1/session", json={"username": "kim", "password": PASSWORD}).status_code
            == 200
        )

        def register(identity: Identity) -> None:
            challenge = kim.post("/v1/me/participants/challenge", json={}).json()
            signed = claim_message(
                stack.base, challenge["account"], identity.pid, challenge["challenge"]
            )
            r = kim.post(
                "/v1/me/participants",
                json={
                    "bundle": base64.b64encode(identity.bundle.to_bytes()).decode(),
                    "challenge": challenge["challenge"],
                    "signature": base64.b64encode(identity.sign(signed)).decode(),
                },
            )
            assert r.status_code == 201, r.text

        register(first)
        alice = WebUser(browser, stack.base, "alice", viewport=PHONE).register()
        try:
            cid = alice.create([first.pid])
            alice.page.click("#members-toggle")
            shown = alice.page.text_content(f'[data-fingerprint="{first.pid}"]')
            assert shown == first.bundle.fingerprint()
            assert alice.page.is_hidden("#key-warning")
            register(second)
            alice.reload()
            alice.open(cid)
            alice.page.wait_for_selector("#key-warning:not([hidden])")
            warning = str(alice.page.text_content("#key-warning"))
            assert first.pid[:8] in warning and "changed" in warning
            alice.page.click("#members-toggle")
            row = f'#member-list li[data-pid="{first.pid}"]'
            assert alice.page.text_content(f'[data-fingerprint="{first.pid}"]') == (
                second.bundle.fingerprint()
            )
            assert "key changed" in str(alice.page.text_content(row))
            ARTIFACTS.mkdir(exist_ok=True)
            alice.page.screenshot(path=str(ARTIFACTS / "web-key-change-phone.png"))
            alice.page.click(f"{row} button:has-text('Mark verified')")
            alice.page.wait_for_selector("#key-warning", state="hidden")
            assert "verified" in str(alice.page.text_content(row))
        finally:
            alice.close()

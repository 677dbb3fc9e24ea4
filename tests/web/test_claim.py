"""The browser proves that it holds its participant's key when it registers it, and
again when the gateway reports the participant as unverified (a claim made before
proofs existed, issue 13): the page still registers, connects and chats."""

from __future__ import annotations

import sqlite3
from typing import Any

import httpx
import pytest

from tests.web._stack import wait_until
from tests.web._ui import PASSWORD, WebUser

pytestmark = pytest.mark.chromium


def _me(stack, name: str) -> dict[str, Any]:
    with httpx.Client(base_url=stack.base, timeout=20) as http:
        r = http.post("/v1/session", json={"username": name, "password": PASSWORD})
        assert r.status_code == 200, r.text
        return dict(r.json())


def test_the_page_proves_its_participant_at_registration_and_when_unverified(stack, browser):
    alice = WebUser(browser, stack.base, "alice").register()
    bob = WebUser(browser, stack.base, "bob").register()
    try:
        assert _me(stack, "alice")["pids"] == [alice.pid]
        claims = [u for u in alice.requests if u.endswith("/v1/me/participants/challenge")]
        assert len(claims) == 1
        # the row of alice's participant as a schema-1 gateway left it: no proof
        with sqlite3.connect(stack.db_path) as db:
            db.execute("UPDATE participants SET verified = 0 WHERE pid = ?", (alice.pid,))
        assert _me(stack, "alice")["unverified"] == [alice.pid]
        cookie = next(c for c in alice.context.cookies() if c["name"] == "fc_session")

        def page_session_sees_it() -> bool:  # sessions are cached for 2 s
            with httpx.Client(base_url=stack.base, cookies={"fc_session": cookie["value"]}) as h:
                return h.get("/v1/me").json()["unverified"] == [alice.pid]

        wait_until(page_session_sees_it, "the page's session to see the unverified row")
        alice.reload()  # the page sees it in /v1/me and proves it again
        me = _me(stack, "alice")
        assert me["pids"] == [alice.pid] and me["unverified"] == []
        cid = alice.create([bob.pid])
        alice.send("proved and chatting")
        bob.wait_conversation(cid)
        bob.open(cid)
        assert "proved and chatting" in bob.wait_texts(["proved and chatting"])
        assert not alice.errors and not bob.errors
    finally:
        alice.close()
        bob.close()

"""A person using the chat page in Chromium: each user has a browser context of their own
(own IndexedDB, own cookie), and every WebSocket frame the page sends or receives is
recorded so the tests can look for plaintext on the wire.

With ``relay=True`` the page's ``/ws`` runs through the test (Playwright's WebSocket
routing, to the real gateway): a test can then stand in for a hostile network or
gateway, dropping frames on their way to the page (:attr:`WebUser.drop`) or adding its
own (:meth:`WebUser.inject`), through the page's own receive path."""

from __future__ import annotations

import base64
import json
import re
import time
from collections.abc import Callable
from typing import Any

from tests.web._stack import DEADLINE_S, NO_MLKEM

TIMEOUT_MS = DEADLINE_S * 1000
PASSWORD = "correct horse battery staple"
PHONE = {"width": 390, "height": 780}


class WebUser:
    def __init__(
        self,
        browser: Any,
        base: str,
        name: str,
        *,
        viewport: dict[str, int] | None = None,
        relay: bool = False,
        mlkem: bool = True,
    ) -> None:
        self.name = name
        self.base = base
        self.context = browser.new_context(viewport=viewport or {"width": 1100, "height": 760})
        if not mlkem:  # a browser whose WebCrypto has no ML-KEM-768
            self.context.add_init_script(NO_MLKEM)
        self.context.set_default_timeout(TIMEOUT_MS)
        self.frames: list[str] = []
        self.dialogs: list[str] = []
        self.errors: list[str] = []
        self.requests: list[str] = []
        self.page = self.context.new_page()
        self._watch(self.page)
        self.pid = ""
        self.socket: Any = None  # the page's side of the relayed /ws
        self.sent: list[dict[str, Any]] = []  # frames the page sent through the relay
        self.received: list[dict[str, Any]] = []  # frames the gateway sent it
        self.dropped: list[dict[str, Any]] = []
        self.drop: Callable[[dict[str, Any]], bool] = lambda frame: False
        if relay:
            self.page.route_web_socket(re.compile(r"/ws\?"), self._relay)

    def _relay(self, ws: Any) -> None:
        server = ws.connect_to_server()
        self.socket = ws

        def to_server(message: str | bytes) -> None:
            self.sent.append(json.loads(message))
            server.send(message)

        def to_page(message: str | bytes) -> None:
            parsed = json.loads(message)
            frames = parsed if isinstance(parsed, list) else [parsed]
            self.received += frames
            kept = [f for f in frames if not self.drop(f)]
            self.dropped += [f for f in frames if self.drop(f)]
            if kept:
                ws.send(json.dumps(kept if isinstance(parsed, list) else kept[0]))

        ws.on_message(to_server)
        server.on_message(to_page)

    def inject(self, frame: dict[str, Any]) -> None:
        """A frame for the page as if the gateway sent it (``relay=True``)."""
        assert self.socket is not None, "relay=True, and the page connected"
        self.socket.send(json.dumps(frame))

    def relay_until(self, predicate: Callable[[], Any], what: str) -> None:
        """Poll ``predicate`` with a deadline while the relay runs: Playwright calls the
        relay only while the test is inside one of its calls (here a short wait)."""
        end = time.monotonic() + DEADLINE_S
        while not predicate():
            if time.monotonic() > end:
                raise AssertionError(f"timed out waiting for {what}")
            self.page.wait_for_timeout(50)

    def _watch(self, page: Any) -> None:
        page.on("websocket", self._on_socket)
        page.on("dialog", self._on_dialog)
        page.on("pageerror", lambda e: self.errors.append(str(e)))
        page.on("request", lambda r: self.requests.append(r.url))

    def _on_dialog(self, dialog: Any) -> None:
        self.dialogs.append(dialog.message)
        dialog.dismiss()

    def _on_socket(self, ws: Any) -> None:
        ws.on("framesent", lambda payload: self.frames.append(str(payload)))
        ws.on("framereceived", lambda payload: self.frames.append(str(payload)))

    # -- account ----------------------------------------------------------------------------

    def register(self) -> WebUser:
        self.page.goto(self.base + "/")
        self.page.fill("#username", self.name)
        self.page.fill("#password", PASSWORD)
        self.page.click("#register-button")
        self.page.wait_for_selector("#me-pid:not(:empty)", state="attached")
        self.pid = str(self.page.text_content("#me-pid")).strip()
        self.wait_online()
        return self

    def wait_online(self) -> None:
        self.page.wait_for_selector("#connection.online")

    def reload(self) -> None:
        self.page.reload()
        self.page.wait_for_selector("#me-pid:not(:empty)", state="attached")
        self.wait_online()

    # -- conversations ----------------------------------------------------------------------

    def create(self, pids: list[str]) -> str:
        self.page.fill("#new-members", ", ".join(pids))
        self.page.click("#new-conv button")
        self.page.wait_for_selector("#conversations li.active", state="attached")
        return str(self.page.get_attribute("#conversations li.active", "data-cid"))

    def open(self, cid: str) -> None:
        self.page.click(f'#conversations li[data-cid="{cid}"]')
        self.page.wait_for_selector(f'#conversations li.active[data-cid="{cid}"]', state="attached")

    def wait_conversation(self, cid: str) -> None:
        self.page.wait_for_selector(f'#conversations li[data-cid="{cid}"]')

    def send(self, text: str) -> None:
        self.page.fill("#compose", text)
        self.page.press("#compose", "Enter")

    def texts(self) -> list[str]:
        return list(
            self.page.eval_on_selector_all(
                "#messages li:not(.note) .text", "els => els.map(e => e.textContent)"
            )
        )

    def wait_texts(self, wanted: list[str]) -> list[str]:
        """Wait until every text in ``wanted`` is shown; return all shown texts."""
        self.page.wait_for_function(
            "want => { const shown = [...document.querySelectorAll("
            "'#messages li:not(.note) .text')].map(e => e.textContent);"
            " return want.every(w => shown.includes(w)); }",
            arg=wanted,
        )
        return self.texts()

    def state_of(self, text: str) -> str:
        return str(
            self.page.evaluate(
                "t => { for (const li of document.querySelectorAll('#messages li.mine')) {"
                " if (li.querySelector('.text').textContent === t)"
                " return li.querySelector('.state').dataset.state; } return null; }",
                text,
            )
        )

    def wait_state(self, text: str, state: str) -> None:
        self.page.wait_for_function(
            "([t, s]) => [...document.querySelectorAll('#messages li.mine')].some(li =>"
            " li.querySelector('.text').textContent === t &&"
            " li.querySelector('.state').dataset.state === s)",
            arg=[text, state],
        )

    def unread(self, cid: str) -> int:
        found = self.page.query_selector(f'#conversations li[data-cid="{cid}"] .unread')
        return int(found.inner_text()) if found else 0

    # -- the wire ---------------------------------------------------------------------------

    def wire_bytes(self) -> list[bytes]:
        """Every frame as sent or received, plus the decoded base64 fields inside it."""
        out: list[bytes] = []
        for frame in self.frames:
            out.append(frame.encode())
            try:
                parsed = json.loads(frame)
            except ValueError:
                continue
            for key in ("data", "status"):
                value = parsed.get(key) if isinstance(parsed, dict) else None
                if isinstance(value, str) and re.fullmatch(r"[A-Za-z0-9+/=]*", value):
                    out.append(base64.b64decode(value))
        return out

    def close(self) -> None:
        self.context.close()

"""The web client in headless Debian Chromium against a real gateway and broker (loopback).

Prints one JSON object on its last line (keys of issue 6; results in BENCHMARKS.md):

- ``page_bytes``: bytes transferred (headers and bodies, as Chromium counts them) for the
  first load of the page with an empty cache;
- ``time_to_first_message_ms``: from clicking "Log in" until the first decrypted
  message is shown (roster chain fetched and verified, grant opened, history page
  fetched, envelope opened), median of ``--rounds`` (5) fresh conversations;
- ``decrypt_100_history_ms``: a participant logs in to a conversation with 100 messages
  in the gateway's history that it never opened: from clicking "Log in" (then the
  conversation) until all 100 are decrypted and shown.

Usage: python bench/web.py [--rounds N]   (needs /usr/bin/chromium and playwright)
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fieldchat.device.client import Device
from tests.web._stack import CHROMIUM, CHROMIUM_ARGS, Stack, chromium_missing, running_stack
from tests.web._ui import PASSWORD, WebUser

if TYPE_CHECKING:
    from playwright.sync_api import Browser


def page_bytes(browser: Browser, base: str) -> int:
    context = browser.new_context()
    page = context.new_page()
    cdp = context.new_cdp_session(page)
    cdp.send("Network.enable")
    cdp.send("Network.setCacheDisabled", {"cacheDisabled": True})
    sizes: dict[str, float] = {}
    cdp.on(
        "Network.loadingFinished",
        lambda e: sizes.__setitem__(e["requestId"], e["encodedDataLength"]),
    )
    page.goto(base + "/", wait_until="networkidle")
    page.wait_for_selector("#login:not([hidden])")
    context.close()
    return int(sum(sizes.values()))


def log_out(user: WebUser) -> None:
    user.page.click("#logout")
    user.page.wait_for_selector("#login:not([hidden])")


def log_in(user: WebUser) -> float:
    """Log in again; returns the monotonic time of the click on "Log in"."""
    user.page.fill("#username", user.name)
    user.page.fill("#password", PASSWORD)
    start = time.perf_counter()
    user.page.click("#login-button")
    return start


def archived(stack: Stack, cid: str) -> int:
    with sqlite3.connect(stack.db_path) as db:
        return int(db.execute("SELECT count(*) FROM envelopes WHERE cid = ?", (cid,)).fetchone()[0])


def wait_archived(stack: Stack, cid: str, n: int) -> None:
    deadline = time.monotonic() + 60
    while archived(stack, cid) < n:
        if time.monotonic() > deadline:
            raise RuntimeError("the gateway did not archive the messages")
        time.sleep(0.05)


def conversation_for(user: WebUser, device: Device, texts: list[str]) -> str:
    """The device founds a conversation with ``user`` (logged out) and sends ``texts``."""
    log_out(user)
    cid = str(device.create_conversation([user.pid], timeout=20))
    device.send_many(cid, texts)
    return cid


def first_message_ms(browser: Browser, stack: Stack, device: Device, n: int) -> float:
    user = WebUser(browser, stack.base, f"first{n}").register()
    try:
        cid = conversation_for(user, device, [f"first message {n}"])
        wait_archived(stack, cid, 1)
        start = log_in(user)
        user.page.click(f'#conversations li[data-cid="{cid}"]')
        user.page.wait_for_selector("#messages li .text")
        return (time.perf_counter() - start) * 1000
    finally:
        user.close()


def history_ms(browser: Browser, stack: Stack, device: Device) -> float:
    user = WebUser(browser, stack.base, "history").register()
    try:
        texts = [f"history {i:03d}" for i in range(100)]
        cid = conversation_for(user, device, texts)
        wait_archived(stack, cid, 100)
        # From the click on "Log in": the bridge's backfill brings the 100 envelopes
        # (none opened before), the page opens them in order and shows them.
        start = log_in(user)
        user.page.click(f'#conversations li[data-cid="{cid}"]')
        user.page.wait_for_function(
            "n => document.querySelectorAll('#messages li:not(.note) .text').length >= n", arg=100
        )
        elapsed = (time.perf_counter() - start) * 1000
        if user.texts() != texts:
            raise RuntimeError("history shown out of order or incomplete")
        return elapsed
    finally:
        user.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    missing = chromium_missing()
    if missing:
        sys.exit(f"bench/web.py: {missing}")
    # Imported here: playwright is optional, and its absence is reported above.
    from playwright.sync_api import sync_playwright  # noqa: PLC0415

    with (
        tempfile.TemporaryDirectory() as tmp,
        running_stack(Path(tmp)) as stack,
        sync_playwright() as pw,
    ):
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            device = stack.device("bench-device")
            size = page_bytes(browser, stack.base)
            print(f"page: {size} bytes transferred on first load")
            firsts = [first_message_ms(browser, stack, device, n) for n in range(args.rounds)]
            print("login to first message (ms):", ", ".join(f"{t:.0f}" for t in firsts))
            hist = history_ms(browser, stack, device)
            print(f"100 history messages decrypted and shown: {hist:.0f} ms")
        finally:
            browser.close()
    print(
        json.dumps(
            {
                "page_bytes": size,
                "time_to_first_message_ms": round(statistics.median(firsts), 1),
                "decrypt_100_history_ms": round(hist, 1),
            }
        )
    )


if __name__ == "__main__":
    main()

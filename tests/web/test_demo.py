"""``fieldchat demo`` seen by a newcomer in Chromium: register, get invited, read along."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from fieldchat.demo import LINES
from tests.web._ui import WebUser

pytestmark = pytest.mark.chromium

FIELDCHAT = Path(sys.executable).with_name("fieldchat")


def test_demo_messages_appear_in_the_browser(browser: Any, tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [
            FIELDCHAT,
            "demo",
            "--data-dir",
            str(tmp_path / "data"),
            "--mqtt-port",
            "0",
            "--http-port",
            "0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    user: WebUser | None = None
    try:
        lines: list[str] = []
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and not any("Ctrl-C" in line for line in lines):
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
        web = re.search(r"web\s+(http://\S+)/", "".join(lines))
        assert web, "".join(lines)
        user = WebUser(browser, web.group(1), "newcomer").register()
        # The pump invites every registered web user; the conversation shows up by itself.
        user.page.wait_for_selector("#conversations li[data-cid]", timeout=60_000)
        cid = str(user.page.get_attribute("#conversations li[data-cid]", "data-cid"))
        user.open(cid)
        demo_texts = sorted({text for _, text in LINES})
        user.page.wait_for_function(
            "want => [...document.querySelectorAll('#messages li:not(.note) .text')]"
            ".some(e => want.includes(e.textContent.replace(/ #\\d+$/, '')))",
            arg=demo_texts,
            timeout=60_000,
        )
        shown = user.texts()  # each demo line carries its number: none may show twice
        assert shown and len(shown) == len(set(shown))
        assert all(re.sub(r" #\d+$", "", text) in demo_texts for text in shown)
        Path("artifacts").mkdir(exist_ok=True)
        user.page.screenshot(path="artifacts/demo-conversation.png")
    finally:
        if user is not None:
            user.close()
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out

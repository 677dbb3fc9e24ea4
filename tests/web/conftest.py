"""Fixtures of the browser tests: headless Debian Chromium (never a downloaded browser)
through Playwright, and a fresh broker + gateway stack per test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.web._stack import CHROMIUM, CHROMIUM_ARGS, Stack, chromium_missing, running_stack


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    reason = chromium_missing()
    if reason is None:
        return
    for item in items:
        if "chromium" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=reason))


# Module scope: Playwright's sync API runs an event loop in the main thread while it is
# open; closing it after each module keeps later asyncio tests (pytest-asyncio) working
# whatever order the tests run in.
@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    with running_stack(tmp_path) as running:
        yield running

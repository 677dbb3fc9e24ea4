"""The browser's protocol code (gateway/web/js) against the project's vectors, in real
headless Chromium: the same file tests/test_vectors.py checks in Python."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

VECTORS = json.loads((Path(__file__).parents[1] / "vectors" / "protocol.json").read_text())

pytestmark = pytest.mark.chromium


@pytest.fixture(scope="module")
def results(browser, tmp_path_factory):
    from tests.web._stack import running_stack

    with running_stack(tmp_path_factory.mktemp("vectors")) as stack:
        page = browser.new_page()
        try:
            page.goto(f"{stack.base}/_tests/harness.html")
            found = page.evaluate(
                "async (v) => (await import('/_tests/vectors.js')).check(v)", VECTORS
            )
        finally:
            page.close()
    return {r["name"]: r for r in found}


def test_every_vector_check_ran(results):
    names = list(results)
    assert len(names) >= 30
    assert any(n.startswith("identity web") for n in names)
    assert any("X25519 grant" in n for n in names)
    # Post-quantum browsers (PROTOCOL.md §2.1, §5.3): ML-KEM-768 keys from the seed, the
    # hybrid grant and the hybrid KEM in both modes, with the same bytes as Python.
    assert any(n.startswith("identity web_pq") for n in names)
    assert any("opens Python's hybrid grant" in n for n in names)
    assert sum(n.startswith("hybrid KEM ") for n in names) == len(VECTORS["hybrid_kem"])
    # The rules of issue 13 a browser must share with Python (PROTOCOL.md §5.2, §5.3, §8).
    assert sum(n.startswith("roster chain:") for n in names) == len(VECTORS["roster_chain"]) + 3
    assert any(n.startswith("chain grant: ends") for n in names)
    assert any(n.startswith("limits:") for n in names)


def test_vectors_pass_in_chromium(results):
    failed = {n: r["detail"] for n, r in results.items() if not r["ok"]}
    assert not failed

"""docs/security.md names only test files and tests that exist: its table of attack
classes stays true as tests move."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = (ROOT / "docs" / "security.md").read_text()


def test_every_test_file_and_test_named_exists():
    files = set(re.findall(r"`(tests/[\w/]+\.py)", DOC))
    assert len(files) >= 10
    sources = {}
    for path in files:
        assert (ROOT / path).is_file(), path
        sources[path] = (ROOT / path).read_text()
    for path, name in re.findall(r"`(tests/[\w/]+\.py)::(test_\w+)`", DOC):
        assert re.search(rf"def {name}\b", sources[path]), f"{path}::{name}"
    everything = "".join(sources.values())
    for name in re.findall(r"`(test_\w+)`", DOC):  # named without a file: in one of them
        assert re.search(rf"def {name}\b", everything), name

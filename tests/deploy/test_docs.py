"""docs/deploy.md names only files that exist, and describes every recipe in deploy/."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = (ROOT / "docs" / "deploy.md").read_text()


def test_every_deploy_path_in_the_doc_exists():
    for path in set(re.findall(r"`((?:deploy|tests|docs|broker|gateway)/[\w./@-]+)`", DOC)):
        assert (ROOT / path).exists(), path


# The recipes of this page; deploy/nats/ belongs to the NATS-cluster work (issue 7 item 4).
RECIPES = ("Containerfile", "nginx", "systemd", "k8s")


def test_every_recipe_file_is_described():
    for path in (
        p for r in RECIPES for p in [ROOT / "deploy" / r, *(ROOT / "deploy" / r).rglob("*")]
    ):
        if path.is_file():
            assert path.name in DOC, f"docs/deploy.md does not mention {path.name}"

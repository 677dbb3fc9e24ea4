"""bench/membership.py (issue 16): it runs, counts what it claims and its v1 model holds."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_membership_bench_measures_v1_and_its_model_agrees() -> None:
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "membership.py"),
            "--sizes",
            "2,10,200",
            "--max-n",
            "10",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    # v1: adding one to 10 is the roster, the earlier roster to the newcomer's inbox
    # and 11 x 10 grants (PROTOCOL.md §6.1); removing one from 10 is the roster and 9 x 8.
    assert result["membership_publications_n10"] == 1 + 1 + 11 * 10
    assert result["membership_remove_publications_n10"] == 1 + 9 * 8
    assert result["membership_n10_source"] == "measured"
    for key in ("membership_bytes_n10", "membership_remove_bytes_n10"):
        model = result[f"v1_model_{key}"]
        assert abs(model - result[key]) / result[key] < 0.01
    # Beyond --max-n the figures are the model's, and say so.
    assert result["membership_n200_source"] == "model"
    assert result["v1_membership_bytes_n200"] > 200 * 201 * 1300

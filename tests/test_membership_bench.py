"""bench/membership.py (issue 16): it runs, counts what it claims, and v2 meets the
issue's targets with n - 1 deliveries per change where v1 made n(n - 1) grants."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_membership_bench_counts_one_delivery_per_member_and_meets_the_targets() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "membership.py"), "--sizes", "2,10,50"],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["protocol"] == "v2"
    # Adding one to 10: the roster, the earlier roster to the newcomer's inbox, one
    # delivery to each of the 10 others and the newcomer's JOINED control; removing one
    # from 10: the roster and 8 deliveries.
    assert result["membership_publications_n10"] == 1 + 1 + 10 + 1
    assert result["membership_remove_publications_n10"] == 1 + 8
    # Under sign_every = 4 every remaining member states its ends in one ENDS control.
    assert result["membership_remove_ends_controls_n10_sign4"] == 9
    for n, target in ((10, 16_500), (50, 76_500)):
        assert result[f"membership_bytes_n{n}"] <= target
        assert result[f"membership_remove_bytes_n{n}"] <= target
        assert result[f"membership_remove_bytes_n{n}_sign4"] <= target
    # v1 as measured through its engine (recorded in the bench), for comparison.
    assert result["v1_membership_bytes_n10"] == 156_853
    assert result["v1_n10_source"] == "measured"

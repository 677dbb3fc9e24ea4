"""The chaos soak (``bench/soak.py``, issue 14): its rules for lost, duplicated and
out-of-order messages and for the archive, its reproducible schedule, and the short
soak on both topologies — devices chatting while brokers, gateways and devices are
killed and restarted must lose nothing, show nothing twice or out of order, and the
archive must hold exactly what the senders accepted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench._soak.chaos import BACK_S, DOWN_S, LEAD_S, Kind, schedule
from bench._soak.check import (
    ArchivedEnvelope,
    SentMessage,
    check_archive,
    check_screens,
    parse_screen,
    soak_text,
)

ROOT = Path(__file__).resolve().parent.parent
SOAK = ROOT / "bench" / "soak.py"
SEED = 14  # the number; a failing run is repeated with the same schedule
TEXT, RECEIPT = 1, 2


def _line(cid: str, device: str, n: int) -> str:
    return json.dumps(
        {"type": "message", "cid": cid, "sender": "pid", "text": soak_text(device, n)}
    )


def _sent(device: str, cid: str, n: int, index: int = 0) -> SentMessage:
    return SentMessage(device, cid, n, 0, index, 0, n - 1)


# -- the checks --------------------------------------------------------------------------


def test_a_clean_screen_has_nothing_lost_duplicated_or_out_of_order():
    sent = [_sent("a", "g", n) for n in (1, 2, 3)]
    screen = parse_screen(
        [
            json.dumps({"type": "connected", "protocol": "5"}),
            *(_line("g", "a", n) for n in (1, 2, 3)),
        ]
    )
    verdict = check_screens(sent, {"g": ["a", "b"]}, {"a": ([], 0), "b": screen})
    assert verdict["b"].to_json() == {
        "expected": 3,
        "shown": 3,
        "lost": 0,
        "duplicated": 0,
        "out_of_order": 0,
        "unexpected": 0,
        "unreadable_lines": 0,
    }
    assert verdict["a"].expected == 0  # a sender does not see its own texts


def test_lost_duplicated_and_out_of_order_are_counted_per_screen():
    sent = [_sent("a", "g", n) for n in range(1, 6)] + [_sent("a", "d", 1)]
    lines = [_line("g", "a", n) for n in (1, 3, 2, 1)] + ["{torn", _line("g", "z", 9)]
    members = {"g": ["a", "b"], "d": ["a", "b"]}
    verdict = check_screens(sent, members, {"b": parse_screen(lines)}, {"g": "group"})["b"]
    assert (verdict.expected, verdict.shown) == (6, 5)
    assert verdict.lost == 3  # group 4 and 5, direct 1
    assert verdict.duplicated == 1  # 1 again
    assert verdict.out_of_order == 1  # 2 after 3; 1 again is a duplicate, not also out of order
    assert verdict.unexpected == 1  # z never sent anything
    assert verdict.unreadable_lines == 1
    assert ["group", "a", 2, "after", 3] in verdict.samples["out_of_order"]
    assert verdict.samples["lost"] == [["d", "a", 1, 1], ["group", "a", 4, 5]]


def test_the_archive_is_matched_by_header_and_counts_holes_duplicates_and_strangers():
    sent = [_sent("a", "g", n) for n in (1, 2, 3)]
    archived = [
        ArchivedEnvelope("g", TEXT, 0, 0, 0, 0),
        ArchivedEnvelope("g", TEXT, 0, 0, 0, 0),  # archived twice
        ArchivedEnvelope("g", TEXT, 0, 0, 0, 2),
        ArchivedEnvelope("g", RECEIPT, 0, 1, 0, 0),  # a receipt: neither expected nor strange
        ArchivedEnvelope("g", TEXT, 0, 1, 0, 7),  # a text nobody accepted
    ]
    verdict = check_archive(sent, archived)
    assert (verdict.rows, verdict.expected) == (5, 3)
    assert verdict.missing == 1  # step 1: a's message 2
    assert verdict.duplicates == 1
    assert verdict.unexpected == 1
    assert verdict.samples["missing"] == [["g", "a", 2, 2]]


# -- the schedule ------------------------------------------------------------------------


def test_the_schedule_is_reproducible_and_has_what_was_asked():
    counts = {
        Kind.BROKER_SIGKILL: 6,
        Kind.BROKER_SIGKILL_AWAY: 3,
        Kind.GATEWAY_SIGKILL: 6,
        Kind.DEVICE_SIGKILL: 10,
    }
    targets = {"broker": 1, "gateway": 2, "device": 5}
    one = schedule(7, start_s=10, end_s=100, counts=counts, targets=targets)
    assert one == schedule(7, start_s=10, end_s=100, counts=counts, targets=targets)
    assert one != schedule(8, start_s=10, end_s=100, counts=counts, targets=targets)
    assert len(one) == 25
    assert {k: sum(e.kind == k for e in one) for k in counts} == counts
    assert all(10 <= e.at < 100 for e in one)
    assert [e.at for e in one] == sorted(e.at for e in one)
    assert all(0 <= e.target < targets[e.kind.role] for e in one)
    assert {e.target for e in one if e.kind.role == "gateway"} == {0, 1}
    away = [e for e in one if e.kind is Kind.BROKER_SIGKILL_AWAY]
    assert all(0 <= e.device < 5 and LEAD_S[0] <= e.lead_s <= LEAD_S[1] for e in away)
    assert all(BACK_S[0] <= e.back_s <= BACK_S[1] for e in away)
    assert all(e.down_s <= DOWN_S["device"][1] for e in one if e.kind.role == "device")
    with pytest.raises(ValueError, match="gateway"):
        schedule(7, start_s=0, end_s=10, counts={Kind.GATEWAY_SIGKILL: 1}, targets={"broker": 1})
    with pytest.raises(ValueError, match="device"):
        schedule(
            7, start_s=0, end_s=10, counts={Kind.BROKER_SIGKILL_AWAY: 1}, targets={"broker": 1}
        )


# -- the short soak ----------------------------------------------------------------------


def _short_soak(topology: str, tmp_path: Path) -> tuple[dict[str, Any], str]:
    done = subprocess.run(
        [
            sys.executable,
            str(SOAK),
            "--short",
            "--topology",
            topology,
            "--seed",
            str(SEED),
            "--report-only",
            "--tmp",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    (report,) = json.loads(done.stdout.strip().splitlines()[-1])["topologies"]
    if "skipped" in report:
        pytest.skip(report["skipped"])
    summary = "\n".join(done.stdout.strip().splitlines()[:-1])
    assert "error" not in report, f"{report['error']}\n{done.stderr[-4000:]}"
    assert list(tmp_path.iterdir()) == []  # its folders (and database) are gone
    return report, summary


def _assert_nothing_lost(report: dict[str, Any], summary: str) -> None:
    assert report["sent"] > 0 and report["expected_shown"] > 0, summary
    assert report["kills"].get("broker_sigkill", 0) >= 1, summary
    assert report["kills"].get("device_sigkill", 0) >= 1, summary
    assert report["lost"] == 0, summary
    assert report["duplicated"] == 0, summary
    assert report["out_of_order"] == 0, summary
    assert report["unexpected"] == 0, summary
    assert report["archive_missing"] == 0, summary
    assert report["archive_duplicates"] == 0, summary
    assert report["archive_unexpected"] == 0, summary


@pytest.mark.slow
def test_short_soak_embedded(tmp_path):
    """``fieldchat up`` SIGKILLed and restarted, devices SIGKILLed: nothing lost."""
    report, summary = _short_soak("embedded", tmp_path)
    _assert_nothing_lost(report, summary)


@pytest.mark.slow
@pytest.mark.mosquitto
@pytest.mark.postgres
def test_short_soak_scaled(tmp_path):
    """Mosquitto, two gateways and devices SIGKILLed and restarted: nothing lost,
    the archive complete."""
    report, summary = _short_soak("scaled", tmp_path)
    assert report["kills"].get("gateway_sigkill", 0) >= 1, summary
    _assert_nothing_lost(report, summary)

"""ProtocolFallback: when a device speaks MQTT 3.1.1 instead of 5 (pure, injected clock)."""

from __future__ import annotations

from fieldchat.device.fallback import PROBE_AFTER_S, AttemptOutcome, ProtocolFallback

CONNECTED, REFUSED, UNANSWERED, OTHER = (
    AttemptOutcome.CONNECTED,
    AttemptOutcome.REFUSED_LEVEL,
    AttemptOutcome.UNANSWERED,
    AttemptOutcome.OTHER,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def _auto(remembered: str | None = None) -> tuple[ProtocolFallback, list[str], Clock]:
    stored: list[str] = []
    clock = Clock()
    return ProtocolFallback("auto", remembered, remember=stored.append, clock=clock), stored, clock


def test_auto_speaks_5_and_remembers_nothing_new_when_it_works() -> None:
    levels, stored, _ = _auto()
    assert levels.level() == "5"
    assert levels.after(CONNECTED) is False
    assert stored == ["5"]
    levels.after(CONNECTED)
    assert stored == ["5"], "stored once"


def test_connack_unsupported_version_switches_at_once_and_is_remembered() -> None:
    levels, stored, clock = _auto()
    assert levels.after(REFUSED) is True  # at once, no backoff
    assert levels.level() == "3.1.1"
    levels.after(CONNECTED)
    assert stored == [f"3.1.1 {clock.now:.0f}"]
    # A later process starts on 3.1.1 directly.
    again = ProtocolFallback("auto", stored[-1], clock=clock)
    assert again.level() == "3.1.1"


def test_one_lost_connack_does_not_downgrade_for_good() -> None:
    """A broker shedding a socket (or a dropped link) before its CONNACK: the next
    CONNECT tries 3.1.1, for that connection only; the one after is 5 again."""
    levels, stored, _ = _auto()
    assert levels.after(UNANSWERED) is True
    assert levels.level() == "3.1.1"
    levels.after(CONNECTED)
    assert stored == []
    assert levels.level() == "5"
    levels.after(CONNECTED)
    assert stored == ["5"]
    # Not in a row: the count starts again after a success on 5.
    levels.after(UNANSWERED)
    levels.after(CONNECTED)
    assert levels.level() == "5"
    assert stored == ["5"]


def test_a_broker_that_closes_every_5_connect_is_remembered_as_3_1_1() -> None:
    levels, stored, clock = _auto()
    for _ in range(2):
        assert levels.level() == "5"
        assert levels.after(UNANSWERED) is True
        assert levels.level() == "3.1.1"
        levels.after(CONNECTED)
    assert stored == [f"3.1.1 {clock.now:.0f}"]
    assert levels.level() == "3.1.1"


def test_no_switch_loop_and_other_failures_change_nothing() -> None:
    levels, _, _ = _auto()
    assert levels.after(OTHER) is False  # unreachable, bad credential: nothing of the level
    assert levels.level() == "5"
    assert levels.after(REFUSED) is True
    assert levels.after(REFUSED) is False, "3.1.1 refused right after 5: back off"
    assert levels.level() == "5"
    # A 3.1.1 try that fails for another reason goes back to 5.
    levels.after(UNANSWERED)
    assert levels.level() == "3.1.1"
    assert levels.after(OTHER) is False
    assert levels.level() == "5"


def test_remembered_3_1_1_is_probed_as_5_once_a_day() -> None:
    levels, stored, clock = _auto(f"3.1.1 {1_000_000 - PROBE_AFTER_S + 60:.0f}")
    assert levels.level() == "3.1.1"
    levels.after(CONNECTED)
    clock.now += 60
    assert levels.level() == "5"  # the probe
    assert levels.after(REFUSED) is True
    assert levels.level() == "3.1.1"
    levels.after(CONNECTED)
    assert stored == [f"3.1.1 {clock.now:.0f}"]  # a day more
    clock.now += PROBE_AFTER_S
    assert levels.level() == "5"
    levels.after(CONNECTED)  # the broker speaks 5 now
    assert stored[-1] == "5"
    assert levels.level() == "5"


def test_a_bare_remembered_3_1_1_is_probed_at_once() -> None:
    """State files from before the time was stored (a lost CONNACK could write it)."""
    levels, _, _ = _auto("3.1.1")
    assert levels.level() == "5"


def test_configured_levels_never_change() -> None:
    for level in ("5", "3.1.1"):
        fixed = ProtocolFallback(level, "3.1.1 0" if level == "5" else "5")
        for outcome in (REFUSED, UNANSWERED, OTHER, CONNECTED):
            assert fixed.after(outcome) is False
            assert fixed.level() == level

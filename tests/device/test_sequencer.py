"""Each sender's order (device.sequencer): held envelopes, gaps, the reorder window and
the asks for missing steps, driven with explicit times (no broker, no sleeps)."""

from __future__ import annotations

from fieldchat.device.repair import ASK_FRACTIONS
from fieldchat.device.sequencer import Sequenced, Sequencer

KEY = ("c", 0, 1, 0)
OTHER = ("c", 0, 2, 0)
WINDOW = 2.0


def _sequencer(
    expected: int | None = 0, shown: dict[tuple[str, int, int, int], int] | None = None
) -> Sequencer:
    return Sequencer(WINDOW, lambda key: expected if key == KEY else None, shown)


def test_in_order_steps_open_at_once_and_move_the_chain_on() -> None:
    seq = _sequencer()
    for step in range(3):
        assert not seq.must_wait(KEY, step)
        assert seq.record(KEY, step) == Sequenced()
    assert seq.high_of(KEY) == 2
    assert seq.shown("c") == {(0, 1, 0): 2}


def test_a_chain_is_ordered_from_the_step_its_grant_starts_at() -> None:
    seq = _sequencer(expected=5)
    assert seq.high_of(KEY) == 4
    assert seq.must_wait(KEY, 7)  # 5 and 6 missing
    assert not seq.must_wait(KEY, 5)
    unknown = Sequencer(WINDOW, lambda key: None)
    assert not unknown.must_wait(KEY, 9)  # no grant known: nothing to order against


def test_an_envelope_ahead_waits_and_is_released_in_turn() -> None:
    seq = _sequencer(shown={KEY: 0})
    assert seq.must_wait(KEY, 2)
    assert seq.wait(KEY, 2, row=11, until=WINDOW, now=0.0)  # an episode of asks begins
    assert seq.candidates(KEY, 2) == [11]
    assert seq.must_wait(KEY, 2)  # a second candidate for the same step waits beside it
    assert list(seq.release(0.1)) == []  # step 1 still missing
    assert seq.record(KEY, 1) == Sequenced()
    assert list(seq.release(0.1)) == [(KEY, [11])]
    assert seq.record(KEY, 2) == Sequenced()
    assert list(seq.release(0.2)) == []
    assert len(seq.asks) == 0  # settled: nothing held any more


def test_past_the_window_what_waited_is_released_and_the_skip_is_a_gap() -> None:
    seq = _sequencer(shown={KEY: 0})
    seq.wait(KEY, 3, row=7, until=WINDOW, now=0.0)
    assert not seq.expired(WINDOW - 0.01)
    assert list(seq.release(WINDOW - 0.01, expired=True)) == []
    assert seq.expired(WINDOW)
    assert list(seq.release(WINDOW, expired=True)) == [(KEY, [7])]
    assert seq.record(KEY, 3) == Sequenced(gap=(1, 2))
    assert seq.record(KEY, 1) == Sequenced(late=True)  # it came after all: shown late


def test_asks_follow_the_fractions_of_the_window_while_steps_are_missing() -> None:
    seq = _sequencer(shown={KEY: 0})
    seq.wait(KEY, 4, row=1, until=WINDOW, now=0.0)
    asked = []
    t = 0.0
    while t <= WINDOW:
        asked += [(t, missing) for _, missing in seq.due_asks(t)]
        t = round(t + 0.05, 2)
    assert [at for at, _ in asked] == [f * WINDOW for f in ASK_FRACTIONS]
    assert all(missing == [(1, 3)] for _, missing in asked)
    assert seq.asks.asks(KEY) == len(ASK_FRACTIONS)


def test_an_ask_due_after_the_steps_arrived_is_dropped() -> None:
    seq = _sequencer(shown={KEY: 0})
    seq.wait(KEY, 2, row=1, until=WINDOW, now=0.0)
    assert seq.due_asks(0.0) == [(KEY, [(1, 1)])]
    seq.record(KEY, 1)
    assert seq.due_asks(1.0) == []
    assert len(seq.asks) == 0


def test_a_restart_asks_at_once_for_what_an_earlier_run_held() -> None:
    seq = _sequencer(shown={KEY: 0})
    seq.restore(KEY, 3, row=5, until=1.0)
    seq.restore(OTHER, 1, row=6, until=1.0)
    assert seq.restart(WINDOW) == [KEY, OTHER]
    assert seq.lacking(KEY, 10.0)
    assert not seq.lacking(OTHER, 10.0)  # no known start for that chain: nothing to ask
    assert seq.due_asks(10.0) == [(KEY, [(1, 2)])]
    assert seq.expired(10.0)


def test_far_ahead_rows_wait_for_the_engines_reach() -> None:
    seq = _sequencer(shown={KEY: 0})
    seq.hold_unreached(KEY, 900, row=3)
    seq.hold_unreached(KEY, 2000, row=4)
    assert seq.unreached_rows() == {3, 4}
    assert seq.advanced
    assert list(seq.reachable(lambda key: 512)) == []  # not within reach yet
    assert not seq.advanced
    seq.moved(OTHER)  # another chain moving does not retry this one's
    assert list(seq.reachable(lambda key: 1024 if key == KEY else None)) == []
    seq.moved(KEY)
    assert list(seq.reachable(lambda key: 1024)) == [(KEY, [3])]
    assert seq.unreached_rows() == {4}


def test_offline_a_window_runs_out_only_a_grace_later() -> None:
    seq = _sequencer(shown={KEY: 0})
    seq.wait(KEY, 2, row=4, until=WINDOW, now=0.0)
    grace = 30.0  # gap_timeout_s while the link is down
    assert not seq.expired(WINDOW + 1.0, grace)
    assert list(seq.release(WINDOW + 1.0, expired=True, grace=grace)) == []
    assert seq.expired(WINDOW + grace, grace)
    assert list(seq.release(WINDOW + grace, expired=True, grace=grace)) == [(KEY, [4])]


def test_a_connect_gives_what_is_held_a_whole_window_and_asks_again() -> None:
    seq = _sequencer(shown={KEY: 0})
    seq.wait(KEY, 3, row=9, until=WINDOW, now=0.0)
    for t in (0.0, 0.25, 0.75, 1.75):
        seq.due_asks(t)
    assert seq.due_asks(5.0) == []  # every ask of the episode made
    assert seq.hold_again(5.0, WINDOW) == [KEY]
    assert seq.lacking(KEY, 5.0)  # a new episode: asked for at once
    assert seq.due_asks(5.0) == [(KEY, [(1, 2)])]
    assert not seq.expired(5.0 + WINDOW - 0.01)
    assert seq.expired(5.0 + WINDOW)
    assert seq.waiting == {KEY: {3: [(9, 5.0 + WINDOW)]}}

"""``fieldchat.schemas.signals`` in real processes with real signals: SIGTERM stops like Ctrl-C,
a step held by ``deferred`` completes first, and a second signal while a clean stop
hangs ends the process at once, loudly, with status 128 + the signal."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import pytest

SYNC = """
import sys, time
from fieldchat.schemas.signals import Interrupts
stops = Interrupts()
with stops.installed():
    try:
        print("ready", flush=True)
        time.sleep(60)
    except KeyboardInterrupt:
        print("stopping", flush=True)
        if "--hang" in sys.argv:
            time.sleep(60)  # a clean stop that hangs
"""

DEFERRED = """
import time
from fieldchat.schemas.signals import Interrupts
stops = Interrupts()
with stops.installed():
    try:
        with stops.deferred():
            print("ready", flush=True)
            while not stops.requested:
                time.sleep(0.01)
            print("the step completed", flush=True)
        print("not reached", flush=True)
    except KeyboardInterrupt:
        print("stopped after the step", flush=True)
"""

ASYNC = """
import asyncio, sys
from fieldchat.schemas.signals import until_stopped

async def main():
    try:
        print("ready", flush=True)
        await asyncio.Event().wait()
    finally:
        print("stopping", flush=True)
        await asyncio.sleep(60 if "--hang" in sys.argv else 0.1)

print("stopped by a signal:", asyncio.run(until_stopped(main())), flush=True)
"""


class _Child:
    def __init__(self, script: str, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(script), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        self.out = self.proc.stdout

    def expect(self, line: str) -> None:
        got = self.out.readline().strip()  # the child prints it within seconds, or exits
        assert got == line, (got, self.proc.stderr.read() if self.proc.stderr else "")

    def finish(self) -> tuple[int, str, str]:
        try:
            out, err = self.proc.communicate(timeout=30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.communicate()
        return self.proc.returncode, out, err


@pytest.mark.parametrize(
    ("script", "lines"),
    [
        (SYNC, ["stopping"]),  # KeyboardInterrupt, as for Ctrl-C
        (DEFERRED, ["the step completed", "stopped after the step"]),
        (ASYNC, ["stopping", "stopped by a signal: True"]),  # the main task is cancelled
    ],
    ids=["sync", "deferred", "async"],
)
def test_sigterm_runs_the_clean_stop(script: str, lines: list[str]) -> None:
    child = _Child(script)
    child.expect("ready")
    child.proc.send_signal(signal.SIGTERM)
    for line in lines:
        child.expect(line)
    code, _, err = child.finish()
    assert (code, err) == (0, "")


@pytest.mark.parametrize("script", [SYNC, ASYNC], ids=["sync", "async"])
def test_a_second_signal_while_stopping_exits_at_once_and_says_so(script: str) -> None:
    child = _Child(script, "--hang")
    child.expect("ready")
    child.proc.send_signal(signal.SIGINT)
    child.expect("stopping")
    child.proc.send_signal(signal.SIGTERM)
    code, _, err = child.finish()
    assert code == 128 + signal.SIGTERM
    assert err.startswith("fieldchat: SIGTERM while stopping: exiting at once")

"""``fieldchat device listen`` and ``chat`` stopped by real signals (issue 14).

SIGTERM (``systemctl stop``) is a normal stop, the same as Ctrl-C: status 0, one
"stopped" line, and the device closes (its reserved chain steps are parked, so the
next start skips none). A stop during start-up is one line, never a traceback. And
``listen`` never shows a stored message twice, even when SIGKILLed between printing
and saving its cursor.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import queue
import signal
import subprocess
import termios
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest

from fieldchat.device.cli_listen import LISTEN_BATCH
from fieldchat.device.client import Device
from fieldchat.device.events import ReceiptReceived
from tests.device.conftest import (
    FIELDCHAT,
    Devices,
    Mosquitto,
    cli_env,
    conversation,
    free_port,
    run_cli,
    start_cli,
    wait_fieldchat_runs,
    wait_until,
)

pytestmark = pytest.mark.mosquitto

STOP_LINES = ("fieldchat stopped before it started.", "fieldchat device listen stopped.")
# The ids that name a message on every device, and its local row (JSON lines of listen).
STABLE_IDS = {"id", "cid", "sender", "epoch", "sender_index", "chain", "step"}


def _env_of(device: Device, mosquitto: Mosquitto) -> dict[str, str]:
    return cli_env(
        state=str(device.state.path), broker=mosquitto.url, credential=mosquitto.user(device.pid)
    )


def _hand_over(devices: Devices, device: Device) -> None:
    """Close an in-process device so a CLI process can take its state file."""
    device.close()
    devices.open.remove(device)


@contextlib.contextmanager
def _running(args: list[str], env: dict[str, str], **kw: Any) -> Iterator[subprocess.Popen[str]]:
    """``fieldchat device ARGS`` in a child process, killed (if still running) and its
    pipes closed at the end."""
    proc = start_cli(args, env, **kw)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


class _Lines:
    """A child's pipe read line by line on a thread, so every wait has a deadline."""

    def __init__(self, stream: IO[str] | None) -> None:
        assert stream is not None
        self._lines: queue.Queue[str] = queue.Queue()
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def rest(self) -> str:
        """Everything up to the end of the stream (the child has exited)."""
        self._thread.join(30)
        return "".join(iter(self._lines.get_nowait, ""))

    def _pump(self, stream: IO[str]) -> None:
        for line in stream:
            self._lines.put(line)
        self._lines.put("")  # end of the stream

    def next(self, timeout: float = 30) -> str:
        try:
            return self._lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no output in {timeout} s") from None


def _next_message(lines: _Lines, timeout: float = 30) -> dict[str, object]:
    """The next ``message`` JSON line of ``listen --json``."""
    end = time.monotonic() + timeout
    while (left := end - time.monotonic()) > 0:
        line = lines.next(left)
        assert line, "listen ended"
        data = json.loads(line)
        if data["type"] == "message":
            return data
    raise AssertionError(f"no message in {timeout} s")


def _stop(proc: subprocess.Popen[str], sig: int = signal.SIGTERM) -> int:
    """Send ``sig``; the exit status (within 30 s, or the test fails)."""
    proc.send_signal(sig)
    try:
        return proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError("the process did not stop within 30 s of the signal") from None


def test_sigterm_stops_listen_cleanly_and_parks_its_reserved_steps(
    tmp_path: Path, mosquitto_devices: Devices, mosquitto: Mosquitto
) -> None:
    cid, (alice, bob) = conversation(mosquitto_devices, "alice", "bob")
    _hand_over(mosquitto_devices, bob)
    env = _env_of(bob, mosquitto)
    with _running(["listen", "--json"], env) as listener:
        for i in range(3):
            alice.send(cid, f"before the stop {i}")
        out = _Lines(listener.stdout)
        shown = [_next_message(out) for _ in range(3)]
        assert [m["text"] for m in shown] == [f"before the stop {i}" for i in range(3)]
        assert all(m.keys() >= STABLE_IDS for m in shown)
        # Bob's delivery receipt used steps of his chain: a reservation to park.
        wait_until(
            lambda: any(
                isinstance(e, ReceiptReceived) and e.sender == bob.pid
                for e in mosquitto_devices.events[alice.pid]
            ),
            20,
            "bob's delivery receipt",
        )
        code = _stop(listener)
        assert listener.stderr is not None
        err = listener.stderr.read()
    assert code == 0, err
    assert err.strip().splitlines()[-1] == "fieldchat device listen stopped."
    assert "Traceback" not in err
    # The next start resumes at bob's next step: alice sees no gap and no hold.
    sent = run_cli(["send", cid, "after the stop"], env)
    assert sent.returncode == 0, sent.stderr
    wait_until(
        lambda: "after the stop" in [r.text for r in alice.messages(cid)], 20, "the next message"
    )
    assert alice.gaps(cid) == [], "bob's restart skipped steps: close() did not park them"


def test_sigterm_stops_chat_cleanly(
    tmp_path: Path, mosquitto_devices: Devices, mosquitto: Mosquitto
) -> None:
    cid, (alice, bob) = conversation(mosquitto_devices, "alice", "bob")
    _hand_over(mosquitto_devices, bob)
    with _running(["chat", cid], _env_of(bob, mosquitto), stdin=subprocess.PIPE) as chat:
        err_lines = _Lines(chat.stderr)
        while "-- chatting in" not in (line := err_lines.next()):
            assert line, "chat ended before it started"
        code = _stop(chat)
        err = err_lines.rest()
    assert code == 0, err
    assert err.strip().splitlines()[-1] == "fieldchat device chat stopped."


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_stop_during_start_up_is_one_line_never_a_traceback(tmp_path: Path, sig: int) -> None:
    """Signals from fieldchat's first line through the imports (≈ 1 s) to the
    connection attempts: each a clean stop."""
    env = cli_env(state=str(tmp_path / "dev.sqlite3"))
    assert run_cli(["init"], env).returncode == 0
    # Nothing listens there: listen keeps trying to connect until the signal.
    env = dict(env, FIELDCHAT_BROKER=f"mqtt://127.0.0.1:{free_port()}", FIELDCHAT_CREDENTIAL="c")
    for delay in (0.0, 0.3, 0.7, 1.2, 2.0, 3.0):
        with _running(["listen", "--timeout", "60"], env) as proc:
            wait_fieldchat_runs(proc)  # the delays count from there, not from the exec
            time.sleep(delay)
            code = _stop(proc, sig)
            _, err = proc.communicate()
        assert "Traceback" not in err, f"after {delay} s:\n{err}"
        assert code == 0, f"after {delay} s: status {code}\n{err}"
        assert err.strip().splitlines()[-1] in STOP_LINES, f"after {delay} s:\n{err}"


def _small_pipe() -> tuple[int, int]:
    """A pipe that holds one page: a writer of more blocks in write()."""
    read, write = os.pipe()
    fcntl.fcntl(write, fcntl.F_SETPIPE_SZ, 4096)
    return read, write


def _pipe_full(fd: int) -> bool:
    buf = bytearray(4)
    fcntl.ioctl(fd, termios.FIONREAD, buf)
    return int.from_bytes(buf, "little") >= 4096


def _drain(fd: int) -> list[dict[str, Any]]:
    """Whole JSON message lines left in the pipe by a killed writer."""
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    lines = b"".join(chunks).split(b"\n")[:-1]  # the last one may be cut
    return [m for m in map(json.loads, lines) if m["type"] == "message"]


def test_listen_never_shows_a_message_twice_across_a_sigkill(
    tmp_path: Path, mosquitto_devices: Devices, mosquitto: Mosquitto
) -> None:
    """SIGKILL while listen prints a batch (its reader stalled: the pipe is full), then
    restart it: no stored row is printed twice; at most one batch is left unshown, and
    it is still in the state file. (It used to print a batch, then save its cursor.)"""
    total = 3 * LISTEN_BATCH
    cid, (alice, bob) = conversation(mosquitto_devices, "alice", "bob")
    alice.send_many(cid, [f"{i:04d} " + "x" * 200 for i in range(total)])
    wait_until(lambda: len(bob.messages(cid)) == total, 60, "bob stores every message")
    stored = [r.id for r in bob.messages(cid)]
    _hand_over(mosquitto_devices, bob)
    env = _env_of(bob, mosquitto)

    read, write = _small_pipe()
    try:
        first = subprocess.Popen(
            [FIELDCHAT, "device", "listen", "--json"],
            env=env,
            stdout=write,
            stderr=subprocess.DEVNULL,
        )
        os.close(write)
        write = -1
        try:
            wait_until(lambda: _pipe_full(read), 60, "listen to fill its output pipe")
        finally:
            first.kill()  # SIGKILL, blocked in the middle of a batch
            first.communicate()
        shown_first = _drain(read)
    finally:
        os.close(read)
        if write >= 0:
            os.close(write)
    assert 0 < len(shown_first) < LISTEN_BATCH

    again = run_cli(
        ["listen", "--json", "--count", str(total - LISTEN_BATCH), "--duration", "60"], env
    )
    assert again.returncode == 0, again.stderr
    shown_again = [m for m in map(json.loads, again.stdout.splitlines()) if m["type"] == "message"]
    first_ids = [m["id"] for m in shown_first]
    again_ids = [m["id"] for m in shown_again]
    assert not set(first_ids) & set(again_ids), "a stored message was shown twice"
    assert first_ids + again_ids == sorted(first_ids + again_ids)
    unshown = sorted(set(stored) - set(first_ids) - set(again_ids))
    assert len(unshown) <= LISTEN_BATCH  # the batch the kill cut: at most one
    assert all(m.keys() >= STABLE_IDS for m in shown_first + shown_again)
    with contextlib.closing(Device(bob.state.path)) as reopened:
        assert set(unshown) <= {r.id for r in reopened.messages(cid)}  # nothing lost

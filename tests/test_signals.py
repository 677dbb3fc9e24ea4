"""``fieldchat up`` and ``fieldchat broker run`` stopped by a real SIGTERM (issue 14).

SIGTERM (``systemctl stop``, ``kill``) is a normal stop, the same as Ctrl-C: status 0,
one "stopped" line, and the broker's clean shutdown runs: every message it
acknowledged before the signal is delivered after a restart, even with a client
publishing while it stops. ``up`` used to die with status 143 before the broker's
shutdown (uvicorn raised SIGTERM again once the gateway had stopped).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from fieldchat.broker import Store
from fieldchat.schemas.topics import Topics
from tests.broker._cases import ALICE, BOB, X, set_up_conversation
from tests.broker._peers import Peer

FIELDCHAT = str(Path(sys.executable).with_name("fieldchat"))
T = Topics()
MAX_PUBLISHED = 20_000  # the busy publisher's bound (it stops long before, at the signal)
WAIT_S = 60.0


def _enroll(broker_dir: Path) -> dict[str, str]:
    broker_dir.mkdir(parents=True, exist_ok=True)
    with Store(broker_dir / "broker.sqlite3") as store:
        return {ALICE.pid: store.enroll(ALICE.pid), BOB.pid: store.enroll(BOB.pid)}


Running = tuple[subprocess.Popen[str], int, list[str]]


@contextmanager
def _process(args: list[str], ready: re.Pattern[str]) -> Iterator[Running]:
    """``fieldchat ARGS``, output merged; yields it, the MQTT port matched by ``ready``
    (group 1) and the lines read so far. Killed at the end if still running."""
    proc = subprocess.Popen(
        [FIELDCHAT, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert proc.stdout is not None
    lines: list[str] = []
    try:
        deadline = time.monotonic() + WAIT_S
        port = 0
        while not port and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                raise AssertionError("it exited at start:\n" + "".join(lines))
            lines.append(line)
            if found := ready.search(line):
                port = int(found.group(1))
        assert port, "not ready in time:\n" + "".join(lines)
        yield proc, port, lines
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stdout.close()


def _terminate(proc: subprocess.Popen[str], lines: list[str]) -> tuple[int, str]:
    """SIGTERM; the exit status and everything printed (the stop must take < 60 s)."""
    proc.send_signal(signal.SIGTERM)
    assert proc.stdout is not None
    try:
        rest, _ = proc.communicate(timeout=WAIT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError("no stop within 60 s of SIGTERM") from None
    return proc.returncode, "".join(lines) + rest


class _BusyPublisher:
    """Alice publishing numbered QoS 1 messages to X as fast as the broker acknowledges
    them (20 in flight) until her connection drops; ``acknowledged()`` is what got a
    PUBACK."""

    def __init__(self, port: int, credential: str) -> None:
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=ALICE.pid,
            protocol=mqtt.MQTTv311,
            reconnect_on_failure=False,
        )
        self.client.username_pw_set(ALICE.pid, credential)
        self.client.max_inflight_messages_set(20)
        self.down = threading.Event()
        self.client.on_disconnect = lambda *_: self.down.set()
        self.sent: list[tuple[mqtt.MQTTMessageInfo, bytes]] = []
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        deadline = time.monotonic() + WAIT_S
        for i in range(MAX_PUBLISHED):
            if self.down.is_set() or time.monotonic() > deadline:
                return
            payload = i.to_bytes(4, "big") + os.urandom(12)
            self.sent.append((self.client.publish(T.msg(X), payload, qos=1), payload))
            if len(self.sent) >= 20:
                info = self.sent[-20][0]
                while not _acknowledged(info) and not self.down.wait(0.002):
                    pass

    def acknowledged(self) -> list[bytes]:
        return [payload for info, payload in self.sent if _acknowledged(info)]

    def wait_for(self, count: int) -> None:
        deadline = time.monotonic() + WAIT_S
        while len(self.acknowledged()) < count:
            assert time.monotonic() < deadline, "the broker acknowledges nothing"
            assert not self.down.is_set(), "alice was disconnected"
            time.sleep(0.01)

    def stop(self) -> list[bytes]:
        """Wait for the connection to drop (the broker stopped); what was acknowledged."""
        assert self.down.wait(WAIT_S), "the broker did not disconnect alice"
        self.thread.join(WAIT_S)
        self.client.loop_stop()
        return self.acknowledged()


def _acknowledged(info: mqtt.MQTTMessageInfo) -> bool:
    """PUBACKed (paho raises for a publish refused because the connection dropped)."""
    queued = (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_AGAIN)
    return info.rc in queued and info.is_published()


def _delivered_to_bob(port: int, creds: dict[str, str], expected: int) -> set[bytes]:
    bob = Peer(port, BOB.pid, creds[BOB.pid], clean=False)
    try:
        _, _, present = bob.connect()
        assert present, "the broker forgot bob's session"
        got = bob.expect(expected, timeout=WAIT_S) + bob.drain(0.5)
        return {m.payload for m in got}
    finally:
        bob.disconnect()


UP_READY = re.compile(r"mqtt\s+mqtt://127\.0\.0\.1:(\d+)")
BROKER_READY = re.compile(r"listening on mqtt://127\.0\.0\.1:(\d+)")
UP = ["up", "--mqtt-port", "0", "--http-port", "0", "--data-dir"]
BROKER_RUN = ["broker", "run", "--port", "0", "--log-level", "WARNING", "--data-dir"]


@pytest.mark.parametrize(
    ("command", "broker_dir", "ready", "stopped"),
    [
        (UP, "broker", UP_READY, "fieldchat stopped: gateway and broker state saved."),
        (
            BROKER_RUN,
            ".",
            BROKER_READY,
            "fieldchat broker stopped: sessions, queues and retained messages saved.",
        ),
    ],
    ids=["up", "broker run"],
)
def test_sigterm_on_a_busy_broker_is_a_clean_stop_that_loses_nothing_acknowledged(
    tmp_path: Path, command: list[str], broker_dir: str, ready: re.Pattern[str], stopped: str
) -> None:
    data = tmp_path / "data"
    creds = _enroll(data / broker_dir)
    args = [*command, str(data)]
    with _process(args, ready) as (proc, port, lines):
        set_up_conversation(port, creds)
        alice = _BusyPublisher(port, creds[ALICE.pid])
        alice.wait_for(200)  # then SIGTERM while she goes on publishing
        code, out = _terminate(proc, lines)
        acknowledged = alice.stop()
    assert code == 0, out
    assert out.strip().splitlines()[-1] == stopped
    assert "Traceback" not in out
    with _process(args, ready) as (proc, port, lines):
        delivered = _delivered_to_bob(port, creds, len(acknowledged))
        code, out = _terminate(proc, lines)
    assert code == 0, out
    lost = set(acknowledged) - delivered
    assert not lost, f"{len(lost)} of {len(acknowledged)} acknowledged messages lost"

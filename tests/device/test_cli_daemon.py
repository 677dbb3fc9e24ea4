"""The device commands as clients of ``fieldchat device run`` (issue 18, items 2 and
3): ``send CID TEXT`` goes to the daemon without typer and without the device stack
(fieldchat/_fast.py), with the same output and exit codes as the full command line;
``--wait`` and ``--acks`` through the daemon; the commands' path to the daemon loads no
cryptography, paho or asyncio."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from fieldchat.schemas.exits import ExitCode
from tests.device._daemon import DaemonProcess
from tests.device.conftest import (
    Devices,
    Mosquitto,
    cli_env,
    conversation,
    handed_over,
    reap,
    run_cli,
    start_cli,
    texts,
    wait_until,
)

pytestmark = pytest.mark.mosquitto

HEAVY = ("cryptography", "nacl", "paho", "asyncio", "msgpack", "sqlite3")


def _imported(stderr: str) -> set[str]:
    """Top-level packages named in ``python -X importtime`` output."""
    return {
        line.rsplit("|", 1)[-1].strip().split(".")[0]
        for line in stderr.splitlines()
        if line.startswith("import time:")
    }


def _module_cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "fieldchat", "device", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_send_to_the_daemon_is_lean_and_as_the_full_command_line(
    mosquitto_devices: Devices, mosquitto: Mosquitto
) -> None:
    cid, (alice, bob) = conversation(mosquitto_devices, "alice", "bob")
    alice.close()
    mosquitto_devices.open.remove(alice)
    env = cli_env(
        state=str(alice.state.path), broker=mosquitto.url, credential=mosquitto.user(alice.pid)
    )
    with DaemonProcess(env):
        fast = _module_cli(["send", cid, "fast"], env)
        assert (fast.returncode, fast.stdout) == (0, ""), fast.stderr
        loaded = _imported(fast.stderr)
        assert loaded.isdisjoint({*HEAVY, "typer", "pydantic", "rich"}), loaded
        wait_until(lambda: texts(bob, cid) == ["fast"], 20, "bob has it")

        # The same refusal, in the same line and code, fast or through typer.
        unknown = "a" * 26
        fast = run_cli(["send", unknown, "hi"], env)
        full = run_cli(["send", unknown, "hi", "--timeout", "10"], env)  # a flag: typer
        assert fast.returncode == full.returncode == ExitCode.REFUSED
        assert fast.stderr == full.stderr
        assert fast.stderr.startswith("error: unknown conversation")

        # Other commands through the daemon: typer (so pydantic), never the device stack.
        who = _module_cli(["whoami", "--pid"], env)
        assert (who.returncode, who.stdout.strip()) == (0, alice.pid), who.stderr
        assert _imported(who.stderr).isdisjoint(HEAVY)

        waited = run_cli(["send", cid, "waited", "--wait", "--timeout", "20"], env)
        assert (waited.returncode, waited.stderr) == (0, "")
        acked = run_cli(["send", cid, "acknowledged", "--acks", "1", "--timeout", "30"], env)
        assert (acked.returncode, acked.stderr) == (0, "")  # bob's delivery receipt came
        piped = run_cli(["send", cid, "--wait"], env, input="piped one\npiped two\n")
        assert (piped.returncode, piped.stderr) == (0, "")
        too_many = run_cli(["send", cid, "never", "--acks", "2"], env)
        assert too_many.returncode == ExitCode.USAGE
        assert too_many.stderr.strip().endswith("has 1 other member(s); nothing was sent")

        mosquitto.stop()
        kept = run_cli(["send", cid, "kept", "--wait", "--timeout", "2"], env)
        assert kept.returncode == ExitCode.NOT_YET, kept.stderr
        assert kept.stderr.startswith("fieldchat device: not delivered yet: ")
        plain = run_cli(["send", cid, "kept too"], env)
        assert (plain.returncode, plain.stderr) == (0, "")  # accepted: the daemon delivers
        mosquitto.start()
        wait_until(
            lambda: (
                texts(bob, cid)
                == ["fast", "waited", "acknowledged", "piped one", "piped two", "kept", "kept too"]
            ),
            60,
            "the daemon delivers what it kept, once",
        )


def test_ctrl_c_while_the_daemon_does_not_answer_is_one_line_and_130(
    mosquitto_devices: Devices, mosquitto: Mosquitto
) -> None:
    """A stopped (SIGSTOP) daemon still accepts connections (the kernel's backlog) and
    never answers: Ctrl-C then ends send, fast or through typer, in one line."""
    cid, env, _ = handed_over(mosquitto_devices, mosquitto)
    with DaemonProcess(env) as daemon:
        assert daemon.proc is not None
        daemon.proc.send_signal(signal.SIGSTOP)
        try:
            for args in (["send", cid, "stuck"], ["send", cid, "stuck", "--timeout", "5"]):
                proc = start_cli(args, env)
                time.sleep(2.0)  # connected, waiting for the answer
                assert proc.poll() is None
                proc.send_signal(signal.SIGINT)
                _, err = proc.communicate(timeout=30)
                assert proc.returncode == ExitCode.INTERRUPTED, err
                assert err.strip().splitlines() == [
                    "fieldchat device: interrupted before it finished."
                ], err
        finally:
            daemon.proc.send_signal(signal.SIGCONT)


def test_listen_exit_on_disconnect_through_the_daemon(
    mosquitto_devices: Devices, mosquitto: Mosquitto
) -> None:
    """``listen --exit-on-disconnect`` as standalone: exit 3 when the daemon loses the
    broker, and at once when it is not connected within ``--timeout``."""
    cid, env, bob = handed_over(mosquitto_devices, mosquitto)
    with DaemonProcess(env) as daemon:
        listener = start_cli(["listen", "--exit-on-disconnect", "--json"], env)
        try:
            bob.send(cid, "while connected")
            line = listener.stdout.readline() if listener.stdout else ""
            assert '"while connected"' in line, line
            mosquitto.stop()
            _, err = listener.communicate(timeout=60)
        finally:
            reap(listener)
        assert listener.returncode == ExitCode.UNAVAILABLE, err
        assert (
            err.strip().splitlines()[-1].startswith("error: the connection to the broker dropped")
        ), err
        out = run_cli(["listen", "--exit-on-disconnect", "--timeout", "1"], env)
        assert out.returncode == ExitCode.UNAVAILABLE, out.stderr
        assert out.stderr.strip() == (
            "error: the device daemon is not connected to the broker (1 s)"
        )
        assert daemon.proc is not None and daemon.proc.poll() is None  # it keeps running

"""Honest exit codes of ``fieldchat device`` (issue 18), in real processes against a
real Mosquitto: ``send`` exits 0 once the message is kept in the outbox, whether or
not the broker is up or takes the credential; ``--wait`` (and ``--acks``) exit 75 for
"kept, not delivered yet"; errors that lost nothing say so; ``listen`` waits for a
broker that comes late; read-only commands never create an identity; Ctrl-C is one
line and 130 for a one-shot command, from the first instant."""

from __future__ import annotations

import json
import queue
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import IO

import pytest
import typer

from fieldchat.device.cli_common import errors
from fieldchat.schemas.exits import MEANINGS, ExitCode
from tests._interrupted import StoppedWhileDumped
from tests.device.conftest import (
    FIELDCHAT,
    Devices,
    Mosquitto,
    cli_env,
    free_port,
    handed_over,
    reap,
    run_cli,
    start_cli,
    texts,
    wait_fieldchat_runs,
    wait_until,
)

pytestmark = pytest.mark.mosquitto


def _outbox(env: dict[str, str]) -> list[dict[str, object]]:
    out = run_cli(["outbox", "--json"], env)
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]


def test_send_is_delivered_and_waits_for_the_broker_and_for_acks(
    mosquitto_devices: Devices, mosquitto: Mosquitto
) -> None:
    cid, env, bob = handed_over(mosquitto_devices, mosquitto)
    out = run_cli(["send", cid, "plain"], env)
    assert (out.returncode, out.stderr) == (0, "")
    out = run_cli(["send", cid, "waited", "--wait"], env)
    assert (out.returncode, out.stderr) == (0, "")
    out = run_cli(["send", cid, "acknowledged", "--acks", "1", "--timeout", "30"], env)
    assert (out.returncode, out.stderr) == (0, "")
    wait_until(lambda: "acknowledged" in texts(bob, cid), 20, "bob has it")
    assert _outbox(env) == []
    # More acknowledgements than members: a usage error before anything is sent.
    out = run_cli(["send", cid, "never", "--acks", "2"], env)
    assert out.returncode == ExitCode.USAGE
    assert out.stderr.strip().endswith("has 1 other member(s); nothing was sent")
    assert "never" not in texts(bob, cid)


def test_a_broker_down_keeps_the_message_exit_0_and_75_under_wait(
    mosquitto_devices: Devices, mosquitto: Mosquitto
) -> None:
    cid, env, bob = handed_over(mosquitto_devices, mosquitto)
    mosquitto.stop()
    out = run_cli(["send", cid, "kept", "--timeout", "1"], env)
    assert out.returncode == ExitCode.OK, out.stderr
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith("fieldchat device: accepted: 1 publication(s) kept in the outbox")
    assert "do not send them again" in line

    out = run_cli(["send", cid, "kept too", "--wait", "--timeout", "1"], env)
    assert out.returncode == ExitCode.NOT_YET, out.stderr
    assert ExitCode.NOT_YET.value == 75  # sysexits' EX_TEMPFAIL
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith("fieldchat device: not delivered yet: 2 publication(s) kept")
    assert len(_outbox(env)) == 2  # kept: nothing lost, nothing to send twice

    mosquitto.start()
    out = run_cli(["send", cid, "third", "--wait", "--timeout", "30"], env)
    assert (out.returncode, out.stderr) == (0, "")
    wait_until(
        lambda: texts(bob, cid) == ["kept", "kept too", "third"],
        30,
        "all three delivered once, in order",
    )


def test_a_wrong_credential_after_the_message_was_kept_is_not_a_failure(
    mosquitto_devices: Devices, mosquitto: Mosquitto
) -> None:
    cid, env, bob = handed_over(mosquitto_devices, mosquitto)
    wrong = dict(env, FIELDCHAT_CREDENTIAL="not-the-credential")
    out = run_cli(["send", cid, "held", "--timeout", "5"], wrong)
    assert out.returncode == ExitCode.OK, out.stderr
    assert "once the broker accepts this device's credential" in out.stderr
    assert "not-the-credential" not in out.stderr + out.stdout
    out = run_cli(["send", cid, "held too", "--wait", "--timeout", "5"], wrong)
    assert out.returncode == ExitCode.NOT_YET, out.stderr
    assert "refused the credential" in out.stderr
    # The right credential sends both, once.
    assert run_cli(["send", cid, "right", "--wait"], env).returncode == 0
    wait_until(
        lambda: texts(bob, cid) == ["held", "held too", "right"],
        30,
        "delivered once the credential is right",
    )


def test_errors_that_lost_nothing_say_so(mosquitto_devices: Devices, mosquitto: Mosquitto) -> None:
    cid, env, _ = handed_over(mosquitto_devices, mosquitto)
    out = run_cli(["send", "aaaaaaaaaaaaaaaaaaaaaaaaaa", "hi", "--wait"], env)
    assert out.returncode == ExitCode.REFUSED
    assert out.stderr.strip().endswith("; nothing was sent")
    out = run_cli(["send"], env)  # no conversation: click's usage error
    assert out.returncode == ExitCode.USAGE
    nobody = dict(env, FIELDCHAT_BROKER=f"mqtt://127.0.0.1:{free_port()}")
    out = run_cli(["conv", "invite", cid, "bbbbbbbbbbbbbbbbbbbbbbbbba", "--timeout", "1"], nobody)
    assert out.returncode == ExitCode.UNAVAILABLE
    assert out.stderr.strip().endswith("; nothing was changed")
    assert _outbox(env) == []


def test_help_lists_the_exit_codes_from_the_one_table() -> None:
    out = run_cli(["send", "--help"], cli_env(), timeout=60)
    assert out.returncode == 0
    flat = " ".join(out.stdout.replace("│", " ").split())
    for code in (0, 1, 2, 3, 75, 130):
        assert f"{code} {MEANINGS[ExitCode(code)].split()[0]}" in flat
    assert "--wait" in flat and "--acks" in flat
    listen = run_cli(["listen", "--help"], cli_env(), timeout=60)
    assert "--exit-on-disconnect" in listen.stdout


@pytest.mark.parametrize(
    "args",
    [["whoami"], ["whoami", "--pid"], ["conv", "list"], ["outbox"], ["verify", "a" * 26]],
    ids=" ".join,
)
def test_read_only_commands_never_create_an_identity(tmp_path: Path, args: list[str]) -> None:
    home = tmp_path / "home"
    home.mkdir()
    env = cli_env()
    env["HOME"] = str(home)  # the default state file would be under it
    state = tmp_path / "missing.db"
    for extra in ([], ["--state", str(state)]):
        out = subprocess.run(
            [FIELDCHAT, "device", *extra, *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert out.returncode == ExitCode.USAGE, out.stderr
        (line,) = out.stderr.strip().splitlines()
        assert line.startswith("error: no state file ") and "device --state" in line
        assert line.endswith(" init`")
        command = line.split("create one with `", 1)[1].split(" device --state", 1)[0]
        runnable = shutil.which(command, path=env.get("PATH")) or Path(command).is_file()
        assert runnable, f"{command!r} would not run in this shell: {line}"
    assert not state.exists()
    assert list(home.rglob("*")) == []


class _Lines:
    """A child's stderr read on a thread, so every wait has a deadline."""

    def __init__(self, stream: IO[str] | None) -> None:
        assert stream is not None
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, args=(stream,), daemon=True).start()

    def _pump(self, stream: IO[str]) -> None:
        for line in stream:
            self.lines.put(line)
        self.lines.put("")

    def wait_for(self, text: str, timeout: float = 30) -> list[str]:
        seen: list[str] = []
        end = time.monotonic() + timeout
        while (left := end - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                break
            seen.append(line)
            if text in line or not line:
                return seen
        raise AssertionError(f"no {text!r} in {timeout} s: {seen}")


def test_listen_waits_for_a_broker_started_late(
    mosquitto_devices: Devices, mosquitto: Mosquitto
) -> None:
    cid, env, bob = handed_over(mosquitto_devices, mosquitto)
    mosquitto.stop()
    listener = start_cli(["listen", "--json", "--count", "1", "--timeout", "1"], env)
    try:
        err = _Lines(listener.stderr)
        said = err.wait_for("waiting for the broker")
        assert said[-1].startswith("fieldchat device listen: waiting for the broker (")
        time.sleep(12)  # well past the 10 s listen used to give up after, and backoffs
        assert listener.poll() is None, "listen gave up"
        mosquitto.start()
        err.wait_for("connected to the broker", timeout=60)
        bob.send(cid, "after the broker came back")
        out, rest = listener.communicate(timeout=60)
    finally:
        reap(listener)
    assert listener.returncode == 0, rest
    assert [json.loads(line)["text"] for line in out.splitlines() if '"message"' in line] == [
        "after the broker came back"
    ]
    waiting = [line for line in err.lines.queue if "waiting for the broker" in line]
    assert waiting == [], "said once, not once per attempt"


def test_listen_exit_on_disconnect_keeps_the_old_behaviour(
    mosquitto_devices: Devices, mosquitto: Mosquitto
) -> None:
    cid, env, _ = handed_over(mosquitto_devices, mosquitto)
    listener = start_cli(["listen", "--exit-on-disconnect"], env)
    try:
        time.sleep(3)  # connected by now
        assert listener.poll() is None
        mosquitto.stop()
        _, err = listener.communicate(timeout=60)
    finally:
        reap(listener)
    assert listener.returncode == ExitCode.UNAVAILABLE, err
    assert err.strip().splitlines()[-1].startswith("error: the connection to the broker dropped")
    out = run_cli(["listen", "--exit-on-disconnect", "--timeout", "1"], env)
    assert out.returncode == ExitCode.UNAVAILABLE
    assert out.stderr.strip().startswith("error: cannot reach broker at 127.0.0.1:")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_ctrl_c_during_a_one_shot_command_is_one_line_and_130(
    mosquitto_devices: Devices, mosquitto: Mosquitto, sig: int
) -> None:
    """From the imports to the connection attempts: one line, status 130, and what
    send accepted stays in the outbox."""
    cid, env, _ = handed_over(mosquitto_devices, mosquitto)
    mosquitto.stop()
    lines = {
        "fieldchat: interrupted before it started; nothing was done.",
        "fieldchat device: interrupted before it finished.",
    }
    seen = set()
    # Counted from fieldchat's first line, as test_cli_signals: before it the
    # interpreter is still starting (site imports), where no Python code of ours runs.
    for delay in (0.0, 0.3, 0.4, 0.6, 1.0, 2.0):
        proc = start_cli(["send", cid, f"at {delay}", "--wait", "--timeout", "60"], env)
        wait_fieldchat_runs(proc)
        time.sleep(delay)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
        assert "Traceback" not in err, f"after {delay} s:\n{err}"
        assert proc.returncode == ExitCode.INTERRUPTED, f"after {delay} s:\n{err}"
        (line,) = err.strip().splitlines()
        assert line in lines, f"after {delay} s: {line}"
        seen.add(line)
    assert "fieldchat device: interrupted before it finished." in seen  # while connecting
    assert all(m["cid"] == cid for m in _outbox(env))


def test_a_stop_a_library_turned_into_another_error_is_still_one_line_and_130(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """pydantic-core raises PydanticSerializationError for a KeyboardInterrupt raised
    in a serializer; the command still says it was interrupted, status 130."""
    with pytest.raises(typer.Exit) as exited, errors():
        StoppedWhileDumped(path=Path("pi.db")).model_dump()
    assert exited.value.exit_code == ExitCode.INTERRUPTED
    assert capsys.readouterr().err == "fieldchat device: interrupted before it finished.\n"


def test_the_default_state_file_is_found_once_init_made_it(tmp_path: Path) -> None:
    """The default (``~/.local/share/fieldchat/device.sqlite3``) is expanded when
    looked for: after ``init``, ``whoami`` without ``--state`` finds it."""
    env = dict(cli_env(), HOME=str(tmp_path))
    assert run_cli(["whoami"], env).returncode == ExitCode.USAGE
    made = run_cli(["init", "--json"], env)
    assert made.returncode == 0, made.stderr
    who = run_cli(["whoami", "--pid"], env)
    assert who.returncode == 0, who.stderr
    assert who.stdout.strip() == json.loads(made.stdout)["pid"]
    assert (tmp_path / ".local/share/fieldchat/device.sqlite3").is_file()


def test_init_without_the_broker_says_what_it_saved(tmp_path: Path) -> None:
    state = tmp_path / "dev.db"
    env = cli_env(state=str(state), broker=f"mqtt://127.0.0.1:{free_port()}", credential="c")
    out = run_cli(["init"], env, timeout=60)
    assert out.returncode == ExitCode.UNAVAILABLE
    (line,) = out.stderr.strip().splitlines()
    assert line.endswith(
        "; the identity and settings are saved; the bundle is published by the next "
        "command that connects"
    )
    assert run_cli(["whoami", "--pid"], env).returncode == 0  # saved indeed

"""``fieldchat device …`` in real processes, against real brokers on 127.0.0.1."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.device.conftest import Broker, Mosquitto, cli_env, free_port, reap, run_cli, start_cli

pytestmark = pytest.mark.mosquitto


def _init(tmp_path: Path, name: str, broker: Broker) -> tuple[str, dict[str, str]]:
    """``init`` a device; enroll it; the environment its later commands run with."""
    state = str(tmp_path / f"{name}.sqlite3")
    out = run_cli(["init", "--json"], cli_env(state=state))
    assert out.returncode == 0, out.stderr
    pid = json.loads(out.stdout)["pid"]
    env = cli_env(state=state, broker=broker.url, credential=broker.user(pid))
    return pid, env


def _read_json_lines(proc: subprocess.Popen[str], timeout: float = 60) -> list[dict[str, object]]:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def test_walkthrough_two_devices_talk(tmp_path: Path, any_broker: Broker) -> None:
    alice, alice_env = _init(tmp_path, "alice", any_broker)
    bob, bob_env = _init(tmp_path, "bob", any_broker)
    # Bob listens (and so publishes his bundle); Alice creates a conversation with him
    # and sends: the README's three commands each.
    listener = start_cli(["listen", "--json", "--count", "2", "--duration", "60"], bob_env)
    try:
        created = run_cli(["conv", "create", bob, "--json", "--timeout", "20"], alice_env)
        assert created.returncode == 0, created.stderr
        cid = json.loads(created.stdout)["cid"]
        sent = run_cli(["send", cid, "hello from alice"], alice_env)
        assert sent.returncode == 0, sent.stderr
        piped = run_cli(["send", cid], alice_env, input="second line\n")
        assert piped.returncode == 0, piped.stderr
        lines = _read_json_lines(listener)
    finally:
        reap(listener)
    messages = [m for m in lines if m["type"] == "message"]
    assert [(m["sender"], m["text"], m["cid"]) for m in messages] == [
        (alice, "hello from alice", cid),
        (alice, "second line", cid),
    ]
    listed = run_cli(["conv", "list", "--json"], bob_env)
    assert json.loads(listed.stdout)["members"] == [alice, bob]
    who = run_cli(["whoami", "--json"], bob_env)
    assert json.loads(who.stdout)["pid"] == bob


def test_conv_create_requires_post_quantum_members_unless_told_otherwise(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    """The default policy admits only members with ML-KEM-768 (PROTOCOL.md §5.2): an
    identity made with ``--no-pq`` is refused, and ``--allow-x25519-only`` admits it."""
    alice, alice_env = _init(tmp_path, "alice", mosquitto)
    state = str(tmp_path / "old.sqlite3")
    made = run_cli(["init", "--no-pq", "--json"], cli_env(state=state))
    assert made.returncode == 0, made.stderr
    old = json.loads(made.stdout)["pid"]
    old_env = cli_env(state=state, broker=mosquitto.url, credential=mosquitto.user(old))
    listener = start_cli(["listen", "--json", "--count", "1", "--duration", "60"], old_env)
    try:
        refused = run_cli(["conv", "create", old, "--timeout", "20"], alice_env)
        assert refused.returncode != 0
        assert "ML-KEM" in refused.stderr
        allowed = run_cli(
            ["conv", "create", old, "--allow-x25519-only", "--json", "--timeout", "20"], alice_env
        )
        assert allowed.returncode == 0, allowed.stderr
        cid = json.loads(allowed.stdout)["cid"]
        assert run_cli(["send", cid, "x25519 only"], alice_env).returncode == 0
        lines = _read_json_lines(listener)
    finally:
        reap(listener)
    assert [m["text"] for m in lines if m["type"] == "message"] == ["x25519 only"]


def test_errors_are_one_line_with_exit_codes(tmp_path: Path, mosquitto: Mosquitto) -> None:
    pid, env = _init(tmp_path, "carol", mosquitto)

    nobody = dict(env, FIELDCHAT_BROKER=f"mqtt://127.0.0.1:{free_port()}")
    out = run_cli(["conv", "create", "--timeout", "1"], nobody)
    assert out.returncode == 3
    assert out.stderr.startswith("error: cannot reach broker at 127.0.0.1:")
    assert len(out.stderr.strip().splitlines()) == 1

    wrong = dict(env, FIELDCHAT_CREDENTIAL="not-the-credential")
    out = run_cli(["conv", "create", "--timeout", "5"], wrong)
    assert out.returncode == 3
    assert "refused the credential" in out.stderr
    assert "not-the-credential" not in out.stderr + out.stdout

    out = run_cli(["send", "aaaaaaaaaaaaaaaaaaaaaaaaaa", "hi"], env)
    assert out.returncode == 1
    assert out.stderr.strip() == (
        "error: unknown conversation aaaaaaaaaaaaaaaaaaaaaaaaaa; nothing was sent"
    )

    out = run_cli(["whoami"], dict(env, FIELDCHAT_BROKER="http://example"))
    assert out.returncode == 2 and "use mqtt://host:port" in out.stderr
    mixed = dict(env, FIELDCHAT_BROKER=f"{mosquitto.url},mqtts://127.0.0.1:8883")
    out = run_cli(["whoami"], mixed)
    assert out.returncode == 2 and "mix mqtt:// and mqtts://" in out.stderr

    # cluster nodes, comma-separated: an unreachable one is passed over
    nodes = dict(env, FIELDCHAT_BROKER=f"mqtt://127.0.0.1:{free_port()},{mosquitto.url}")
    out = run_cli(["conv", "create", "--json", "--timeout", "10"], nodes)
    assert out.returncode == 0, out.stderr

    out = run_cli(["verify", "bbbbbbbbbbbbbbbbbbbbbbbbba", "--timeout", "1"], env)
    assert out.returncode == 1 and "no bundle for bbbbbbbbbbbbbbbbbbbbbbbbba" in out.stderr


def test_send_without_broker_keeps_the_message_and_the_next_command_sends_it(
    tmp_path: Path,
    mosquitto: Mosquitto,
) -> None:
    pid, env = _init(tmp_path, "dave", mosquitto)
    created = run_cli(["conv", "create", "--json"], env)
    cid = json.loads(created.stdout)["cid"]
    mosquitto.stop()
    out = run_cli(["send", cid, "kept", "--timeout", "1"], env)
    assert out.returncode == 0, out.stderr  # accepted: kept, not lost (a retry would repeat it)
    assert "accepted: 1 publication(s) kept in the outbox" in out.stderr
    waiting = run_cli(["outbox", "--json"], env)
    assert [json.loads(line)["cid"] for line in waiting.stdout.splitlines()] == [cid]
    mosquitto.start()
    out = run_cli(["send", cid, "and another"], env)
    assert out.returncode == 0, out.stderr
    assert run_cli(["outbox", "--json"], env).stdout == ""


def test_settings_from_a_toml_file(tmp_path: Path, mosquitto: Mosquitto) -> None:
    pid, env = _init(tmp_path, "erin", mosquitto)
    config = tmp_path / "device.toml"
    config.write_text(
        f'state = "{env["FIELDCHAT_STATE"]}"\nbroker = "{mosquitto.url}"\n'
        f'credential = "{env["FIELDCHAT_CREDENTIAL"]}"\nlow_bandwidth = true\n'
    )
    out = run_cli(["conv", "create", "--json", "--low-bandwidth"], cli_env(config=str(config)))
    assert out.returncode == 0, out.stderr
    # A flag wins over the file.
    out = run_cli(
        ["--broker", "mqtt://127.0.0.1:1", "conv", "create", "--timeout", "1"],
        cli_env(config=str(config)),
    )
    assert out.returncode == 3 and "127.0.0.1:1" in out.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text("colour = 'blue'\n")
    out = run_cli(["whoami"], cli_env(config=str(bad)))
    assert out.returncode == 2 and out.stderr.startswith("error: invalid configuration")


def test_send_and_listen_show_a_publication_the_broker_refused(tmp_path: Path) -> None:
    """MQTT 5 negative PUBACK (issue 17): ``send`` says so in one line and exits 3 (a
    broker refusal), ``listen --json`` prints a ``publish_refused`` line; neither
    leaves the message in the outbox to be refused again."""
    from tests.device.conftest import Embedded

    broker = Embedded(tmp_path / "embedded").start()
    try:
        pid, env = _init(tmp_path, "erin", broker)
        created = run_cli(["conv", "create", "--json"], env)
        assert created.returncode == 0, created.stderr
        cid = json.loads(created.stdout)["cid"]
        assert broker.thread is not None
        broker.thread.deny(pid, cid)

        out = run_cli(["send", cid, "denied"], env)
        assert out.returncode == 3
        warning, error = out.stderr.strip().splitlines()  # the library's log, the command's
        assert warning.startswith("WARNING the broker refused 1 msg publication(s)")
        assert error == (
            f"error: the broker refused 1 publication(s) to conversation {cid} "
            "(0x87 Not authorized); they are not sent again"
        )
        assert run_cli(["outbox", "--json"], env).stdout == ""

        offline = dict(env, FIELDCHAT_BROKER=f"mqtt://127.0.0.1:{free_port()}")
        assert run_cli(["send", cid, "queued", "--timeout", "1"], offline).returncode == 0
        listened = run_cli(["listen", "--json", "--duration", "3"], env)
        assert listened.returncode == 0, listened.stderr
        lines = [json.loads(line) for line in listened.stdout.splitlines() if line.strip()]
        refused = [line for line in lines if line["type"] == "publish_refused"]
        assert [(r["cid"], r["code"], r["reason"], r["messages"]) for r in refused] == [
            (cid, 0x87, "Not authorized", 1)
        ]
        assert run_cli(["outbox", "--json"], env).stdout == ""
    finally:
        broker.close()


def test_init_with_a_new_broker_forgets_a_remembered_protocol_level(tmp_path: Path) -> None:
    """A fall back to 3.1.1 is remembered for the broker that refused 5, not the next."""
    from fieldchat.device.state import DeviceState

    state = str(tmp_path / "frank.sqlite3")
    assert run_cli(["init"], cli_env(state=state)).returncode == 0
    saved = DeviceState(state)
    saved.set_meta({"protocol": "3.1.1 1764780000"})
    saved.close()
    out = run_cli(["init"], cli_env(state=state, broker="mqtt://127.0.0.1:1884"))
    assert out.returncode == 0, out.stderr
    saved = DeviceState(state)
    try:
        assert saved.get_meta("protocol") is None
        assert saved.get_meta("broker") == "mqtt://127.0.0.1:1884"
    finally:
        saved.close()


def test_an_event_line_is_written_for_a_person_not_as_a_python_repr():
    from fieldchat.device.cli_output import event_line
    from fieldchat.device.events import Connected

    line = event_line(Connected(protocol="5", session_present=True))
    assert line == "-- connected: protocol=5 session_present=True"

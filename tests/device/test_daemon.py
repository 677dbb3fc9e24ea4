"""``fieldchat device run`` and the device commands as its clients, in real processes
against a real Mosquitto on 127.0.0.1."""

from __future__ import annotations

import json
import signal
import socket
import stat
import subprocess
import time
from pathlib import Path

import pytest

from fieldchat.device.client import Device
from fieldchat.device.control_client import ControlClient, DaemonError, token_path
from tests.device._daemon import DaemonProcess, Lines
from tests.device.conftest import (
    Devices,
    Mosquitto,
    cli_env,
    conversation,
    free_port,
    run_cli,
    start_cli,
    texts,
    wait_until,
)

pytestmark = pytest.mark.mosquitto


def _daemon_env(devices: Devices, device: Device, mosquitto: Mosquitto) -> dict[str, str]:
    """Close the in-process ``device`` and return the environment its daemon runs with."""
    device.close()
    devices.open.remove(device)
    return cli_env(
        state=str(device.state.path), broker=mosquitto.url, credential=mosquitto.user(device.pid)
    )


def _next_json(lines: Lines, kind: str, timeout: float = 30) -> dict[str, object]:
    end = time.monotonic() + timeout
    while (left := end - time.monotonic()) > 0:
        line = lines.next(left)
        assert line, "the output ended"
        data = json.loads(line)
        if data["type"] == kind:
            return dict(data)
    raise AssertionError(f"no {kind} in {timeout} s")


def test_listen_send_and_chat_share_one_state_file_through_the_daemon(
    mosquitto_devices: Devices, mosquitto: Mosquitto
) -> None:
    cid, (alice, bob) = conversation(mosquitto_devices, "alice", "bob")
    env = _daemon_env(mosquitto_devices, bob, mosquitto)
    with DaemonProcess(env) as daemon:
        listener = start_cli(["listen", "--json"], env)
        chat = start_cli(["chat", cid], env, stdin=subprocess.PIPE)
        try:
            out, chat_out, chat_err = Lines(listener.stdout), Lines(chat.stdout), Lines(chat.stderr)
            while "-- chatting in" not in (line := chat_err.next()):
                assert line, "chat ended before it started"
            # listen and chat run together on bob's state file; send from a third shell.
            sent = run_cli(["send", cid, "from bob's send"], env)
            assert sent.returncode == 0, sent.stderr
            assert chat.stdin is not None
            chat.stdin.write("from bob's chat\n")
            chat.stdin.flush()
            wait_until(
                lambda: {"from bob's send", "from bob's chat"} <= set(texts(alice, cid)),
                20,
                "alice receives both",
            )
            alice.send(cid, "from alice")
            assert _next_json(out, "message")["text"] == "from alice"
            assert chat_out.next().endswith(": from alice\n")
            # One process owns the state file and the link: the daemon.
            assert daemon.proc is not None and daemon.proc.poll() is None
        finally:
            for proc in (listener, chat):
                proc.kill()
                proc.communicate()
    assert texts(alice, cid).count("from bob's send") == 1


def test_commands_run_standalone_when_no_daemon_answers(
    mosquitto_devices: Devices, mosquitto: Mosquitto
) -> None:
    cid, (alice, bob) = conversation(mosquitto_devices, "alice", "bob")
    env = _daemon_env(mosquitto_devices, bob, mosquitto)
    daemon = DaemonProcess(env).start()
    assert daemon.stop(signal.SIGKILL) == -signal.SIGKILL
    assert daemon.socket.exists(), "a killed daemon leaves its socket"
    # Nothing answers on the socket left behind: the command runs standalone, and the
    # next daemon replaces the socket.
    sent = run_cli(["send", cid, "standalone"], env)
    assert sent.returncode == 0, sent.stderr
    wait_until(lambda: "standalone" in texts(alice, cid), 20, "the standalone send")
    with DaemonProcess(env) as again:
        who = run_cli(["whoami", "--json"], env)
        assert json.loads(who.stdout)["pid"] == bob.pid
        assert again.stop() == 0
    assert not daemon.socket.exists(), "a stopped daemon removes its socket"


def test_a_retried_send_with_one_idempotency_key_is_delivered_once(
    mosquitto_devices: Devices, mosquitto: Mosquitto
) -> None:
    cid, (alice, bob) = conversation(mosquitto_devices, "alice", "bob")
    env = _daemon_env(mosquitto_devices, bob, mosquitto)
    request = {"cid": cid, "text": "exactly once", "idempotency_key": "reading-42"}
    with DaemonProcess(env) as daemon:
        with daemon.client() as client:
            first = client.call("send", request)
            again = client.call("send", request)
        assert first["replayed"] is False
        assert again == {**first, "replayed": True}
        assert daemon.stop() == 0
    with DaemonProcess(env) as daemon, daemon.client() as client:
        # The key is in the state file: a retry after a restart is still the first send.
        assert client.call("send", request) == {**first, "replayed": True}
        with pytest.raises(DaemonError) as conflict:
            client.call("send", {**request, "text": "another text"})
        assert conflict.value.code == 1006
        assert conflict.value.data["reason"] == "idempotency_conflict"
        client.call("send", {"cid": cid, "text": "the end"})
        wait_until(lambda: "the end" in texts(alice, cid), 20, "the last message")
    assert texts(alice, cid) == ["exactly once", "the end"]


def test_sigkill_of_the_daemon_mid_send_loses_nothing_accepted(
    mosquitto_devices: Devices, mosquitto: Mosquitto
) -> None:
    cid, (alice, bob) = conversation(mosquitto_devices, "alice", "bob")
    env = _daemon_env(mosquitto_devices, bob, mosquitto)
    accepted: list[str] = []
    daemon = DaemonProcess(env).start()
    try:
        with daemon.client() as client:
            for i in range(200):
                text = f"burst {i}"
                client.call("send", {"cid": cid, "text": text})
                accepted.append(text)  # answered: committed to the outbox
                if i == 120:
                    assert daemon.proc is not None
                    daemon.proc.kill()  # SIGKILL, mid-burst
                    break
    finally:
        daemon.close()
    with DaemonProcess(env):  # the next daemon delivers what the killed one accepted
        wait_until(lambda: set(accepted) <= set(texts(alice, cid)), 30, "every accepted message")
    got = texts(alice, cid)
    assert sorted(got, key=lambda t: int(t.split()[1])) == accepted
    assert len(got) == len(set(got)), "a message was delivered twice"


def _raw(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(str(path))
    return sock


def _reply(sock: socket.socket, line: bytes) -> object:
    sock.sendall(line)
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(65536)
        assert chunk, "the daemon closed the connection"
        data += chunk
    return json.loads(data)


def test_malformed_requests_get_json_rpc_errors_and_the_daemon_keeps_serving(
    mosquitto_devices: Devices, mosquitto: Mosquitto
) -> None:
    cid, (alice, bob) = conversation(mosquitto_devices, "alice", "bob")
    env = _daemon_env(mosquitto_devices, bob, mosquitto)
    with DaemonProcess(env) as daemon:
        mode = daemon.socket.stat().st_mode
        assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
        sock = _raw(daemon.socket)
        cases = [
            (b"{not json\n", -32700),
            (b'\xff\xfe"\n', -32700),
            (b'{"jsonrpc":"2.0","id":1}\n', -32600),
            (b'{"jsonrpc":"1.0","id":1,"method":"whoami"}\n', -32600),
            (b'{"jsonrpc":"2.0","id":1,"method":"nope"}\n', -32601),
            (b'{"jsonrpc":"2.0","id":1,"method":"send","params":{"cid":1,"text":"x"}}\n', -32602),
            (b'{"jsonrpc":"2.0","id":1,"method":"send","params":{"text":"x"}}\n', -32602),
            (b'{"jsonrpc":"2.0","id":1,"method":"send","params":{"cid":"a","b":2}}\n', -32602),
            (b"[]\n", -32600),
        ]
        for line, code in cases:
            reply = _reply(sock, line)
            assert isinstance(reply, dict) and reply["error"]["code"] == code, (line, reply)
        unknown = b'{"jsonrpc":"2.0","id":"u","method":"send","params":{"cid":"%s","text":"x"}}\n'
        reply = _reply(sock, unknown % b"aaaaaaaaaaaaaaaaaaaaaaaaaa")
        assert isinstance(reply, dict)
        assert reply["id"] == "u" and reply["error"]["code"] == 1003
        assert reply["error"]["data"] == {"reason": "unknown_conversation", "kind": "protocol"}
        # A batch: each request answered, notifications not; a bad one does not stop the rest.
        batch = [
            {"jsonrpc": "2.0", "id": 1, "method": "send", "params": {"cid": cid, "text": "b1"}},
            {"jsonrpc": "2.0", "method": "send", "params": {"cid": cid, "text": "b2"}},
            {"jsonrpc": "2.0", "id": 2, "method": "nope"},
            {"jsonrpc": "2.0", "id": 3, "method": "send", "params": [cid, "b3"]},
        ]
        replies = _reply(sock, json.dumps(batch).encode() + b"\n")
        assert isinstance(replies, list)
        assert [r["id"] for r in replies] == [1, 2, 3]
        assert "result" in replies[0] and replies[1]["error"]["code"] == -32601
        # A line past the limit is refused and that connection closed; others go on.
        long = _raw(daemon.socket)
        reply = _reply(long, b"[" + b" " * (300 * 1024) + b"\n")
        assert isinstance(reply, dict) and reply["error"]["code"] == -32600
        assert long.recv(10) == b""
        long.close()
        wait_until(lambda: {"b1", "b2", "b3"} <= set(texts(alice, cid)), 20, "the batch")
        with daemon.client() as client:
            assert client.call("whoami")["pid"] == bob.pid
        sock.close()
    assert sorted(texts(alice, cid)) == ["b1", "b2", "b3"]


def test_tcp_needs_the_token(mosquitto_devices: Devices, mosquitto: Mosquitto) -> None:
    cid, (alice, bob) = conversation(mosquitto_devices, "alice", "bob")
    env = _daemon_env(mosquitto_devices, bob, mosquitto)
    refused = run_cli(["run", "--tcp", "0.0.0.0:7000"], env)
    assert refused.returncode == 2 and "only a loopback address" in refused.stderr
    port = free_port()
    with DaemonProcess(env, "--tcp", f"127.0.0.1:{port}") as daemon:
        assert daemon.served.endswith(f"tcp 127.0.0.1:{port}")
        token_file = token_path(daemon.state)
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        token = token_file.read_text().strip()
        with pytest.raises(DaemonError, match="wrong token"):
            ControlClient.connect_tcp("127.0.0.1", port, "not-the-token")
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        request = b'{"jsonrpc":"2.0","id":1,"method":"send","params":{"cid":"%s","text":"x"}}\n'
        raw.sendall(request % cid.encode())
        reply = json.loads(raw.makefile("rb").readline())
        assert reply["error"]["code"] == -32000 and "unauthorized" in reply["error"]["message"]
        assert raw.recv(10) == b"", "an unauthorized connection is closed"
        raw.close()
        with ControlClient.connect_tcp("127.0.0.1", port, token) as client:
            client.call("send", {"cid": cid, "text": "over tcp"})
        wait_until(lambda: "over tcp" in texts(alice, cid), 20, "the tcp send")
        assert daemon.stop() == 0
    assert not token_file.exists()
    assert texts(alice, cid) == ["over tcp"]


def _event_schemas() -> dict[str, set[str]]:
    doc = json.loads((Path(__file__).parents[2] / "docs" / "device-rpc.openrpc.json").read_text())
    return {
        e["properties"]["type"]["const"]: set(e["properties"])
        for e in doc["x-notifications"]["event"]["params"]["oneOf"]
    }


def _until(client: ControlClient, kind: str, timeout: float = 30) -> dict[str, object]:
    end = time.monotonic() + timeout
    while (left := end - time.monotonic()) > 0:
        event = client.next_event(left)
        if event is not None and event["type"] == kind:
            return event
    raise AssertionError(f"no {kind} event in {timeout} s")


def test_subscribers_get_events_as_notifications(
    mosquitto_devices: Devices, mosquitto: Mosquitto
) -> None:
    cid, (alice, bob) = conversation(mosquitto_devices, "alice", "bob")
    env = _daemon_env(mosquitto_devices, bob, mosquitto)
    schemas = _event_schemas()
    with DaemonProcess(env) as daemon, daemon.client() as everything, daemon.client() as other:
        wait_until(lambda: everything.call("status")["connected"], 20, "the daemon connects")
        assert everything.call("subscribe") == {"connected": True, "protocol": "5"}
        other.call("subscribe", {"cids": ["bbbbbbbbbbbbbbbbbbbbbbbbbb"]})
        alice.send(cid, "to the subscribers")
        message = _until(everything, "message")
        assert (message["cid"], message["sender"], message["text"]) == (
            cid,
            alice.pid,
            "to the subscribers",
        )
        assert set(message) <= schemas["message"]
        everything.call("send", {"cid": cid, "text": "back"})  # alice receipts it
        got = _until(everything, "receipt")
        assert got["sender"] == alice.pid and set(got) <= schemas["receipt"]
        mosquitto.stop()
        gone = _until(everything, "disconnected")
        assert set(gone) <= schemas["disconnected"]
        assert _until(other, "disconnected", 5)  # no cid: every subscriber gets it
        mosquitto.start()
        back = _until(everything, "connected")
        assert set(back) <= schemas["connected"]
        assert _until(other, "connected")
        assert other.next_event(0.5) is None, "a message of another conversation came"
        everything.call("unsubscribe")
        alice.send(cid, "after unsubscribe")
        wait_until(
            lambda: any(m["text"] == "after unsubscribe" for m in everything.call("messages")),
            20,
            "the message is stored",
        )
        assert everything.next_event(0.3) is None


def test_connections_are_bounded(mosquitto_devices: Devices, mosquitto: Mosquitto) -> None:
    from fieldchat.device.daemon import MAX_CONNECTIONS

    cid, (alice, bob) = conversation(mosquitto_devices, "alice", "bob")
    env = _daemon_env(mosquitto_devices, bob, mosquitto)
    with DaemonProcess(env) as daemon:
        held = [daemon.client() for _ in range(MAX_CONNECTIONS)]
        try:
            for client in held:  # each is served (the server has accepted them all)
                assert client.call("whoami")["pid"] == bob.pid
            extra = _raw(daemon.socket)
            line = extra.makefile("rb").readline()
            assert json.loads(line)["error"]["code"] == -32000
            assert b"too many connections" in line
            extra.close()
        finally:
            for client in held:
                client.close()
        wait_until(lambda: _serves(daemon), 10, "a connection is free again")


def _serves(daemon: DaemonProcess) -> bool:
    with daemon.client() as client:
        try:
            return bool(client.call("whoami"))
        except ConnectionError:
            return False


def test_conversation_create_requires_post_quantum_unless_told_otherwise(
    mosquitto_devices: Devices, mosquitto: Mosquitto
) -> None:
    """``conversation.create`` passes ``require_pq`` (default true, PROTOCOL.md §5.2)."""
    _, (alice, bob) = conversation(mosquitto_devices, "alice", "bob")
    env = _daemon_env(mosquitto_devices, bob, mosquitto)
    with DaemonProcess(env) as daemon, daemon.client() as client:
        strict = client.call("conversation.create", {"members": [alice.pid], "timeout": 20})
        lax = client.call(
            "conversation.create", {"members": [alice.pid], "require_pq": False, "timeout": 20}
        )
    # On Mosquitto nobody verifies and retains a new roster (docs/cluster.md), so the
    # rosters are read from the daemon's state file, as its founder adopted them.
    founder = Device(bob.state.path)
    try:
        assert founder.engine.roster(strict["cid"]).policy.require_pq
        assert not founder.engine.roster(lax["cid"]).policy.require_pq
    finally:
        founder.close()

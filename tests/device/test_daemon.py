"""``fieldchat device run`` and the device commands as its clients, in real processes
against a real Mosquitto on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import typer

from fieldchat.device import remote
from fieldchat.device.client import Device
from fieldchat.device.control_client import ControlClient, DaemonError, DaemonGone, token_path
from fieldchat.device.daemon import Daemon
from tests.device._daemon import DaemonProcess, Lines, reap
from tests.device.conftest import (
    FAST,
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
            # They stop as they do standalone: Ctrl-D ends chat, SIGTERM listen.
            chat.stdin.close()
            assert chat.wait(30) == 0
            listener.send_signal(signal.SIGTERM)
            assert listener.wait(30) == 0
            assert listener.stderr is not None
            assert listener.stderr.read().strip() == "fieldchat device listen stopped."
        finally:
            reap(listener)
            reap(chat)
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
        assert again.proc is not None and again.proc.stderr is not None
        again.proc.send_signal(signal.SIGINT)  # Ctrl-C: the same clean stop as SIGTERM
        assert again.proc.wait(30) == 0
        assert again.err.next().strip() == "fieldchat device run stopped."
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
    answered: list[str] = []
    daemon = DaemonProcess(env).start()

    def burst(client: ControlClient) -> None:
        for i in range(100_000):
            try:
                client.call("send", {"cid": cid, "text": f"burst {i}"})
            except (DaemonGone, OSError):
                return  # killed while this call was in flight: it may or may not count
            answered.append(f"burst {i}")  # answered: committed to the outbox

    try:
        with daemon.client() as client:
            sender = threading.Thread(target=burst, args=(client,))
            sender.start()
            wait_until(lambda: len(answered) >= 150, 30, "sends answered")
            assert daemon.proc is not None
            daemon.proc.kill()  # SIGKILL, while sends are in flight
            sender.join(30)
            assert not sender.is_alive()
    finally:
        daemon.close()
    with DaemonProcess(env):  # the next daemon delivers what the killed one accepted
        wait_until(lambda: set(answered) <= set(texts(alice, cid)), 30, "every accepted message")
        time.sleep(0.5)  # and the one in flight at the kill, if it was committed
    got = texts(alice, cid)
    assert len(got) == len(set(got)), "a message was delivered twice"
    in_flight = f"burst {len(answered)}"
    assert set(got) - set(answered) <= {in_flight}
    assert got[: len(answered)] == answered, "delivered out of order"


def _raw(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(str(path))
    return sock


def _reply(sock: socket.socket, line: bytes) -> object:
    """Send ``line``; the first line that comes back (a reply: no notifications here,
    or only after it)."""
    sock.sendall(line)
    data = b""
    while b"\n" not in data:
        chunk = sock.recv(1)
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
        with contextlib.closing(_raw(daemon.socket)) as sock:
            cases = [
                (b"{not json\n", -32700),
                (b'\xff\xfe"\n', -32700),
                (b'{"jsonrpc":"2.0","id":1}\n', -32600),
                (b'{"jsonrpc":"1.0","id":1,"method":"whoami"}\n', -32600),
                (b'{"jsonrpc":"2.0","id":1,"method":"nope"}\n', -32601),
                (
                    b'{"jsonrpc":"2.0","id":1,"method":"send","params":{"cid":1,"text":"x"}}\n',
                    -32602,
                ),
                (b'{"jsonrpc":"2.0","id":1,"method":"send","params":{"text":"x"}}\n', -32602),
                (b'{"jsonrpc":"2.0","id":1,"method":"send","params":{"cid":"a","b":2}}\n', -32602),
                (b"[]\n", -32600),
            ]
            for line, code in cases:
                reply = _reply(sock, line)
                assert isinstance(reply, dict) and reply["error"]["code"] == code, (line, reply)
            unknown = (
                b'{"jsonrpc":"2.0","id":"u","method":"send","params":{"cid":"%s","text":"x"}}\n'
            )
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
            with contextlib.closing(_raw(daemon.socket)) as long:
                reply = _reply(long, b"[" + b" " * (300 * 1024) + b"\n")
                assert isinstance(reply, dict) and reply["error"]["code"] == -32600
                assert long.recv(10) == b""
            wait_until(lambda: {"b1", "b2", "b3"} <= set(texts(alice, cid)), 20, "the batch")
            with daemon.client() as client:
                assert client.call("whoami")["pid"] == bob.pid
    assert sorted(texts(alice, cid)) == ["b1", "b2", "b3"]


def test_tcp_needs_the_token(mosquitto_devices: Devices, mosquitto: Mosquitto) -> None:
    cid, (alice, bob) = conversation(mosquitto_devices, "alice", "bob")
    env = _daemon_env(mosquitto_devices, bob, mosquitto)
    refused = run_cli(["run", "--tcp", "0.0.0.0:7000"], env)
    assert refused.returncode == 2 and "only a loopback address" in refused.stderr
    with socket.create_server(("127.0.0.1", 0)) as taken:
        busy = taken.getsockname()[1]
        out = run_cli(["run", "--tcp", f"127.0.0.1:{busy}"], env)
    assert out.returncode == 2, out.stderr
    assert out.stderr.splitlines()[-1] == f"error: --tcp 127.0.0.1:{busy}: address already in use"
    assert not (Path(env["FIELDCHAT_STATE"] + ".sock")).exists()
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
        late = other.next_event(0.5)
        while late is not None and late["type"] == "presence":  # no cid: it comes too
            late = other.next_event(0.5)
        assert late is None, "a message of another conversation came"
        invited = alice.create_conversation([bob.pid])  # bob's daemon joins it
        joined = _until(everything, "joined")
        assert joined["cid"] == invited and set(joined) <= schemas["joined"]
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
            with contextlib.closing(_raw(daemon.socket)) as extra:
                line = extra.makefile("rb").readline()
            assert json.loads(line)["error"]["code"] == -32000
            assert b"too many connections" in line
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


def test_every_device_command_goes_through_the_daemon(
    mosquitto_devices: Devices, mosquitto: Mosquitto
) -> None:
    cid, (alice, bob, carol) = conversation(mosquitto_devices, "alice", "bob", "carol")
    env = _daemon_env(mosquitto_devices, bob, mosquitto)
    # A config file that does not exist fails every standalone command (status 2);
    # through the daemon the command never reads settings, so it proves the route.
    routed = dict(env, FIELDCHAT_CONFIG=str(Path(env["FIELDCHAT_STATE"]).with_name("none.toml")))
    standalone = run_cli(["whoami"], dict(routed, FIELDCHAT_NO_DAEMON="1"))
    assert standalone.returncode == 2 and "does not exist" in standalone.stderr
    with DaemonProcess(env):

        def ok(*args: str, stdin: str | None = None) -> str:
            out = run_cli(list(args), routed, input=stdin)
            assert out.returncode == 0, (args, out.stderr)
            return out.stdout

        assert json.loads(ok("whoami", "--json"))["pid"] == bob.pid
        if shutil.which("socat"):  # docs/device.md's shell example, as printed there
            request = '{"jsonrpc":"2.0","id":1,"method":"whoami"}\n'
            target = f"UNIX-CONNECT:{env['FIELDCHAT_STATE']}.sock"
            shell = subprocess.run(
                ["socat", "-", target],
                input=request,
                capture_output=True,
                text=True,
                timeout=20,
                check=True,
            )
            assert json.loads(shell.stdout)["result"]["pid"] == bob.pid
        assert ok("whoami", "--pid").strip() == bob.pid
        created = json.loads(ok("conv", "create", alice.pid, "--json"))["cid"]
        wait_until(lambda: alice.engine.is_member(created), 20, "alice joins bob's conversation")
        ok("conv", "invite", created, carol.pid)
        wait_until(lambda: carol.engine.is_member(created), 20, "carol joins")
        listed = [json.loads(line) for line in ok("conv", "list", "--json").splitlines()]
        assert {c["cid"] for c in listed} == {cid, created}
        members = next(c for c in listed if c["cid"] == created)["members"]
        assert set(members) == {alice.pid, bob.pid, carol.pid}
        assert ok("verify", alice.pid).split()[0] == alice.pid
        fingerprint = alice.fingerprint()
        assert ok("verify", alice.pid, fingerprint).splitlines()[-1] == "verified"
        wrong = run_cli(["verify", alice.pid, "1" * 60], routed)
        assert wrong.returncode == 1 and "FINGERPRINTS DIFFER" in wrong.stderr
        ok("send", created, "one")
        piped = [f"line {i}" for i in range(300)]  # batches of at most 64 requests
        ok("send", created, stdin="".join(f"{line}\n" for line in piped))
        wait_until(lambda: texts(alice, created) == ["one", *piped], 30, "the texts")
        ok("outbox", "--json")
        ok("conv", "remove", created, carol.pid)
        wait_until(lambda: not carol.engine.is_member(created), 20, "carol removed")
        ok("conv", "leave", cid)
        unknown = run_cli(["send", "aaaaaaaaaaaaaaaaaaaaaaaaaa", "x"], routed)
        assert unknown.returncode == 1
        assert unknown.stderr.strip() == "error: unknown conversation aaaaaaaaaaaaaaaaaaaaaaaaaa"


def test_a_subscriber_that_stops_reading_is_disconnected_not_buffered(
    mosquitto_devices: Devices, mosquitto: Mosquitto, caplog: pytest.LogCaptureFixture
) -> None:
    cid, (alice, bob) = conversation(mosquitto_devices, "alice", "bob")
    bob.close()
    mosquitto_devices.open.remove(bob)
    device = Device(bob.state.path, mosquitto.options(bob.pid), link=FAST)
    served = threading.Event()
    daemon = Daemon(device, ready=lambda _: served.set(), max_queued=4)
    loop = asyncio.new_event_loop()
    task = loop.create_task(daemon.serve())

    def run() -> None:
        with contextlib.suppress(asyncio.CancelledError):  # the stop below
            loop.run_until_complete(task)

    runner = threading.Thread(target=run)
    runner.start()
    try:
        assert served.wait(20)
        stuck = _raw(daemon.path)
        stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        try:
            assert _reply(stuck, b'{"jsonrpc":"2.0","id":1,"method":"subscribe"}\n')
            count = 3_000  # far more event bytes than the socket buffers and the queue hold
            alice.send_many(cid, [f"flood {i}" for i in range(count)])
            stuck.settimeout(60)
            while stuck.recv(65536):  # what was written before the drop, then the end
                pass
        finally:
            stuck.close()
        assert "fell 4 lines behind: disconnected" in caplog.text
        with ControlClient.connect(daemon.path) as client:  # type: ignore[union-attr]
            wait_until(
                lambda: len(client.call("messages", {"cid": cid, "limit": 1000})) == 1000,
                60,
                "the flood is stored",
            )
            assert client.call("listen.take", {"limit": 1})[0]["text"] == "flood 0"
    finally:
        loop.call_soon_threadsafe(task.cancel)
        runner.join(30)
        loop.close()
    assert not daemon.path.exists()


def test_listen_waits_for_a_daemon_that_restarts(
    mosquitto_devices: Devices, mosquitto: Mosquitto
) -> None:
    cid, (alice, bob) = conversation(mosquitto_devices, "alice", "bob")
    env = _daemon_env(mosquitto_devices, bob, mosquitto)
    daemon = DaemonProcess(env).start()
    listener = start_cli(["listen", "--json", "--count", "2"], env)
    try:
        out, err = Lines(listener.stdout), Lines(listener.stderr)
        alice.send(cid, "before the restart")
        assert _next_json(out, "message")["text"] == "before the restart"
        assert daemon.stop() == 0  # systemctl restart: a stop, then a start
        assert "waiting for it to come back" in err.next()
        alice.send(cid, "while it was down")  # the broker keeps it for bob's session
        with DaemonProcess(env):
            assert _next_json(out, "message")["text"] == "while it was down"
            assert listener.wait(30) == 0
    finally:
        reap(listener)
        daemon.close()


def test_the_daemon_accepts_sends_while_the_broker_is_down(
    mosquitto_devices: Devices, mosquitto: Mosquitto
) -> None:
    cid, (alice, bob) = conversation(mosquitto_devices, "alice", "bob")
    env = _daemon_env(mosquitto_devices, bob, mosquitto)
    mosquitto.stop()
    with DaemonProcess(env):  # it serves at once; the link keeps trying
        sent = run_cli(["send", cid, "kept for later"], env)
        assert sent.returncode == 0, sent.stderr
        waiting = run_cli(["outbox", "--json"], env)
        rows = [json.loads(line) for line in waiting.stdout.splitlines()]
        # The text, and whatever else the device queued meanwhile (its JOINED control,
        # under its conversation too; inbox deliveries, without one).
        own = [r for r in rows if r["what"] == "msg"]
        assert own and all(r["cid"] == cid for r in own), rows
        mosquitto.start()
        wait_until(lambda: "kept for later" in texts(alice, cid), 30, "delivery after the broker")
        assert run_cli(["outbox", "--json"], env).stdout == ""


NOBODY = 65534
SYSTEM_PYTHON = "/usr/bin/python3"  # readable by another user (the venv lives under /root)
needs_root = pytest.mark.skipif(
    os.getuid() != 0 or not os.access(SYSTEM_PYTHON, os.X_OK),
    reason="runs a process as another user (root and /usr/bin/python3 needed)",
)


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory every user may write (sticky, as /tmp): where a state file should not
    be, and where another user can put a socket beside it."""
    path = Path(tempfile.mkdtemp(prefix="fieldchat-shared-", dir="/tmp"))
    path.chmod(0o1777)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


_FAKE_DAEMON = """
import socket, sys
server = socket.socket(socket.AF_UNIX)
server.bind(sys.argv[1]); server.listen(); print("ready", flush=True)
conn, _ = server.accept(); conn.settimeout(10)
try:
    print(repr(conn.recv(65536)), flush=True)
except OSError:
    print("nothing", flush=True)
"""


@needs_root
def test_the_client_sends_nothing_to_a_socket_of_another_user(shared_dir: Path) -> None:
    state = shared_dir / "pi.db"
    Device(state, post_quantum=False).close()  # ours (root), 0600
    fake = subprocess.Popen(
        [SYSTEM_PYTHON, "-c", _FAKE_DAEMON, str(state) + ".sock"],
        user=NOBODY,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert fake.stdout is not None and fake.stdout.readline() == "ready\n"
        out = run_cli(["send", "aaaaaaaaaaaaaaaaaaaaaaaaaa", "a secret"], cli_env(state=str(state)))
        assert out.returncode == 2
        assert f"served by uid {NOBODY}, not by the state file's owner" in out.stderr
        got, _ = fake.communicate(timeout=20)
    finally:
        if fake.poll() is None:
            fake.kill()
        fake.wait()
    assert "a secret" not in got and got.strip() in ("b''", "nothing")


_OTHER_CLIENT = """
import socket, sys
sock = socket.socket(socket.AF_UNIX); sock.connect(sys.argv[1])
sock.sendall(b'{"jsonrpc":"2.0","id":1,"method":"whoami"}\\n')
print(sock.makefile("rb").readline().decode(), flush=True)
"""


@needs_root
def test_the_daemon_serves_no_other_user_even_if_its_socket_mode_changed(
    shared_dir: Path, mosquitto: Mosquitto
) -> None:
    state = shared_dir / "pi.db"
    Device(state, post_quantum=False).close()
    env = cli_env(state=str(state), broker=mosquitto.url)
    with DaemonProcess(env) as daemon:
        daemon.socket.chmod(0o666)  # a mistake an operator could make
        other = subprocess.run(
            [SYSTEM_PYTHON, "-c", _OTHER_CLIENT, str(daemon.socket)],
            user=NOBODY,
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
        assert other.stdout, other.stderr
        reply = json.loads(other.stdout)
        assert reply["error"]["code"] == -32000
        assert reply["error"]["message"] == "not the daemon's user"
        with daemon.client() as client:  # its owner still is served
            assert client.call("whoami")["state"] == str(state)


def test_a_stop_is_not_held_by_a_method_that_waits(
    mosquitto_devices: Devices, mosquitto: Mosquitto
) -> None:
    cid, (alice, bob) = conversation(mosquitto_devices, "alice", "bob")
    env = _daemon_env(mosquitto_devices, bob, mosquitto)
    mosquitto.stop()
    daemon = DaemonProcess(env).start()
    try:
        with daemon.client() as client:
            client.call("send", {"cid": cid, "text": "waits for the broker"})
            outcome: list[object] = []

            def drain() -> None:
                try:
                    outcome.append(client.call("drain", {"timeout": 120}))
                except (DaemonGone, OSError) as exc:
                    outcome.append(exc)

            waiting = threading.Thread(target=drain)
            waiting.start()
            time.sleep(0.3)  # the drain is waiting
            started = time.monotonic()
            assert daemon.stop() == 0
            assert time.monotonic() - started < 5, "the stop waited for the drain"
            waiting.join(10)
            # Answered "not drained" as the daemon stopped, or cut off by the stop.
            assert len(outcome) == 1
            answer = outcome[0]
            assert isinstance(answer, DaemonGone | OSError) or (
                isinstance(answer, dict) and answer["drained"] is False
            )
    finally:
        daemon.close()
    mosquitto.start()
    with DaemonProcess(env):  # and the message it accepted is still delivered
        wait_until(lambda: texts(alice, cid) == ["waits for the broker"], 30, "delivery")


def test_delivery_waits_for_the_broker_and_for_receipts(
    mosquitto_devices: Devices, mosquitto: Mosquitto
) -> None:
    cid, (alice, bob) = conversation(mosquitto_devices, "alice", "bob")
    env = _daemon_env(mosquitto_devices, bob, mosquitto)
    with DaemonProcess(env) as daemon, daemon.client() as client:
        wait_until(lambda: client.call("status")["connected"], 20, "the daemon connects")
        sent = [client.call("send", {"cid": cid, "text": f"m{i}"})["id"] for i in range(3)]
        done = client.call("delivery", {"ids": sent, "acks": 1, "timeout": 30})
        assert done == {"delivered": True, "published": 3, "acknowledged": 3, "messages": 3}
        assert texts(alice, cid) == ["m0", "m1", "m2"]
        mosquitto.stop()
        kept = client.call("send", {"cid": cid, "text": "kept"})["id"]
        late = client.call("delivery", {"ids": [kept], "timeout": 0.5})
        assert late == {"delivered": False, "published": 0, "acknowledged": 0, "messages": 1}
        with pytest.raises(DaemonError, match="no message 999999 was sent"):
            client.call("delivery", {"ids": [999_999]})


def _as_nobody(call: Callable[[], object]) -> tuple[int, str]:
    """Run ``call`` in a forked child as uid/gid 65534 (the modules are loaded already);
    its ``typer.Exit`` code and what it wrote to stderr."""
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child
        code = 0
        sys.stderr = os.fdopen(write, "w")  # what typer.echo(err=True) writes to
        try:
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            call()
        except typer.Exit as exc:
            code = exc.exit_code
        except BaseException:
            code = 99
        finally:
            sys.stderr.flush()
            os._exit(code)
    os.close(write)
    with os.fdopen(read) as stream:
        err = stream.read()
    _, status = os.waitpid(child, 0)
    return os.waitstatus_to_exitcode(status), err


@needs_root
def test_another_user_is_told_the_daemon_serves_only_its_owner(
    shared_dir: Path, mosquitto: Mosquitto
) -> None:
    state = shared_dir / "pi.db"
    Device(state, post_quantum=False).close()
    with DaemonProcess(cli_env(state=str(state), broker=mosquitto.url)):
        code, err = _as_nobody(lambda: remote.daemon_for(state, None))
    assert code == 2, err
    assert "serves only its user: run this command as the state file's owner (uid 0)" in err


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

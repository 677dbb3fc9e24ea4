"""The Device library against a real Mosquitto on 127.0.0.1."""

from __future__ import annotations

import pytest

from fieldchat.device.events import Joined, MessageReceived, ReceiptReceived
from tests.device.conftest import Devices, Mosquitto, texts, wait_until

pytestmark = pytest.mark.mosquitto


def test_two_devices_talk_both_ways(devices: Devices) -> None:
    alice = devices.make("alice")
    bob = devices.make("bob")
    # "auto" speaks MQTT 5 where the broker does (both do: the embedded broker since
    # issue 17) and falls back to 3.1.1 elsewhere.
    assert alice.protocol == "5"

    cid = alice.create_conversation([bob.pid])
    wait_until(lambda: bob.engine.is_member(cid), 10, "bob joins")
    alice.send(cid, "hello bob")
    wait_until(lambda: texts(bob, cid) == ["hello bob"], 10, "bob receives")
    bob.send(cid, "hi alice")
    wait_until(lambda: texts(alice, cid) == ["hi alice"], 10, "alice receives")

    received = [e for e in devices.events[bob.pid] if isinstance(e, MessageReceived)]
    assert [(e.sender, e.text, e.signed) for e in received] == [(alice.pid, "hello bob", True)]
    assert any(isinstance(e, Joined) and e.cid == cid for e in devices.events[bob.pid])
    # Bob's delivery receipt comes back to Alice, encrypted like any message.
    wait_until(
        lambda: any(
            isinstance(e, ReceiptReceived) and e.sender == bob.pid
            for e in devices.events[alice.pid]
        ),
        10,
        "a delivery receipt",
    )
    assert alice.wait_drained(5)


def test_wrong_credential_and_no_broker_are_typed_errors(tmp_path, mosquitto) -> None:
    from pydantic import SecretStr

    from fieldchat.device.client import Device
    from fieldchat.device.config import BrokerOptions
    from fieldchat.schemas.errors import ConnectFailed, NotAuthorized
    from tests.device.conftest import FAST, free_port

    with (
        Device(
            tmp_path / "x.sqlite3",
            BrokerOptions(port=mosquitto.port, credential=SecretStr("wrong")),
            link=FAST,
        ) as device,
        pytest.raises(NotAuthorized, match="refused the credential"),
    ):
        device.wait_connected(10)
    with (
        Device(tmp_path / "y.sqlite3", BrokerOptions(port=free_port()), link=FAST) as device,
        pytest.raises(ConnectFailed, match="cannot reach broker"),
    ):
        device.wait_connected(1)


def test_redelivered_envelopes_show_once(mosquitto_devices: Devices) -> None:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    devices = mosquitto_devices
    alice, bob = devices.make("alice"), devices.make("bob")
    cid = alice.create_conversation([bob.pid])
    wait_until(lambda: bob.engine.is_member(cid), 10, "bob joins")
    alice.send_many(cid, ["one", "two"])
    wait_until(lambda: texts(bob, cid) == ["one", "two"], 10, "bob receives")
    # The broker (or a retransmitting sender) delivers the same envelopes again.
    replay = [bytes(p) for (p,) in alice.state._read("SELECT payload FROM sent ORDER BY id")]
    raw = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="replayer")
    raw.username_pw_set("replayer", devices.broker.user("replayer"))
    raw.connect("127.0.0.1", devices.broker.port)
    raw.loop_start()
    try:
        for payload in replay * 3:
            raw.publish(alice.topics.msg(cid), payload, qos=1).wait_for_publish(5)
    finally:
        raw.disconnect()
        raw.loop_stop()
    alice.send(cid, "three")
    wait_until(lambda: len(texts(bob, cid)) == 3, 10, "the next message")
    assert texts(bob, cid) == ["one", "two", "three"]
    assert bob.counters["duplicate"] >= 6

    def shown() -> list[str]:
        return [e.text for e in devices.events[bob.pid] if isinstance(e, MessageReceived)]

    wait_until(lambda: len(shown()) >= 3, 10, "the events")
    assert shown() == ["one", "two", "three"]


def test_verify_checks_fingerprints_and_an_update_keeps_them(mosquitto_devices: Devices) -> None:
    """The fingerprint is the identity key's (the pid's): a prekey rotated by an update
    (PROTOCOL.md §6.7) is the same identity, still verified; Alice, the admin, answers
    Bob's UPDATE with a new epoch keyed to his new prekey, and they talk on."""
    devices = mosquitto_devices
    alice, bob = devices.make("alice"), devices.make("bob")
    cid = alice.create_conversation([bob.pid])
    wait_until(lambda: bob.engine.is_member(cid), 10, "bob joins")
    assert not alice.verify(bob.pid, "00000 " * 12)
    assert alice.verify(bob.pid, bob.fingerprint())
    bob.update()
    wait_until(
        lambda: bob.engine.roster(cid).epoch == 1 and bob.engine.keyed(cid), 10, "the new epoch"
    )
    learned = alice.engine.bundle_of(bob.pid)
    assert learned is not None
    assert learned.prekey.id == bob.engine.identity.current.public.id == 2
    assert alice.engine.is_verified(bob.pid)
    bob.send(cid, "after the update")
    wait_until(lambda: texts(alice, cid) == ["after the update"], 10, "alice receives")


CRASHING_DEVICE = """
import os, sys
from pydantic import SecretStr
from fieldchat.device.client import Device
from fieldchat.device.config import BrokerOptions
broker = BrokerOptions(port=int(sys.argv[2]), credential=SecretStr(sys.argv[3]))
device = Device(sys.argv[1], broker)
device.start().wait_connected(10)
device.send(sys.argv[4], "x")
assert device.wait_drained(10)
os._exit(0)  # no close: as a crash, the next start resumes at the reservation
"""


def test_a_clean_restart_leaves_no_gap_and_a_crash_asks_the_history_seam(
    tmp_path,
    mosquitto: Mosquitto,
) -> None:
    import subprocess
    import sys
    import time

    from fieldchat.device.chains import RESERVE_STEPS
    from fieldchat.device.events import GapDetected
    from tests.device.conftest import FAST

    class History:
        """A history source holding nothing (as a gateway with no archive would)."""

        def __init__(self) -> None:
            self.asked: list[str] = []

        def since(
            self, cid: str, after: int, limit: int, *, from_epoch: int = 0
        ) -> tuple[list[bytes], int, bool]:
            self.asked.append(cid)
            return [], after, False

        def rosters(self, cid: str, *, from_epoch: int = 0) -> list[bytes]:
            return []

        def deliveries(self, cid: str) -> list[bytes]:
            return []

    devices = Devices(tmp_path, mosquitto)
    history = History()
    try:
        alice = devices.make("alice")
        bob = devices.make("bob", start=False)
        bob.history = history
        # A message past a missing step waits this long for it: "c" below must not.
        bob.options = FAST.model_copy(
            update={"gap_timeout_s": 0.5, "reorder_window_s": 4.0, "history_tail_s": 3600.0}
        )
        bob.start().wait_connected(10)
        cid = alice.create_conversation([bob.pid])
        wait_until(lambda: bob.engine.is_member(cid), 10, "bob joins")
        alice.send_many(cid, ["a", "b"])
        wait_until(lambda: texts(bob, cid) == ["a", "b"], 10, "first two")

        alice = devices.reopen(alice)  # a clean stop keeps the unused reserved steps
        alice.wait_connected(10)
        sent_at = time.monotonic()
        alice.send(cid, "c")
        wait_until(lambda: texts(bob, cid) == ["a", "b", "c"], 10, "after the clean restart")
        assert time.monotonic() - sent_at < 3.0, "held back as if a step were missing"
        assert not [e for e in devices.events[bob.pid] if isinstance(e, GapDetected)]

        # A crash resumes at the reservation: steps 4..RESERVE_STEPS-1 never exist.
        alice.close()  # reopened below
        subprocess.run(
            [
                sys.executable,
                "-c",
                CRASHING_DEVICE,
                str(alice.state.path),
                str(mosquitto.port),
                mosquitto.user(alice.pid),
                cid,
            ],
            check=True,
            timeout=60,
            capture_output=True,
        )
        wait_until(lambda: texts(bob, cid) == ["a", "b", "c", "x"], 10, "the crashed run's")
        alice = devices.reopen(alice)
        alice.wait_connected(10)
        alice.send(cid, "d")
        wait_until(lambda: texts(bob, cid)[-1:] == ["d"], 10, "after the crash")
        gaps = [e for e in devices.events[bob.pid] if isinstance(e, GapDetected)]
        assert [(g.sender, g.first, g.last) for g in gaps] == [(alice.pid, 4, RESERVE_STEPS - 1)]
        asked = len(history.asked)  # the rounds after connecting and joining
        # The gap outlives gap_timeout_s: a tail round asks the gateway (no periodic
        # round is due for an hour), though alice keeps the link busy meanwhile.
        end = time.monotonic() + 15
        while len(history.asked) == asked and time.monotonic() < end:
            alice.send(cid, "busy")
            time.sleep(0.2)
        assert len(history.asked) > asked, "no history request while the link was busy"
        assert history.asked[asked] == cid and bob.counters["gaps_asked"] == 1
        assert bob.gaps() == []
    finally:
        devices.close()


def test_leave_and_invite(devices: Devices) -> None:
    from fieldchat.device.events import Removed

    alice, bob, carol = devices.make("alice"), devices.make("bob"), devices.make("carol")
    cid = alice.create_conversation([bob.pid])
    wait_until(lambda: bob.engine.is_member(cid), 10, "bob joins")
    alice.invite(cid, [carol.pid])
    wait_until(lambda: carol.engine.is_member(cid), 10, "carol joins")
    carol.send(cid, "hi all")
    wait_until(
        lambda: texts(alice, cid) == ["hi all"] and texts(bob, cid) == ["hi all"],
        10,
        "carol is heard",
    )
    bob.leave(cid)
    # Alice, the admin, removes Bob in a new epoch on his LEAVE.
    wait_until(lambda: bob.pid not in alice.engine.roster(cid).pids, 10, "bob removed")
    wait_until(
        lambda: carol.engine.roster(cid).epoch == alice.engine.roster(cid).epoch,
        10,
        "carol follows",
    )
    if isinstance(devices.broker, Mosquitto):
        wait_until(
            lambda: any(isinstance(e, Removed) for e in devices.events[bob.pid]),
            10,
            "bob's device notices",
        )
    assert [i.member for i in bob.conversations() if i.cid == cid] in ([False], [True])


def test_a_backlog_leaves_in_frames_and_arrives_in_order_exactly_once(devices: Devices) -> None:
    """A burst is framed (PROTOCOL.md §3.4): up to 64 envelopes a PUBLISH, never more
    bytes than one envelope may have, each envelope shown once in order; a peer that
    predates frames is served bare by ``frame_envelopes=1``."""
    from fieldchat.device.config import LinkOptions

    alice = devices.make("alice")
    bob = devices.make("bob")
    cid = alice.create_conversation([bob.pid])
    wait_until(lambda: bob.engine.is_member(cid), 10, "bob joins")
    before = alice.counters["frames"]
    lines = [f"burst {i}" for i in range(150)]
    big = ["x" * 15_000 + str(i) for i in range(6)]  # four fit in one frame's 64 KiB
    alice.send_many(cid, lines)
    alice.send_many(cid, big)
    wait_until(lambda: len(texts(bob, cid)) == 156, 20, "every message")
    assert texts(bob, cid) == lines + big
    assert alice.counters["frames"] - before >= 4  # 150 in 3 frames at least, big in 2
    assert bob.counters["duplicate"] == 0

    bare = LinkOptions(backoff_min_s=0.1, backoff_max_s=0.5, frame_envelopes=1)
    alice = devices.reopen(alice, link=bare)
    alice.wait_connected(10)
    framed, sent_bare = alice.counters["frames"], alice.counters["bare"]
    alice.send_many(cid, ["one by one"] * 20)
    wait_until(lambda: len(texts(bob, cid)) == 176, 20, "the unframed burst")
    assert alice.counters["frames"] == framed
    assert alice.counters["bare"] - sent_bare >= 20


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_low_bandwidth_conversation(mosquitto_devices: Devices, protocol: str) -> None:
    from fieldchat.device.config import LinkOptions, low_bandwidth_policy

    slow = LinkOptions.low_bandwidth().model_copy(
        update={"receipt_interval_s": 0.5, "backoff_min_s": 0.1}
    )
    alice = mosquitto_devices.make("alice", link=slow, protocol=protocol)
    bob = mosquitto_devices.make("bob", link=slow, protocol=protocol)
    cid = alice.create_conversation([bob.pid], policy=low_bandwidth_policy(sign_every=4))
    wait_until(lambda: bob.engine.is_member(cid), 10, "bob joins")
    line = "field report: pump 3 pressure nominal, valve 7 replaced, all ok"
    alice.send_many(cid, [line] * 8)
    wait_until(lambda: len(texts(bob, cid)) == 8, 10, "eight messages")

    def shown() -> list[MessageReceived]:  # events follow the commit that texts() reads
        return [e for e in mosquitto_devices.events[bob.pid] if isinstance(e, MessageReceived)]

    wait_until(lambda: len(shown()) == 8, 10, "eight message events")
    received = shown()
    # One in four signed; compressed plaintext keeps envelopes small.
    assert [e.signed for e in received] == [e.step % 4 == 0 for e in received]
    sizes = [len(bytes(p)) for (p,) in alice.state._read("SELECT payload FROM sent")]
    assert max(s for s, e in zip(sizes, received, strict=True) if not e.signed) < len(line) + 32
    if protocol == "5":
        assert alice._conn is not None and alice._conn.alias_max > 0


def test_packets_leave_at_once_without_waiting_for_the_brokers_delayed_ack(mosquitto_devices):
    """TCP_NODELAY on the device's connection, on both protocols.

    With Nagle's algorithm on, a PUBLISH written while an earlier PUBACK of ours was
    unacknowledged waited for the broker's delayed ACK: on MQTT 3.1.1, where every own
    message comes back and is PUBACKed, a message at 50/s took 17 ms (median) from
    ``send`` to the peer's socket instead of 0.7 ms (bench/device.py's setup).
    """
    import socket

    for protocol in ("3.1.1", "5"):
        device = mosquitto_devices.make(f"d{protocol}", protocol=protocol)
        assert device.protocol == protocol
        connection = device._link.connection if device._link else None
        assert connection is not None
        sock = connection.client.socket()
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


def test_every_socket_write_holds_the_connections_io_lock(mosquitto_devices: Devices) -> None:
    """paho 2.2 has no lock around its packet writer: the worker's PUBLISHes and
    PUBACKs and the link thread's loop each write under ``LinkConnection.io``
    (device/link.py), so two writers never interleave partly written packets."""
    import threading

    from fieldchat.device.client import Device

    writes: dict[str, list[tuple[str, bool]]] = {}

    def watch(device: Device) -> None:
        connection = device._link.connection if device._link else None
        assert connection is not None
        client = connection.client
        send = client._sock_send
        seen = writes.setdefault(device.pid, [])

        def recorded(buf: bytes | bytearray) -> int:
            seen.append((threading.current_thread().name, connection.io.locked()))
            return send(buf)

        client._sock_send = recorded  # type: ignore[method-assign]

    alice = mosquitto_devices.make("alice")
    bob = mosquitto_devices.make("bob")
    cid = alice.create_conversation([bob.pid])
    wait_until(lambda: bob.engine.is_member(cid), 10, "bob joins")
    watch(alice)
    watch(bob)
    lines = [f"m{i}" for i in range(300)]
    for i in range(0, len(lines), 30):
        alice.send_many(cid, lines[i : i + 30])
        bob.send(cid, f"reply {i}")
    wait_until(lambda: texts(bob, cid) == lines, 20, "bob receives all")
    wait_until(lambda: len(texts(alice, cid)) == 10, 20, "alice receives the replies")
    assert alice.wait_drained(10) and bob.wait_drained(10)
    for seen in writes.values():
        assert seen and all(locked for _, locked in seen)
        # PUBLISH from the worker at once (no hand-off), PUBACKs from the sync thread.
        assert "fieldchat-device" in {name for name, _ in seen}


def test_a_slow_history_source_does_not_hold_up_live_messages(
    tmp_path, mosquitto: Mosquitto
) -> None:
    """History requests run beside the worker: a gateway answering in 4 s (a slow link)
    delays nothing else."""
    import threading
    import time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from fieldchat.device.history import GatewayHistory
    from tests.device.conftest import FAST

    requests: list[tuple[float, float]] = []

    class SlowGateway(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            began = time.monotonic()
            time.sleep(4.0)
            body = b'{"items": [], "next_after": 0, "more": false}'
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            requests.append((began, time.monotonic()))

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), SlowGateway)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    devices = Devices(tmp_path, mosquitto)
    try:
        alice = devices.make("alice")
        bob = devices.make("bob", start=False)
        bob.options = FAST.model_copy(update={"history_tail_s": 0.5})
        bob.history = GatewayHistory(
            f"http://127.0.0.1:{server.server_address[1]}", bob.engine.identity
        )
        bob.start().wait_connected(10)
        cid = alice.create_conversation([bob.pid])
        wait_until(lambda: bob.engine.is_member(cid), 10, "bob joins")
        time.sleep(1.0)  # a tail round (or the join's backfill) is waiting on the gateway
        sent = time.monotonic()
        alice.send(cid, "live")
        wait_until(lambda: texts(bob, cid) == ["live"], 10, "the live message")
        shown = time.monotonic()
        assert shown - sent < 2.0
        wait_until(lambda: bool(requests), 15, "a slow history answer")
        assert any(began < sent and shown < ended for began, ended in requests)
    finally:
        devices.close()
        server.shutdown()
        server.server_close()


def test_a_list_of_cluster_nodes_is_tried_in_turn(tmp_path) -> None:
    """``fallbacks``: a node that cannot be reached is skipped at once, and a node that
    goes away hands the device to the next one (the nodes of one cluster)."""
    from fieldchat.device.client import Device
    from fieldchat.device.config import BrokerOptions
    from tests.device.conftest import FAST, free_port

    first = Mosquitto(tmp_path / "n1", anonymous=True).start()
    second = Mosquitto(tmp_path / "n2", anonymous=True).start()
    dead = free_port()
    broker = BrokerOptions(
        port=dead, fallbacks=(("127.0.0.1", first.port), ("127.0.0.1", second.port))
    )
    device = Device(tmp_path / "d.sqlite3", broker, link=FAST)
    try:
        device.start()
        device.wait_connected(10)  # past the dead address without a backoff
        assert device._link is not None
        assert device._link.address == ("127.0.0.1", first.port)
        first.stop()
        wait_until(
            lambda: (
                device._link is not None
                and device._link.address == ("127.0.0.1", second.port)
                and device._conn is not None
            ),
            15,
            "the device on the second node",
        )
        cid = device.create_conversation([])  # and it works there
        assert device.wait_drained(10), cid
    finally:
        device.close()
        first.stop()
        second.stop()

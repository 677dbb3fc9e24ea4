"""Members' presence (device/presence.py) through real brokers on 127.0.0.1: the
embedded broker and Mosquitto (whose generated ACL must let members read statuses)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from fieldchat.device.client import Device
from fieldchat.device.config import DeviceSettings, LinkOptions
from fieldchat.device.events import PresenceChanged
from fieldchat.device.presence import MAX_STATUS_BYTES, parse_status
from fieldchat.schemas.errors import InvalidStatus
from tests.device._daemon import DaemonProcess, Lines, reap
from tests.device.conftest import (
    FAST,
    Broker,
    Devices,
    Mosquitto,
    Peer,
    cli_env,
    conversation,
    start_cli,
    wait_until,
)

pytestmark = pytest.mark.mosquitto


def _presence(devices: Devices, device: Device, pid: str) -> list[bool]:
    """What ``device`` reported of ``pid``, in order."""
    return [
        e.online
        for e in devices.events[device.pid]
        if isinstance(e, PresenceChanged) and e.pid == pid
    ]


def _publish_as(broker: Broker, pid: str, topic: str, payload: bytes) -> None:
    """Publish retained on ``topic`` as ``pid`` itself (its own credential)."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=pid)
    client.username_pw_set(pid, broker.user(pid))
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    try:
        client.publish(topic, payload, qos=1, retain=True).wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()


def test_status_payloads_are_bounded_known_values() -> None:
    assert parse_status(b"online") is True
    assert parse_status(b"offline") is False
    for bad in (b"", b"ONLINE", b"online ", b"\x00", b"x" * (MAX_STATUS_BYTES + 1), b"o" * 10**6):
        with pytest.raises(InvalidStatus):
            parse_status(bad)
    assert InvalidStatus.reason == "status"


def test_members_see_each_other_come_and_go(devices: Devices) -> None:
    cid, (alice, bob) = conversation(devices, "alice", "bob")
    wait_until(lambda: _presence(devices, alice, bob.pid) == [True], 10, "alice sees bob")
    wait_until(lambda: _presence(devices, bob, alice.pid) == [True], 10, "bob sees alice")
    bob.close()  # a clean stop leaves "offline"
    devices.open.remove(bob)
    wait_until(lambda: _presence(devices, alice, bob.pid) == [True, False], 10, "bob goes")
    again = devices.reopen(alice)  # a restart learns it again from the retained status
    wait_until(lambda: _presence(devices, again, bob.pid) == [True, False, False], 10, "relearnt")
    time.sleep(0.5)  # reconnects and repeats add nothing
    assert _presence(devices, again, bob.pid) == [True, False, False]
    assert not _presence(devices, again, again.pid), "an event about ourselves"
    assert cid in again.engine.conversations()


def test_a_killed_peer_goes_offline_by_its_will(devices: Devices) -> None:
    cid, (alice, bob) = conversation(devices, "alice", "bob")
    wait_until(lambda: _presence(devices, alice, bob.pid) == [True], 10, "bob online")
    devices.open.remove(bob)
    bob.close()
    wait_until(lambda: _presence(devices, alice, bob.pid) == [True, False], 10, "bob stops")
    peer = Peer(bob.state.path, devices.broker, bob.pid, cid).start(expect=1, duration=60)
    try:
        wait_until(lambda: _presence(devices, alice, bob.pid)[-1], 30, "bob's process is up")
        peer.kill()  # SIGKILL: no DISCONNECT, the broker publishes the will
        wait_until(lambda: not _presence(devices, alice, bob.pid)[-1], 30, "the will")
    finally:
        if peer.proc is not None:
            peer.kill()
    assert _presence(devices, alice, bob.pid) == [True, False, True, False]


def test_a_removed_member_is_no_longer_followed(devices: Devices) -> None:
    cid, (alice, bob, carol) = conversation(devices, "alice", "bob", "carol")
    worker = alice._worker
    wait_until(lambda: _presence(devices, alice, carol.pid) == [True], 10, "carol online")
    assert worker.presence.followed == {bob.pid, carol.pid}
    alice.remove(cid, [carol.pid])
    wait_until(lambda: carol.pid not in worker.presence.followed, 10, "carol unfollowed")
    status = alice.topics.status(carol.pid)
    wait_until(lambda: status not in worker.subscriptions.wanted(), 5, "unsubscribed")
    carol.close()
    devices.open.remove(carol)
    bob.close()  # the control: a remaining member's change still arrives
    devices.open.remove(bob)
    wait_until(lambda: _presence(devices, alice, bob.pid) == [True, False], 10, "bob goes")
    time.sleep(0.3)
    assert _presence(devices, alice, carol.pid) == [True], "a removed member's status came"


def test_a_bad_status_is_refused_and_counted(devices: Devices) -> None:
    _, (alice, bob) = conversation(devices, "alice", "bob")
    wait_until(lambda: _presence(devices, alice, bob.pid) == [True], 10, "bob online")
    devices.open.remove(bob)
    bob.close()
    wait_until(lambda: _presence(devices, alice, bob.pid) == [True, False], 10, "bob stops")
    topic = alice.topics.status(bob.pid)
    # Bob's own account (or a gateway for a web participant) may publish any bytes the
    # broker's size limit lets through: a device reads them as untrusted.
    for bad in (b"x" * 1000, b"online\x00", b"ONLINE"):
        _publish_as(devices.broker, bob.pid, topic, bad)
    wait_until(lambda: alice.counters["rejected_status"] == 3, 10, "three refusals")
    _publish_as(devices.broker, bob.pid, topic, b"online")  # the worker still runs
    wait_until(lambda: _presence(devices, alice, bob.pid) == [True, False, True], 10, "online")
    assert alice._worker.fatal is None


def test_presence_can_be_turned_off(devices: Devices) -> None:
    off = FAST.model_copy(update={"presence": False})
    alice = devices.make("alice", link=off)
    bob = devices.make("bob")
    cid = alice.create_conversation([bob.pid])
    wait_until(lambda: bob.engine.is_member(cid), 10, "bob joins")
    wait_until(lambda: _presence(devices, bob, alice.pid) == [True], 10, "bob follows alice")
    alice.send(cid, "one round trip")
    wait_until(lambda: alice.undelivered(cid) == 0, 10, "bob's receipt")
    assert not any(t.endswith("/status") for t in alice._worker.subscriptions.wanted())
    assert not any(isinstance(e, PresenceChanged) for e in devices.events[alice.pid])
    assert LinkOptions.low_bandwidth().presence is False


def test_daemon_subscribers_and_listen_get_presence(
    mosquitto_devices: Devices, mosquitto: Mosquitto
) -> None:
    cid, (alice, bob) = conversation(mosquitto_devices, "alice", "bob")
    mosquitto_devices.open.remove(bob)
    bob.close()
    env = cli_env(
        state=str(bob.state.path), broker=mosquitto.url, credential=mosquitto.user(bob.pid)
    )
    doc = json.loads((Path(__file__).parents[2] / "docs" / "device-rpc.openrpc.json").read_text())
    schema = next(
        e
        for e in doc["x-notifications"]["event"]["params"]["oneOf"]
        if e["properties"]["type"]["const"] == "presence"
    )
    with DaemonProcess(env) as daemon, daemon.client() as client:
        wait_until(lambda: client.call("status")["connected"], 20, "the daemon connects")
        wait_until(
            lambda: client.call("presence") == {"presence": {alice.pid: True}}, 20, "alice seen"
        )
        client.call("subscribe", {"cids": ["bbbbbbbbbbbbbbbbbbbbbbbbbb"]})  # no cid: comes
        listener = start_cli(["listen"], env)
        try:
            out, err = Lines(listener.stdout), Lines(listener.stderr)
            alice.send(cid, "before alice goes")  # shown: listen has subscribed
            while "before alice goes" not in (line := out.next(20)):
                assert line, "listen ended"
            mosquitto_devices.open.remove(alice)
            alice.close()
            end = time.monotonic() + 20
            while (event := client.next_event(end - time.monotonic())) is not None:
                if event["type"] == "presence" and not event["online"]:
                    break
            assert event is not None, "no presence notification"
            assert event["pid"] == alice.pid and isinstance(event["at"], int)
            assert set(event) == set(schema["properties"])
            while f"-- {alice.pid[:8]} is offline" not in (line := err.next(20)):
                assert line, "listen ended"
            assert client.call("presence") == {"presence": {alice.pid: False}}
        finally:
            reap(listener)


def test_the_setting_comes_from_toml_and_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "device.toml"
    config.write_text("presence = false\n")
    assert DeviceSettings.load(config).link_options().presence is False
    config.write_text("low_bandwidth = true\n")
    assert DeviceSettings.load(config).link_options().presence is False
    monkeypatch.setenv("FIELDCHAT_PRESENCE", "true")  # back on, on a slow link
    slow = DeviceSettings.load(config).link_options()
    assert slow.presence is True and slow.keepalive_s == LinkOptions.low_bandwidth().keepalive_s
    monkeypatch.delenv("FIELDCHAT_PRESENCE")
    config.write_text("")
    assert DeviceSettings.load(config).link_options().presence is True


def test_standalone_listen_notes_presence(capsys: pytest.CaptureFixture[str]) -> None:
    from fieldchat.device.cli_output import note

    pid = "kedyblxea2laxupjasojokxc3y"
    note(PresenceChanged(pid, online=True, at=1), json_out=False)
    note(PresenceChanged(pid, online=False, at=2), json_out=True)
    out, err = capsys.readouterr()
    assert err == "-- kedyblxe is online\n"
    assert json.loads(out) == {"type": "presence", "pid": pid, "online": False, "at": 2}

"""The generated Mosquitto configuration enforces the same ACL cases as our broker."""

from __future__ import annotations

import getpass
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from broker import Store
from broker._mosquitto import write_mosquitto_config
from schemas.topics import Topics
from tests.broker._cases import ALICE, BOB, CAROL, ROSTER_X, X, run_cases
from tests.broker._peers import Peer

MOSQUITTO = "/usr/sbin/mosquitto"
pytestmark = [
    pytest.mark.mosquitto,
    pytest.mark.skipif(shutil.which(MOSQUITTO) is None, reason="mosquitto is not installed"),
]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def world(tmp_path: Path):
    with Store(tmp_path / "broker" / "broker.sqlite3") as store:
        creds = {
            "alice": (ALICE.pid, store.enroll(ALICE.pid)),
            "bob": (BOB.pid, store.enroll(BOB.pid)),
            "carol": (CAROL.pid, store.enroll(CAROL.pid)),
            "gateway": store.add_gateway("test"),
            "observer": store.add_gateway("observer"),
        }
        store.record_roster(ROSTER_X)  # as the embedded broker learned it
        port = _free_port()
        files = write_mosquitto_config(
            store, tmp_path / "mosquitto", port=port, user=getpass.getuser()
        )
    proc = subprocess.Popen(
        [MOSQUITTO, "-c", str(files.conf)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                out, _ = proc.communicate()
                pytest.fail(f"mosquitto did not start: {out.decode()}")
            time.sleep(0.05)
    yield port, creds, files
    proc.terminate()
    proc.wait(10)
    if proc.stdout:
        proc.stdout.close()


def test_generated_files_are_private_and_hold_no_secret(world):
    _, creds, files = world
    assert files.passwd.stat().st_mode & 0o777 == 0o600
    assert files.acl.stat().st_mode & 0o777 == 0o600
    text = files.passwd.read_text() + files.acl.read_text() + files.conf.read_text()
    assert all(secret not in text for _, secret in creds.values())
    assert "use_username_as_clientid true" in files.conf.read_text()


def test_same_acl_cases_pass_on_mosquitto(world):
    port, creds, _ = world
    alice = Peer(port, *creds["alice"])
    alice.connect()
    assert alice.publish(Topics().roster(X), ROSTER_X.to_bytes(), retain=True)
    alice.disconnect()
    failures = run_cases(port, creds, strict_suback=False)
    assert failures == [], "\n".join(failures)


def test_wrong_password_is_refused_by_mosquitto(world):
    port, _, _ = world
    peer = Peer(port, ALICE.pid, "not the credential")
    try:
        assert not peer.connect(expect_ok=False)[0]
    finally:
        peer.close()

"""The brokers the conformance tests run against: ours (embedded, in a thread) and
Mosquitto with our generated configuration (the reference), with the same world:
alice and bob are members of conversation X, carol is not, two gateways."""

from __future__ import annotations

import getpass
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from fieldchat.broker import BrokerThread, Store
from fieldchat.broker._mosquitto import write_mosquitto_config
from fieldchat.broker.testing import make_config
from fieldchat.schemas.topics import Topics
from tests.broker._cases import ALICE, BOB, CAROL, ROSTER_X
from tests.broker._client import Client

MOSQUITTO = "/usr/sbin/mosquitto"
T = Topics()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Reference:
    """A running broker and the credentials of the world's actors."""

    def __init__(self, kind: str, tmp_path: Path, **limits: float) -> None:
        self.kind = kind
        self.clients: list[Client] = []
        self._thread: BrokerThread | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        if kind == "ours":
            self._thread = BrokerThread(make_config(tmp_path / "broker", **limits))
            self._thread.start()
            self.port = self._thread.port
            self.creds = {
                "alice": (ALICE.pid, self._thread.enroll(ALICE.pid)),
                "bob": (BOB.pid, self._thread.enroll(BOB.pid)),
                "carol": (CAROL.pid, self._thread.enroll(CAROL.pid)),
                "gateway": self._thread.add_gateway("test"),
                "observer": self._thread.add_gateway("observer"),
            }
            alice = self.client("alice", level=4)
            alice.publish(T.roster(ROSTER_X.cid), ROSTER_X.to_bytes(), retain=True)
            alice.close()
            return
        if shutil.which(MOSQUITTO) is None:
            pytest.skip("mosquitto is not installed")
        with Store(tmp_path / "mstore" / "broker.sqlite3") as store:
            self.creds = {
                "alice": (ALICE.pid, store.enroll(ALICE.pid)),
                "bob": (BOB.pid, store.enroll(BOB.pid)),
                "carol": (CAROL.pid, store.enroll(CAROL.pid)),
                "gateway": store.add_gateway("test"),
                "observer": store.add_gateway("observer"),
            }
            store.record_roster(ROSTER_X)
            self.port = _free_port()
            files = write_mosquitto_config(
                store, tmp_path / "mosquitto", port=self.port, user=getpass.getuser()
            )
        self._proc = subprocess.Popen(
            [MOSQUITTO, "-c", str(files.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if self._proc.poll() is not None or time.monotonic() > deadline:
                    self._proc.kill()
                    pytest.fail("mosquitto did not start")
                time.sleep(0.05)

    def client(self, who: str, *, level: int = 5, clean: bool = True, **kw) -> Client:
        """A connected client of ``who`` (its username is its client id)."""
        client = self.raw(level)
        user, password = self.creds[who]
        connack = client.connect(user, user, password, clean=clean, **kw)
        assert connack.reason_code == 0, connack
        return client

    def raw(self, level: int = 5) -> Client:
        client = Client(self.port, level)
        self.clients.append(client)
        return client

    def restart(self) -> None:
        assert self._thread is not None
        self._thread.restart()

    def close(self) -> None:
        for client in self.clients:
            client.close()
        if self._thread is not None:
            self._thread.stop()
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(10)

"""Fixtures for the device client and CLI tests: a real Mosquitto on 127.0.0.1.

Each test gets its own broker process (it starts in a few milliseconds) on an
ephemeral port, with its own configuration, password file and persistence folder,
so tests can stop, restart and SIGKILL it without disturbing each other.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from pydantic import SecretStr

from fieldchat.device.client import Device
from fieldchat.device.config import BrokerOptions, LinkOptions
from fieldchat.device.events import Event
from tests.device._verifier import RosterVerifier

if TYPE_CHECKING:
    from fieldchat.broker import BrokerThread
    from tests.gateway._support import GatewayProcess

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
FIELDCHAT = str(Path(sys.executable).parent / "fieldchat")

# Fast link timings for tests: reconnect quickly, receipts often, resend soon.
FAST = LinkOptions(
    keepalive_s=10,
    connect_timeout_s=3.0,
    backoff_min_s=0.1,
    backoff_max_s=1.0,
    receipt_interval_s=0.2,
    resend_after_s=1.0,
    gap_timeout_s=60.0,
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(predicate: Callable[[], bool], timeout: float, what: str = "condition") -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


def stop_process(
    proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, wait: float = 10
) -> None:
    """Send ``sig`` to a child still running, wait ``wait`` s, then SIGKILL it."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def reap(proc: subprocess.Popen[str]) -> None:
    """Kill ``proc`` if it still runs and collect it: a failed test leaves no child."""
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


class Mosquitto:
    """A Mosquitto process with persistence, a password file and a bounded queue."""

    def __init__(self, workdir: Path, *, anonymous: bool = False, max_queued: int = 20_000) -> None:
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.passwords = self.dir / "passwd"
        self.passwords.touch(mode=0o600)
        self.users: dict[str, str] = {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.verifier: RosterVerifier | None = None
        self.config = self.dir / "mosquitto.conf"
        self.config.write_text(
            f"listener {self.port} 127.0.0.1\n"
            f"allow_anonymous {'true' if anonymous else 'false'}\n"
            + ("" if anonymous else f"password_file {self.passwords}\n")
            + f"persistence true\npersistence_location {self.dir}/\n"
            "autosave_interval 1\n"
            # Deliberate: above the tests' largest offline burst, but bounded.
            f"max_queued_messages {max_queued}\n"
            "max_inflight_messages 100\n"
            f"log_dest file {self.dir}/mosquitto.log\n"
            "log_type error\nlog_type warning\nlog_type notice\n"
            # As root, Mosquitto would drop to user "mosquitto", who cannot write tmp_path.
             + ("user root\n" if os.getuid() == 0 else "")
        )

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def options(self, pid: str, *, protocol: str = "auto") -> BrokerOptions:
        return BrokerOptions(
            host="127.0.0.1",
            port=self.port,
            credential=SecretStr(self.user(pid)),
            protocol=protocol,  # type: ignore[arg-type]
        )

    def user(self, name: str) -> str:
        """The credential of ``name``, enrolling it (and reloading) on first use."""
        if name not in self.users:
            self.users[name] = f"cred-{name[:8]}-{os.urandom(6).hex()}"
            subprocess.run(
                [MOSQUITTO_PASSWD, "-b", str(self.passwords), name, self.users[name]],
                check=True,
                capture_output=True,
            )
            if self.proc is not None and self.proc.poll() is None:
                self.proc.send_signal(signal.SIGHUP)
                time.sleep(0.2)
        return self.users[name]

    def start(self) -> Mosquitto:
        self.proc = subprocess.Popen(
            [MOSQUITTO, "-c", str(self.config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        end = time.monotonic() + 10
        while time.monotonic() < end:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2),
            ):
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited: {self.log()}")
            time.sleep(0.02)
        raise RuntimeError("mosquitto did not start")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None:
            stop_process(self.proc, sig)
        self.proc = None

    def verify_rosters(self) -> Mosquitto:
        """Retain proposed rosters that chain, as the gateway does on Mosquitto
        (``tests.device._verifier``); it outlives restarts of the broker."""
        self.verifier = RosterVerifier(self.port, "verifier", self.user("verifier")).start()
        return self

    def close(self) -> None:
        """Stop the broker and its verifier (end of a test)."""
        self.stop()
        if self.verifier is not None:
            self.verifier.stop()
            self.verifier = None

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def log(self) -> str:
        path = self.dir / "mosquitto.log"
        return path.read_text() if path.exists() else ""


class Embedded:
    """The embedded broker (``fieldchat.broker.BrokerThread``) behind the same interface.

    It speaks MQTT 5 and 3.1.1; devices on ``protocol="auto"`` use 5 (issue 17).
    """

    def __init__(self, workdir: Path) -> None:
        from fieldchat.broker.testing import make_config

        self.config = make_config(workdir)
        self.users: dict[str, str] = {}
        self.thread: BrokerThread | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def options(self, pid: str, *, protocol: str = "auto") -> BrokerOptions:
        return BrokerOptions(
            host="127.0.0.1",
            port=self.port,
            credential=SecretStr(self.user(pid)),
            protocol=protocol,  # type: ignore[arg-type]
        )

    def user(self, name: str) -> str:
        if name not in self.users:
            assert self.thread is not None
            self.users[name] = self.thread.enroll(name)
        return self.users[name]

    def start(self) -> Embedded:
        from fieldchat.broker import BrokerThread

        if self.port:
            self.config = self.config.model_copy(update={"port": self.port})
        self.thread = BrokerThread(self.config)
        self.thread.start()
        self.port = self.thread.port
        return self

    def stop(self) -> None:
        if self.thread is not None:
            self.thread.stop()
            self.thread = None

    kill = stop
    close = stop


Broker = Mosquitto | Embedded


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    broker = Mosquitto(tmp_path / "mosquitto").start().verify_rosters()
    yield broker
    broker.close()


@pytest.fixture(params=["mosquitto", "embedded"])
def any_broker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Broker]:
    """Each test twice: on Mosquitto and on the embedded broker."""
    broker: Broker = (
        Mosquitto(tmp_path / "mosquitto").start().verify_rosters()
        if request.param == "mosquitto"
        else Embedded(tmp_path / "embedded").start()
    )
    yield broker
    broker.close()


class Devices:
    """Makes in-process devices on a broker and closes them at the end."""

    def __init__(self, tmp_path: Path, broker: Broker) -> None:
        self.tmp = tmp_path
        self.broker = broker
        self.open: list[Device] = []
        self.events: dict[str, list[Event]] = {}
        self.broker_prefix = "fc/v1"

    def make(
        self,
        name: str,
        *,
        link: LinkOptions = FAST,
        protocol: str = "auto",
        start: bool = True,
        prefix: str = "fc/v1",
        port: int | None = None,
    ) -> Device:
        """``port``: connect there (a front for the broker, tests/device/_wire.py)."""
        path = self.tmp / f"{name}.sqlite3"
        probe = Device(path, prefix=prefix)  # learn the pid to enroll it
        pid = probe.pid
        probe.close()
        events: list[Event] = []
        options = self.broker.options(pid, protocol=protocol)
        device = Device(
            path,
            options if port is None else options.model_copy(update={"port": port}),
            link=link,
            prefix=prefix,
            on_event=events.append,
        )
        self.events[device.pid] = events
        self.open.append(device)
        if start:
            device.start()
            device.wait_connected(10)
        return device

    def reopen(self, device: Device, *, link: LinkOptions = FAST) -> Device:
        device.close()
        self.open.remove(device)
        events = self.events[device.pid]
        again = Device(
            device.state.path,
            device.broker,
            link=link,
            prefix=device.topics.prefix,
            on_event=events.append,
        )
        self.open.append(again)
        return again.start()

    def close(self) -> None:
        for device in self.open:
            device.close()


@pytest.fixture
def devices(tmp_path: Path, any_broker: Broker) -> Iterator[Devices]:
    made = Devices(tmp_path, any_broker)
    yield made
    made.close()


@pytest.fixture
def mosquitto_devices(tmp_path: Path, mosquitto: Mosquitto) -> Iterator[Devices]:
    made = Devices(tmp_path, mosquitto)
    yield made
    made.close()


STACK_QUEUE = 10  # Mosquitto's max_queued_messages in gateway_stack


@pytest.fixture
def gateway_stack(tmp_path: Path) -> Iterator[tuple[Mosquitto, GatewayProcess, Devices]]:
    """Mosquitto (its offline sessions keep STACK_QUEUE messages; the verifier retains
    proposed rosters, as the gateway does on Mosquitto), a real gateway process on it,
    and devices."""
    from tests.gateway._support import GatewayProcess

    broker = Mosquitto(tmp_path / "mosquitto", max_queued=STACK_QUEUE).start().verify_rosters()
    gateway = GatewayProcess(
        tmp_path / "gateway",
        database_url=f"sqlite:///{tmp_path}/gateway/gateway.db",
        mqtt_url=broker.url,
        mqtt_username="gateway",
        mqtt_password=broker.user("gateway"),
        mqtt_client_id=f"gw-{os.urandom(4).hex()}",
    )
    devices = Devices(tmp_path, broker)
    try:
        asyncio.run(gateway.start().healthy())
        yield broker, gateway, devices
    finally:
        devices.close()
        gateway.stop()
        broker.close()


def texts(device: Device, cid: str | None = None) -> list[str]:
    return [row.text or "" for row in device.messages(cid)]


def cli_env(**values: str) -> dict[str, str]:
    """A clean environment for ``fieldchat device`` subprocesses (no inherited FIELDCHAT_*)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FIELDCHAT_")}
    env.update({f"FIELDCHAT_{k.upper()}": v for k, v in values.items()})
    env["FIELDCHAT_CONFIG"] = values.get("config", "/nonexistent-fieldchat-config.toml")
    if "config" not in values:
        del env["FIELDCHAT_CONFIG"]
    env["HOME"] = env.get("FIELDCHAT_HOME_FOR_TESTS", env.get("HOME", "/tmp"))
    return env


def run_cli(
    args: list[str], env: dict[str, str], *, input: str | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [FIELDCHAT, "device", *args],
        env=env,
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def start_cli(args: list[str], env: dict[str, str], **kwargs: Any) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [FIELDCHAT, "device", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def wait_fieldchat_runs(proc: subprocess.Popen[Any], timeout: float = 30) -> None:
    """Until the first line of ``fieldchat``'s ``main()`` ran in ``proc``: it holds
    SIGTERM, then handles it (``/proc/PID/status``). Before, the interpreter is still
    starting (site imports, no code of ours) and a stop signal ends it the default way;
    that took 0.3 s on a loaded machine, where a SIGTERM sent 0.3 s after the start
    ended one ``listen`` with status -15."""
    term = 1 << (signal.SIGTERM - 1)

    def runs() -> bool:
        assert proc.poll() is None, f"fieldchat exited with status {proc.returncode}"
        fields = dict(
            line.split(":\t", 1)
            for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines()
            if ":\t" in line
        )
        return bool((int(fields["SigBlk"], 16) | int(fields["SigCgt"], 16)) & term)

    wait_until(runs, timeout, "fieldchat's main() to run")


PEER = str(Path(__file__).with_name("_peer.py"))


class Peer:
    """A device process running ``_peer.py`` on a state file made in-process first."""

    def __init__(
        self, state: Path, broker: Broker, pid: str, cid: str, *, prefix: str = "fc/v1"
    ) -> None:
        self.state, self.broker, self.pid, self.cid, self.prefix = state, broker, pid, cid, prefix
        self.proc: subprocess.Popen[str] | None = None
        self.lines: list[dict[str, object]] = []

    def start(
        self,
        *,
        send: str = "",
        count: int = 0,
        expect: int = 0,
        batch: int = 1,
        pace: float = 0.0,
        duration: float = 150.0,
        resend_after: float = 1.0,
        await_receipts: bool = False,
    ) -> Peer:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                PEER,
                "--state",
                str(self.state),
                "--port",
                str(self.broker.port),
                f"--credential={self.broker.user(self.pid)}",
                "--cid",
                self.cid,
                "--prefix",
                self.prefix,
                "--send",
                send or self.pid[:6],
                "--count",
                str(count),
                "--expect",
                str(expect),
                "--batch",
                str(batch),
                "--pace",
                str(pace),
                "--duration",
                str(duration),
                "--resend-after",
                str(resend_after),
                *(["--await-receipts"] if await_receipts else []),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        return self

    def kill(self) -> None:
        """SIGKILL: no clean disconnect, no flush, nothing."""
        assert self.proc is not None
        self.proc.kill()
        out, _ = self.proc.communicate()
        self.lines += [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        self.proc = None

    def wait(self, timeout: float = 180) -> list[dict[str, object]]:
        assert self.proc is not None
        out, err = self.proc.communicate(timeout=timeout)
        code = self.proc.returncode
        self.proc = None
        self.lines += [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        assert code == 0, err[-2000:]
        return self.lines

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            self.proc.communicate()
            self.proc = None


def conversation(devices: Devices, *names: str) -> tuple[str, list[Device]]:
    """In-process devices, the first founding a conversation with the others; all joined."""
    made = [devices.make(name) for name in names]
    cid = made[0].create_conversation([d.pid for d in made[1:]])
    for device in made[1:]:
        wait_until(partial(device.engine.is_member, cid), 15, "members join")
    # Every member holds every other member's chain before the processes take over.
    wait_until(
        lambda: all(len(d.engine._convs[cid].recv) == len(made) - 1 for d in made), 15, "grants"
    )
    return cid, made


def handed_over(devices: Devices, mosquitto: Mosquitto) -> tuple[str, dict[str, str], Device]:
    """Alice and Bob in a conversation; Alice's state handed to the CLI, Bob online
    in-process (he receipts what he gets). Alice's environment and Bob."""
    cid, (alice, bob) = conversation(devices, "alice", "bob")
    alice.close()
    devices.open.remove(alice)
    env = cli_env(
        state=str(alice.state.path), broker=mosquitto.url, credential=mosquitto.user(alice.pid)
    )
    return cid, env, bob

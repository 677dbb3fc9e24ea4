"""``fieldchat up``: broker and gateway in one command, clear errors on taken ports."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

FIELDCHAT = Path(sys.executable).with_name("fieldchat")


def start(tmp_path: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [FIELDCHAT, "up", "--data-dir", str(tmp_path / "data"), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def read_banner(proc: subprocess.Popen[str], timeout: float = 60) -> str:
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith("Ctrl-C"):
            return "".join(lines)
    raise AssertionError("no banner: " + "".join(lines))


def test_up_serves_web_and_mqtt_and_stops_cleanly(tmp_path):
    proc = start(tmp_path, "--mqtt-port", "0", "--http-port", "0")
    try:
        banner = read_banner(proc)
        web_match = re.search(r"web\s+(http://\S+)", banner)
        mqtt_match = re.search(r"mqtt\s+mqtt://127\.0\.0\.1:(\d+)", banner)
        assert web_match is not None and mqtt_match is not None, banner
        web, mqtt = web_match.group(1), mqtt_match.group(1)
        with urllib.request.urlopen(web + "healthz", timeout=10) as response:
            assert json.loads(response.read()) == {"broker": True, "database": True}
        with urllib.request.urlopen(web, timeout=10) as response:  # the browser client
            assert "script-src 'self'" in response.headers["Content-Security-Policy"]
            assert b"<html" in response.read().lower()
        with socket.create_connection(("127.0.0.1", int(mqtt)), timeout=5):
            pass
        assert "fieldchat device --state pi.db" in banner
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "stopped" in out
    data = tmp_path / "data"
    assert oct(data.stat().st_mode & 0o777) == "0o700"
    assert oct((data / "gateway.credential").stat().st_mode & 0o777) == "0o600"


@pytest.mark.parametrize("flag", ["--mqtt-port", "--http-port"])
def test_a_taken_port_is_a_clear_error(tmp_path, flag):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = str(holder.getsockname()[1])
        other = "--http-port" if flag == "--mqtt-port" else "--mqtt-port"
        proc = start(tmp_path, flag, taken, other, "0")
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert "already in use" in out and f"pass {flag}" in out
    assert len(out.strip().splitlines()[-1]) < 200


def test_the_gateway_credential_is_never_printed(tmp_path):
    proc = start(tmp_path, "--mqtt-port", "0", "--http-port", "0")
    try:
        banner = read_banner(proc)
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    credential = json.loads((tmp_path / "data" / "gateway.credential").read_text())["credential"]
    assert credential not in banner + out


@pytest.mark.parametrize("where", ["checkout", "elsewhere"])
def test_the_printed_commands_enroll_a_device_and_send_a_first_message(tmp_path, where):
    """Run the banner's commands as a newcomer would, with a second device as the peer:
    from the checkout (``make run`` there; the banner says ``.venv/bin/fieldchat``) and
    from another folder (the banner gives the absolute path)."""
    if where == "checkout":  # a checkout whose .venv is this one
        cwd = tmp_path / "checkout"
        cwd.mkdir()
        (cwd / ".venv").symlink_to(Path(sys.executable).parent.parent, target_is_directory=True)
        argv = [str(cwd / ".venv" / "bin" / "python"), "-m", "fieldchat", "up"]
    else:
        cwd = tmp_path
        argv = [str(FIELDCHAT), "up"]
    proc = subprocess.Popen(
        [*argv, "--data-dir", "fieldchat-data", "--mqtt-port", "0", "--http-port", "0"],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    # A newcomer's shell: the venv not activated, so `fieldchat` is not on the PATH.
    path = os.pathsep.join(
        p for p in os.environ["PATH"].split(os.pathsep) if Path(p).resolve() != FIELDCHAT.parent
    )
    env = {**os.environ, "PATH": path}

    def sh(command: str) -> str:
        done = subprocess.run(
            ["bash", "-c", command],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, f"{command}\n{done.stdout}\n{done.stderr}"
        return done.stdout

    try:
        banner = read_banner(proc)
        commands = [line.strip() for line in banner.splitlines() if " device --state " in line]
        assert len(commands) == 3
        fc = commands[0].split()[0]  # the path of the running one: not on this PATH
        if where == "checkout":
            assert fc == ".venv/bin/fieldchat", banner
        else:
            assert fc == str(FIELDCHAT.absolute()), banner
        # The peer: another device set up with the same first two commands.
        for command in commands[:2]:
            sh(command.replace("pi.db", "peer.db"))
        peer = sh(f"{fc} device --state peer.db whoami --pid").strip()
        first = sh(commands[0])  # init's own next step runs as printed too
        hinted = first.split("next: on the broker run `", 1)[1].split(" broker enroll ", 1)[0]
        assert (cwd / hinted).resolve() == (cwd / fc).resolve(), first  # not a bare name
        sh(commands[1])
        sh(commands[2].replace("PEER_PID", peer))
        received = sh(f"{fc} device --state peer.db listen --json --count 1 --duration 60")
        assert "hello from the Pi" in received
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)


def test_demo_refuses_the_data_folder_of_up(tmp_path):
    """``fieldchat demo`` writes scripted messages into its gateway's history: in a
    folder ``up`` used it stops before starting anything (issue 18)."""
    proc = start(tmp_path, "--mqtt-port", "0", "--http-port", "0")
    try:
        read_banner(proc)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)
    data = tmp_path / "data"
    before = sorted(p.relative_to(data) for p in data.rglob("*"))
    demo = subprocess.run(
        [FIELDCHAT, "demo", "--data-dir", str(data), "--mqtt-port", "0", "--http-port", "0"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert demo.returncode == 1, demo.stdout + demo.stderr
    assert demo.stderr.strip().startswith(f"error: {data} holds data the demo did not make")
    assert sorted(p.relative_to(data) for p in data.rglob("*")) == before  # nothing written


def test_demo_uses_its_own_folder_by_default(tmp_path):
    """Its default is fieldchat-demo, not up's fieldchat-data; it marks what it made
    and runs there again."""
    from fieldchat.demo import DEMO_MARK, claim_data_dir

    default = subprocess.run(
        [FIELDCHAT, "demo", "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    assert "fieldchat-demo" in default.stdout
    folder = tmp_path / "fieldchat-demo"
    claim_data_dir(folder)
    (folder / "gateway.db").write_bytes(b"")  # what its stack then keeps there
    claim_data_dir(folder)  # its own: fine
    assert (folder / DEMO_MARK).is_file()

"""``examples/sensor.py`` (the asyncio example of docs/device.md) run as a process
against a real Mosquitto on 127.0.0.1, driven by a device in the test."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fieldchat.device.client import Device
from tests.device.conftest import Devices, texts, wait_until

pytestmark = pytest.mark.mosquitto

ROOT = Path(__file__).resolve().parents[2]
SENSOR = ROOT / "examples" / "sensor.py"


def test_the_sensor_posts_readings_and_answers_commands(mosquitto_devices: Devices) -> None:
    devices = mosquitto_devices
    state = devices.tmp / "sensor.sqlite3"
    probe = Device(state)  # learn the sensor's pid to enroll it
    pid = probe.pid
    probe.close()
    sensor = subprocess.Popen(
        [
            sys.executable,
            str(SENSOR),
            "--state",
            str(state),
            "--broker",
            devices.broker.url,
            f"--credential={devices.broker.user(pid)}",
            "--interval",
            "0.5",
            "--duration",
            "60",  # the bound: the test stops it long before
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert sensor.stdout is not None
        assert sensor.stdout.readline().strip() == f"sensor {pid} running"
        operator = devices.make("operator")
        cid = operator.create_conversation([pid])  # the sensor's bundle is on the broker

        def readings() -> list[str]:
            return [t for t in texts(operator, cid) if t.startswith("load ")]

        def answers() -> list[str]:
            return [t for t in texts(operator, cid) if not t.startswith("load ")]

        wait_until(lambda: bool(readings()), 20, "a reading")
        # The last "help" comes after "not a command": once it is answered, the sensor
        # has seen (and left alone) the message that is not a command.
        operator.send_many(cid, ["help", "interval 30", "read", "not a command", "help"])
        wait_until(lambda: len(answers()) >= 4, 20, "the replies")
        usage = "help: read | interval SECONDS | help"
        assert answers()[:2] == [usage, "interval: 30 s"]
        assert re.fullmatch(r"read: load [\d.]+ [\d.]+ [\d.]+", answers()[2])
        assert answers()[3:] == [usage]
    finally:
        sensor.send_signal(signal.SIGTERM)  # a normal stop
        try:
            out, err = sensor.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            sensor.kill()
            out, err = sensor.communicate()
    assert sensor.returncode == 0, err
    assert out.strip().endswith("sensor stopped")
    assert err == ""


def test_the_device_doc_shows_the_example_s_code() -> None:
    script = SENSOR.read_text()
    sensor = script[script.index("class Sensor:") : script.index("def _positive")].rstrip()
    doc = (ROOT / "docs" / "device.md").read_text()
    assert f"```python\n{sensor}\n```" in doc

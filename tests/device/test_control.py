"""The daemon's method table and its documents; the client's light path (no broker)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fieldchat.device.client import Device
from fieldchat.device.config import DEFAULT_CONFIG, DEFAULT_STATE, DeviceSettings
from fieldchat.device.control import EVENTS, Control, document
from fieldchat.device.control_client import (
    DEFAULT_CONFIG as CLIENT_DEFAULT_CONFIG,
)
from fieldchat.device.control_client import (
    DEFAULT_STATE as CLIENT_DEFAULT_STATE,
)
from fieldchat.device.control_client import socket_path, state_file, token_path
from fieldchat.device.daemon import parse_tcp
from fieldchat.schemas.errors import ConfigError
from tests.device.conftest import cli_env, free_port, run_cli

ROOT = Path(__file__).parents[2]
SCHEMA = ROOT / "docs" / "device-rpc.openrpc.json"
DOC = ROOT / "docs" / "device.md"


def test_the_openrpc_document_is_the_method_table(tmp_path: Path) -> None:
    device = Device(tmp_path / "d.sqlite3", post_quantum=False)
    try:
        control = Control(device)
        generated = document(control)
        names = sorted(m.name for m in control.methods())
    finally:
        device.close()
    committed = json.loads(SCHEMA.read_text())
    assert committed == generated, (
        "docs/device-rpc.openrpc.json is stale: regenerate it with "
        "`.venv/bin/python -m fieldchat.device.control > docs/device-rpc.openrpc.json`"
    )
    assert [m["name"] for m in committed["methods"]] == names
    types = [
        e["properties"]["type"]["const"]
        for e in committed["x-notifications"]["event"]["params"]["oneOf"]
    ]
    assert types == [str(cls.type) for cls in EVENTS]
    # docs/device.md names every method in its table.
    text = DOC.read_text()
    missing = [name for name in names if f"`{name}`" not in text]
    assert missing == [], f"docs/device.md does not document {missing}"


def test_the_client_path_imports_no_engine_and_no_heavy_library() -> None:
    code = (
        "import sys, fieldchat.device.remote, fieldchat.device.control_client\n"
        "heavy = {'cryptography', 'nacl', 'pydantic', 'pydantic_settings', 'paho', 'msgpack'}\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & heavy))\n"
        "print(sorted(m for m in sys.modules if m.startswith('fieldchat.device.')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    heavy, ours = out.stdout.splitlines()
    assert heavy == "[]"
    assert ours == "['fieldchat.device.control_client', 'fieldchat.device.remote']"


def test_the_client_finds_the_state_file_as_the_settings_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert (CLIENT_DEFAULT_STATE, CLIENT_DEFAULT_CONFIG) == (DEFAULT_STATE, DEFAULT_CONFIG)
    monkeypatch.delenv("FIELDCHAT_STATE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    config = tmp_path / "device.toml"
    config.write_text('state = "~/from-toml.db"\n')
    cases: list[tuple[Path | None, Path | None]] = [
        (None, None),
        (None, config),
        (tmp_path / "flag.db", config),
        (Path("~/tilde.db"), None),
    ]
    for flag, toml in cases:
        expected = DeviceSettings.load(toml, state=flag).state.expanduser()
        assert state_file(flag, toml) == expected
    assert state_file(None, tmp_path / "absent.toml") == DEFAULT_STATE.expanduser()
    (tmp_path / "bad.toml").write_text("state = [")
    assert state_file(None, tmp_path / "bad.toml") == DEFAULT_STATE.expanduser()
    assert socket_path(tmp_path / "pi.db") == tmp_path / "pi.db.sock"
    assert token_path(tmp_path / "pi.db") == tmp_path / "pi.db.token"


@pytest.mark.parametrize(
    ("value", "address"),
    [
        ("127.0.0.1:7000", ("127.0.0.1", 7000)),
        ("localhost:0", ("127.0.0.1", 0)),
        ("127.0.0.2:1", ("127.0.0.2", 1)),
        ("[::1]:7000", ("::1", 7000)),
    ],
)
def test_tcp_on_loopback_only(value: str, address: tuple[str, int]) -> None:
    assert parse_tcp(value) == address


@pytest.mark.parametrize(
    "value",
    [
        "0.0.0.0:7000",
        "192.168.1.2:7000",
        "example.com:7000",
        "[::]:1",
        "7000",
        "h:x",
        "127.0.0.1:70000",
    ],
)
def test_tcp_elsewhere_is_refused(value: str) -> None:
    with pytest.raises(ConfigError, match="--tcp"):
        parse_tcp(value)


def test_a_state_path_too_long_for_a_socket_is_refused_by_run_and_commands_stay_standalone(
    tmp_path: Path,
) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    env = cli_env(state=str(deep / "pi.db"), broker=f"mqtt://127.0.0.1:{free_port()}")
    assert run_cli(["init"], env).returncode == 0  # only init makes an identity
    out = run_cli(["run"], env)
    assert out.returncode == 2
    assert "is longer than 107 bytes: move the state file to a shorter path" in out.stderr
    who = run_cli(["whoami", "--pid"], env)
    assert who.returncode == 0 and len(who.stdout.strip()) == 26

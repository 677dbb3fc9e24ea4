"""One installable namespace (issue 15 item 8): everything is ``fieldchat.*``, each
package says what it exports, and a device install carries no server stack."""

from __future__ import annotations

import ast
import importlib
import os
import subprocess
import sys
import venv
import zipfile
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOP_LEVEL = {"schemas", "device", "broker", "gateway"}
SERVER_STACKS = (
    "fastapi",
    "sqlalchemy",
    "uvicorn",
    "amqtt",
    "starlette",
    "argon2",
    "asyncpg",
    "prometheus_client",
)


def _python_files() -> list[Path]:
    folders = [*(ROOT / name for name in sorted(TOP_LEVEL)), ROOT / "fieldchat"]
    files = [p for folder in folders for p in folder.rglob("*.py") if not p.is_symlink()]
    return files + list((ROOT / "tests").rglob("*.py")) + list((ROOT / "bench").rglob("*.py"))


def _top_level_imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found += [f"{path.relative_to(ROOT)}:{node.lineno} {n}" for n in names]
    return [f for f in found if f.split()[-1].split(".")[0] in TOP_LEVEL]


def test_no_code_imports_the_folders_as_top_level_packages():
    """``import device`` works from a checkout (its root is on sys.path) but not from
    the wheel, and would load a second copy of each module beside ``fieldchat.device``."""
    offenders = [hit for path in _python_files() for hit in _top_level_imports(path)]
    assert offenders == []


def test_the_namespace_links_to_the_top_level_folders():
    for name in TOP_LEVEL:
        link = ROOT / "fieldchat" / name
        assert link.is_symlink() and link.resolve() == ROOT / name


@pytest.mark.parametrize("package", sorted(f"fieldchat.{n}" for n in TOP_LEVEL))
def test_each_package_exports_what_its_all_lists(package):
    module = importlib.import_module(package)
    exported = module.__all__
    assert exported == sorted(set(exported), key=exported.index), "no duplicates"
    missing = [name for name in exported if not hasattr(module, name)]
    assert missing == []


def test_the_public_entry_points_are_exported():
    device = importlib.import_module("fieldchat.device")
    broker = importlib.import_module("fieldchat.broker")
    gateway = importlib.import_module("fieldchat.gateway")
    schemas = importlib.import_module("fieldchat.schemas")
    assert {"Device", "DeviceSettings", "Identity", "Engine"} <= set(device.__all__)
    assert {"EmbeddedBroker", "BrokerConfig"} <= set(broker.__all__)
    assert {"GatewayServer", "GatewaySettings", "create_app"} <= set(gateway.__all__)
    assert {"Envelope", "Roster", "Topics", "FieldchatError"} <= set(schemas.__all__)


def _run(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FIELDCHAT_")}
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=300, check=False, env=env, **kwargs
    )


def test_device_commands_import_no_server_stack():
    code = (
        "import sys\n"
        "from fieldchat.cli import app\n"
        "try:\n"
        "    app(['device', 'whoami', '--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        f"print(sorted(m for m in {SERVER_STACKS!r} if m in sys.modules))\n"
    )
    out = _run([sys.executable, "-c", code], cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.slow
def test_the_wheel_is_one_namespace_and_a_device_install_runs_without_server_stacks(
    tmp_path,
):
    """``pip wheel . --no-deps``; a new venv with the wheel and no extras (its
    dependencies from pip's cache or index); the device commands run, server commands
    say which extra they need."""
    built = _run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-q", "-w", tmp_path]
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = tmp_path.glob("fieldchat-*.whl")
    tops = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"fieldchat"}

    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python, script = env_dir / "bin" / "python", env_dir / "bin" / "fieldchat"
    installed = _run([python, "-m", "pip", "install", "-q", str(wheel)])
    assert installed.returncode == 0, installed.stderr

    elsewhere = {"cwd": tmp_path}  # not the checkout: its folders must not be importable
    for argv in ([script, "device", "--help"], [python, "-m", "fieldchat", "device", "--help"]):
        out = _run(argv, **elsewhere)
        assert out.returncode == 0, out.stderr
        assert "send" in out.stdout and "listen" in out.stdout

    find = f"import importlib.util as u; print([m for m in {SERVER_STACKS!r} if u.find_spec(m)])"
    probe = _run([python, "-c", find], **elsewhere)
    assert probe.stdout.strip() == "[]", "a device install carries no server stack"

    for argv, extra in (
        (["gateway", "run"], "gateway"),
        (["broker", "run"], "broker"),
        (["up", "--http-port", "0", "--mqtt-port", "0"], "server"),
    ):
        out = _run([script, *argv], **elsewhere)
        assert out.returncode == 1, (argv, out.stdout, out.stderr)
        assert f"pip install 'fieldchat[{extra}]'" in out.stderr
        assert "Traceback" not in out.stderr

"""The root command: help for every sub-app and the local protocol demo."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from fieldchat.cli import app

runner = CliRunner()


def test_help_lists_every_sub_app():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for name in ("broker", "device", "gateway", "demo"):
        assert name in result.output


def test_local_demo_shows_the_removed_member_locked_out():
    result = runner.invoke(app, ["demo", "--local"])
    assert result.exit_code == 0, result.output
    assert "reads 'Pump 3 pressure 4.2 bar, valve B closed.'" in result.output
    assert "web-ana      cannot read it (NotAMember)" in result.output


def test_installed_console_script_runs():
    """``make`` installs the project, so ``.venv/bin/fieldchat`` exists beside python."""
    script = Path(sys.executable).with_name("fieldchat")
    out = subprocess.run(
        [script, "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stderr
    assert "demo" in out.stdout

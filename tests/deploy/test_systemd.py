"""The systemd units of ``deploy/systemd/``: ``systemd-analyze verify`` finds nothing to
say, the commands they run exist, and ``systemd-analyze security --offline`` rates the
sandbox as well hardened."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.deploy._commands import resolve

SYSTEMD_ANALYZE = "/usr/bin/systemd-analyze"
UNITS = Path(__file__).resolve().parents[2] / "deploy" / "systemd"
INSTALLED = "/opt/fieldchat/bin/fieldchat"
FIELDCHAT = Path(sys.executable).with_name("fieldchat")
# systemd-analyze security: 0 (locked down) to 10 (fully exposed); "OK" is below 4.
MAX_EXPOSURE = 2.0

UNIT_FILES = sorted(p.name for p in UNITS.glob("*.service"))


def _analyze(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [SYSTEMD_ANALYZE, *args], capture_output=True, text=True, timeout=60, check=False
    )


@pytest.fixture(scope="module")
def analyze(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Skip unless systemd-analyze works here (it needs no running systemd)."""
    if not os.access(SYSTEMD_ANALYZE, os.X_OK):
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    probe = tmp_path_factory.mktemp("probe") / "probe.service"
    probe.write_text("[Service]\nExecStart=/bin/true\n")
    done = _analyze("verify", "--man=no", str(probe))
    if done.returncode != 0 or done.stderr.strip():
        pytest.skip(f"systemd-analyze verify cannot run in this container: {done.stderr[:200]}")


def _installed_copy(name: str, directory: Path) -> Path:
    """The unit as installed, with /opt/fieldchat pointing at this checkout's venv
    (verify checks that ExecStart's binary exists)."""
    text = (UNITS / name).read_text()
    assert INSTALLED in text
    path = directory / name
    path.write_text(text.replace(INSTALLED, str(FIELDCHAT)))
    return path


@pytest.mark.parametrize("name", UNIT_FILES)
def test_unit_verifies_cleanly(analyze, name, tmp_path):
    assert FIELDCHAT.exists()
    unit = _installed_copy(name, tmp_path)
    # A template unit is verified as one of its instances.
    target = tmp_path / name.replace("@.", "@1.") if "@." in name else unit
    if target != unit:
        target.symlink_to(unit)
    done = _analyze("verify", "--man=no", str(target))
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == "", done.stderr  # unknown keys are only warnings


@pytest.mark.parametrize("name", UNIT_FILES)
def test_unit_is_sandboxed(analyze, name, tmp_path):
    unit = _installed_copy(name, tmp_path)
    target = tmp_path / name.replace("@.", "@1.") if "@." in name else unit
    if target != unit:
        target.symlink_to(unit)
    done = _analyze("security", "--offline=yes", "--no-pager", str(target))
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", done.stdout)
    assert match, done.stdout + done.stderr
    assert float(match.group(1)) <= MAX_EXPOSURE, done.stdout


@pytest.mark.parametrize("name", UNIT_FILES)
def test_unit_runs_real_fieldchat_commands(name):
    """Every ``Exec…=`` line names an existing ``fieldchat`` sub-command and options."""
    lines = re.findall(r"^Exec\w+=(.*)$", (UNITS / name).read_text(), re.M)
    assert lines
    for line in lines:
        argv = line.split()
        assert argv[0] == INSTALLED
        resolve(argv[1:])


def test_sysusers_names_the_units_user():
    user = re.search(r"^u\s+(\S+)", (UNITS / "fieldchat.sysusers.conf").read_text(), re.M)
    assert user
    unit = (UNITS / "fieldchat-device.service").read_text()
    assert f"User={user.group(1)}" in unit

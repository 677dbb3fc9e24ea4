"""``--help`` from typer's kept rendering (fieldchat/_help.py, issue 18): the same
bytes as typer prints, per terminal width, renewed when a source changes, and only
for a command path followed by ``--help``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import fieldchat._help

FIELDCHAT = str(Path(sys.executable).with_name("fieldchat"))


def _run(args: list[str], cache: Path, **env: str) -> subprocess.CompletedProcess[bytes]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("FIELDCHAT_")}
    environ.update(XDG_CACHE_HOME=str(cache), **env)
    return subprocess.run(
        [FIELDCHAT, *args], env=environ, capture_output=True, timeout=60, check=False
    )


def _kept(cache: Path) -> list[Path]:
    folder = cache / "fieldchat" / "help"
    return sorted(folder.iterdir()) if folder.is_dir() else []


def test_kept_help_is_typers_own_per_width(tmp_path: Path) -> None:
    for columns in ("60", "100"):
        fresh = _run(
            ["device", "send", "--help"], tmp_path, FIELDCHAT_HELP_CACHE="0", COLUMNS=columns
        )
        assert fresh.returncode == 0 and b"--wait" in fresh.stdout
        first = _run(["device", "send", "--help"], tmp_path, COLUMNS=columns)
        again = _run(["device", "send", "--help"], tmp_path, COLUMNS=columns)
        assert first.stdout == again.stdout == fresh.stdout
        assert again.returncode == 0 and again.stderr == b""
    assert len(_kept(tmp_path)) == 2  # one per width


def test_kept_help_is_served_and_renewed_when_a_source_changes(tmp_path: Path) -> None:
    real = _run(["device", "--help"], tmp_path)
    (entry,) = _kept(tmp_path)
    entry.write_bytes(b"kept\n")
    assert _run(["device", "--help"], tmp_path).stdout == b"kept\n"  # served as kept
    source = Path(fieldchat._help.__file__)
    stat = source.stat()
    try:
        os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
        assert _run(["device", "--help"], tmp_path).stdout == real.stdout  # renewed
    finally:
        os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_only_help_of_a_command_path_is_kept(tmp_path: Path) -> None:
    assert _run(["device", "nosuch", "--help"], tmp_path).returncode == 2  # usage error
    assert _run(["device", "--state", "x.db", "--help"], tmp_path).returncode == 0  # an option
    assert _run(["--version"], tmp_path).returncode == 2
    assert _kept(tmp_path) == []
    off = _run(["--help"], tmp_path, FIELDCHAT_HELP_CACHE="0")
    assert off.returncode == 0 and _kept(tmp_path) == []


def test_kept_help_to_a_reader_that_went_away_is_quiet(tmp_path: Path) -> None:
    """``fieldchat device --help | head -1``: no BrokenPipeError traceback."""
    environ = dict(os.environ, XDG_CACHE_HOME=str(tmp_path))
    assert _run(["device", "--help"], tmp_path).returncode == 0  # kept now
    for _ in range(3):
        proc = subprocess.Popen(
            [FIELDCHAT, "device", "--help"],
            env=environ,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.close()
        err = proc.stderr.read()
        proc.stderr.close()
        assert proc.wait(60) == 1
        assert err == b""

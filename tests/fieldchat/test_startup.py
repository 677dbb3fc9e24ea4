"""What the command line decides before typer runs (issue 18): which command a stop
signal interrupted (fieldchat/_startup.py) and which command lines go to the daemon
directly (fieldchat/_fast.py). Both read options by a list that must match the
device group's own."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import typer

from fieldchat import _startup
from fieldchat._fast import SendLine, parse_send
from fieldchat._startup import (
    INTERRUPTED_BEFORE_START,
    SERVICES,
    STOP_SIGNALS,
    VALUE_OPTIONS,
    command_words,
)
from fieldchat.cli import _Root
from fieldchat.device.cli import device_app
from fieldchat.schemas.exits import ExitCode
from tests._interrupted import StoppedWhileDumped


def test_the_value_options_are_the_device_groups() -> None:
    group = typer.main.get_command(device_app)
    taking_values = {
        name
        for param in group.params
        if not getattr(param, "is_flag", False) and not getattr(param, "count", False)
        for name in param.opts
    }
    assert taking_values == VALUE_OPTIONS


def test_the_services_are_commands_that_exist() -> None:
    group = typer.main.get_command(device_app)
    device_services = {words[1] for words in SERVICES if words[0] == "device"}
    assert device_services <= set(group.commands)  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["device", "--state", "listen", "send", "c", "t"], ("device", "send")),
        (["device", "--state=x", "-v", "listen"], ("device", "listen")),
        (["up", "--mqtt-port", "0"], ("up", "0")),
        (["--help"], ()),
    ],
)
def test_command_words(argv: list[str], words: tuple[str, ...]) -> None:
    assert command_words(argv) == words


def test_parse_send_takes_only_the_plain_shape(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FIELDCHAT_STATE", raising=False)
    monkeypatch.delenv("FIELDCHAT_CONFIG", raising=False)
    assert parse_send(["device", "--state", "a.db", "send", "cid", "hi there"]) == SendLine(
        "a.db", None, "cid", "hi there"
    )
    assert parse_send(["device", "--config=c.toml", "send", "cid", "x"]) == SendLine(
        None, "c.toml", "cid", "x"
    )
    for other in (
        ["device", "send", "cid"],  # stdin
        ["device", "send", "cid", "-"],
        ["device", "send", "cid", "hi", "--wait"],
        ["device", "-v", "send", "cid", "hi"],
        ["device", "--low-bandwidth", "send", "cid", "hi"],
        ["device", "send", "cid", "--help"],
        ["device", "listen", "cid", "x"],
        ["device", "--state"],
        ["broker", "send", "cid", "x"],
    ):
        assert parse_send(other) is None, other
    monkeypatch.setenv("FIELDCHAT_STATE", "env.db")
    line = parse_send(["device", "send", "cid", "x"])
    assert line is not None and line.state == "env.db"


def test_make_run_installs_the_runtime_only() -> None:
    """``make run`` installs the ``server`` extra, never the test tools (issue 18: it
    took 61 s installing them); ``make test`` adds ``dev``."""
    import shutil
    import subprocess
    from pathlib import Path

    make = shutil.which("make")
    if make is None:
        pytest.skip("no make on this machine")
    root = Path(__file__).resolve().parents[2]

    def planned(target: str) -> str:
        done = subprocess.run(
            [make, "-C", str(root), "-B", "-n", target],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        return done.stdout

    run = planned("run")
    assert "pip install --quiet -e '.[server]'" in run
    assert "[dev]" not in run and "pytest" not in run
    assert "pip install --quiet -e '.[dev]'" in planned("test")


def test_a_stop_a_library_turned_into_another_error_is_one_line_at_the_root(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """pydantic-core raises PydanticSerializationError for the KeyboardInterrupt a
    stop signal raised in a serializer; the root command still ends in one line."""
    root = typer.Typer(cls=_Root)

    @root.callback()
    def _group() -> None:
        pass

    @root.command()
    def settings() -> None:
        StoppedWhileDumped(path=Path("fieldchat-data"), signum=signal.SIGTERM).model_dump()

    monkeypatch.setattr(_startup, "_stops_seen", [])
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    try:
        _startup.handle_stops()
        with pytest.raises(SystemExit) as exited:
            typer.main.get_command(root).main(["settings"], prog_name="fieldchat")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    assert exited.value.code == ExitCode.INTERRUPTED
    assert capsys.readouterr().err == INTERRUPTED_BEFORE_START + "\n"

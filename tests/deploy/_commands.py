"""Resolve a ``fieldchat …`` argument list against the real CLI (typer)."""

from __future__ import annotations

from typing import Any

import typer

from fieldchat.cli import app


def resolve(argv: list[str]) -> Any:
    """The leaf command ``argv`` (without the program name) runs; every ``--flag`` in it
    must be an option of the command it follows. Groups are recognised by their
    ``list_commands`` (recent typer vendors its own click, so no ``isinstance`` on
    click's), and asked through it: the root loads its sub-apps on use.

    Raises:
        AssertionError: an unknown sub-command, a group without a sub-command, or an
            unknown option.
    """
    command: Any = typer.main.get_command(app)
    line = " ".join(argv)
    for word in argv:
        if word.startswith("-"):
            flag = word.split("=", 1)[0]
            options = {o for p in command.params for o in getattr(p, "opts", [])}
            assert flag in options, f"{line}: {flag} is not an option of {command.name}"
            continue
        if hasattr(command, "list_commands"):
            ctx = typer.Context(command)
            assert word in command.list_commands(ctx), f"{line}: no command {word!r}"
            command = command.get_command(ctx, word)
            if hasattr(command, "load"):  # a sub-app the root imports on use
                command = command.load()
    assert not hasattr(command, "list_commands"), f"{line}: not a leaf command"
    return command

"""How to call ``fieldchat`` in a printed next step (stdlib only: device commands
print it too, and they must not import the server stack)."""

from __future__ import annotations

import shlex
import shutil
import sys
from pathlib import Path

__all__ = ["command_name"]


def command_name(cwd: Path | None = None) -> str:
    """How to call ``fieldchat``: the bare name when it is on the PATH, else the path
    of the one running, relative when it lies under the current folder
    (``.venv/bin/fieldchat`` after ``make run`` in the checkout), absolute otherwise:
    printed commands must run as printed, in another terminal, venv activated or not
    (the printed ``pi.db`` and ``--data-dir`` are relative to the same folder)."""
    script = Path(sys.executable).with_name("fieldchat")
    if not script.exists():
        return "fieldchat"
    found = shutil.which("fieldchat")
    if found is not None and Path(found).resolve() == script.resolve():
        return "fieldchat"
    here = (cwd or Path.cwd()).absolute()
    absolute = script.absolute()
    if absolute.is_relative_to(here):
        relative = absolute.relative_to(here)  # a path, never a name looked up on PATH
        return shlex.quote(str(relative) if relative.parent != Path() else f"./{relative}")
    return shlex.quote(str(absolute))

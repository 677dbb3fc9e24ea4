"""``--help`` without importing typer: typer's own rendering, kept from the last time.

typer 0.29 cannot show help quickly: parsing any command line imports pydantic (its
parameter converters) and rendering help imports rich (with markdown and pygments):
``fieldchat device --help`` took about 5 times the time to import paho (target: twice)
(issue 18). The help of a command path (``fieldchat device send --help``: command
words, then ``--help``, nothing else) depends only on the sources, the installed
typer and rich, the terminal and a few environment variables, so the first run of
such a command line renders it with typer as always and saves the bytes; later runs
with the same key print them (the same bytes) without importing typer.

The key covers the command line, every ``.py`` file of the fieldchat packages (path,
size, modification time), typer's and rich's installed files, this interpreter, the
terminal (sizes and whether each standard stream is one) and the variables rich and
typer read (``COLUMNS``, ``NO_COLOR``, ``TERM`` …). Files live in
``$XDG_CACHE_HOME/fieldchat/help`` (``~/.cache``), at most :data:`MAX_ENTRIES`;
``FIELDCHAT_HELP_CACHE=0`` turns the cache off, and a folder that cannot be written
only means no cache. Standard library only: it runs before anything else.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["MAX_ENTRIES", "cached_help", "help_words", "run_and_keep", "show"]

MAX_ENTRIES = 64  # distinct (command line, terminal) pairs kept; the oldest go first
# What rich and typer read from the environment to lay out and colour help.
_ENV = (
    "COLUMNS",
    "LINES",
    "TERM",
    "COLORTERM",
    "NO_COLOR",
    "FORCE_COLOR",
    "TTY_COMPATIBLE",
    "TTY_INTERACTIVE",
    "TERMINAL_WIDTH",
    "JUPYTER_COLUMNS",
    "JUPYTER_LINES",
    "GITHUB_ACTIONS",
    "FORCE_TERMINAL",
    "PYTHONIOENCODING",
    "LANG",
    "LC_ALL",
    "LC_CTYPE",
)
_PACKAGE = Path(__file__).resolve().parent


def help_words(argv: Sequence[str]) -> bool:
    """Whether ``argv`` asks for the help of a command path: words, then ``--help``."""
    return bool(argv) and argv[-1] == "--help" and not any(a.startswith("-") for a in argv[:-1])


def _folder() -> Path | None:
    if os.environ.get("FIELDCHAT_HELP_CACHE", "1") == "0":
        return None
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fieldchat" / "help"


def _sources() -> list[str]:
    """Path, size and modification time of every file that shapes the help."""
    folders = [_PACKAGE, *(_PACKAGE / name for name in ("device", "broker", "gateway", "schemas"))]
    for name in ("typer", "rich"):
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.origin is not None:
            folders.append(Path(spec.origin).parent)
    seen = []
    for folder in folders:
        with contextlib.suppress(OSError), os.scandir(folder) as entries:
            for entry in entries:
                if entry.name.endswith(".py"):
                    stat = entry.stat()
                    seen.append(f"{entry.path}:{stat.st_size}:{stat.st_mtime_ns}")
    return sorted(seen)


def _terminal() -> list[str]:
    out = []
    for fd in (0, 1, 2):
        try:
            size = os.get_terminal_size(fd)
            out.append(f"{fd}:{size.columns}x{size.lines}")
        except OSError:
            out.append(f"{fd}:-")
        with contextlib.suppress(OSError, ValueError):
            out.append(f"{fd}:{os.isatty(fd)}")
    return out


def _key(argv: Sequence[str]) -> str:
    parts = [
        "\0".join(argv),
        sys.executable,
        sys.version,
        *(f"{name}={os.environ.get(name)}" for name in _ENV),
        *(f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("_TYPER")),
        *_terminal(),
        *_sources(),
    ]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def cached_help(argv: Sequence[str]) -> bytes | None:
    """The help kept for ``argv`` under the current key, or ``None``."""
    folder = _folder()
    if folder is None or not help_words(argv):
        return None
    try:
        return (folder / _key(argv)).read_bytes()
    except OSError:
        return None


def show(kept: bytes) -> int:
    """Print kept help; the exit status (1 when the reader went away, as typer's)."""
    try:
        sys.stdout.buffer.write(kept)
        sys.stdout.flush()
    except BrokenPipeError:  # `fieldchat … --help | head`: no traceback at exit either
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return 0


class _Recorder(io.TextIOBase):
    """Stands for ``sys.stdout`` while help is rendered: passes everything on and
    keeps a copy (rich and click ask it whether it is a terminal, and its size)."""

    def __init__(self, real: Any) -> None:  # noqa: ANN401 - whatever sys.stdout is
        self.real = real
        self.kept: list[bytes] = []

    # click writes bytes too (to a stream without .buffer), so it takes both
    def write(self, text: str | bytes) -> int:
        if isinstance(text, bytes):
            self.kept.append(text)
            self.real.flush()
            return int(self.real.buffer.write(text))
        self.kept.append(text.encode(self.real.encoding or "utf-8"))
        return int(self.real.write(text))

    def flush(self) -> None:
        self.real.flush()

    def isatty(self) -> bool:
        return bool(self.real.isatty())

    def fileno(self) -> int:
        return int(self.real.fileno())

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return str(self.real.encoding)

    @property
    def errors(self) -> str | None:  # type: ignore[override]
        return self.real.errors  # type: ignore[no-any-return]


def run_and_keep(argv: Sequence[str], run: Callable[[], object]) -> None:
    """``run()`` (the command line); when ``argv`` asks for help and it exits 0 having
    written only text, keep that text for the next time."""
    folder = _folder()
    if folder is None or not help_words(argv):
        run()
        return
    real = sys.stdout
    recorder = _Recorder(real)
    sys.stdout = recorder
    status: object = 0
    try:
        run()
    except SystemExit as exc:
        status = exc.code
        raise
    finally:
        sys.stdout = real
        if status in (0, None) and recorder.kept:
            _keep(folder, _key(argv), b"".join(recorder.kept))


def _keep(folder: Path, key: str, text: bytes) -> None:
    with contextlib.suppress(OSError):
        folder.mkdir(parents=True, exist_ok=True)
        entries = sorted(folder.iterdir(), key=lambda p: p.stat().st_mtime)
        for old in entries[: max(0, len(entries) - MAX_ENTRIES + 1)]:
            old.unlink(missing_ok=True)
        part = folder / f".{key}.{os.getpid()}"
        part.write_bytes(text)
        part.replace(folder / key)  # atomic: a reader sees all of it or none

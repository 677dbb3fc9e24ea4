"""``deploy/Containerfile`` without a container runtime (none runs here): it is
multi-stage, the runtime stage runs as a numeric non-root user and installs nothing,
every file it COPYs from the build context exists and covers what the wheel packages,
and its ENTRYPOINT + CMD is a real ``fieldchat`` command."""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from tests.deploy._commands import resolve

ROOT = Path(__file__).resolve().parents[2]
CONTAINERFILE = ROOT / "deploy" / "Containerfile"


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]


def _stages() -> list[Stage]:
    text = re.sub(r"\\\n", " ", CONTAINERFILE.read_text())  # line continuations
    stages: list[Stage] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            words = args.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(words[0], name))
        elif stages:
            stages[-1].instructions.append((keyword, args.strip()))
    return stages


def _exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list), f"use the exec (JSON) form: {args}"
    return [str(v) for v in value]


def test_multi_stage_and_the_runtime_stage_installs_nothing():
    stages = _stages()
    assert len(stages) >= 2
    runtime = stages[-1]
    assert any(a.startswith("--from=") for a in runtime.all("COPY"))
    for run in runtime.all("RUN"):
        assert not re.search(r"\b(pip|apt-get|apt|uv|poetry)\b", run), run


def test_runtime_user_is_numeric_and_not_root():
    users = _stages()[-1].all("USER")
    assert users, "the runtime stage must set USER"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit()
    assert int(uid) != 0
    assert not gid or (gid.isdigit() and int(gid) != 0)


def test_copied_sources_exist_and_cover_the_wheel():
    copied: set[str] = set()
    for stage in _stages():
        for args in stage.all("COPY"):
            words = shlex.split(args)
            if any(w.startswith("--from=") for w in words):
                continue
            sources = [w for w in words if not w.startswith("--")][:-1]
            for src in sources:
                assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
                copied.add(src.rstrip("/"))
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    needed = {
        "pyproject.toml",
        project["project"]["readme"],
        *project["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"],
    }
    assert needed <= copied, f"the build stage misses {sorted(needed - copied)}"


def test_entrypoint_and_cmd_are_a_real_fieldchat_command():
    runtime = _stages()[-1]
    entrypoint = _exec_form(runtime.all("ENTRYPOINT")[-1])
    cmd = _exec_form(runtime.all("CMD")[-1])
    assert entrypoint == ["fieldchat"]
    assert resolve(cmd).name == "run"
    assert cmd[:2] == ["gateway", "run"]


def test_exposed_port_is_the_gateway_port():
    runtime = _stages()[-1]
    env = " ".join(runtime.all("ENV"))
    port = re.search(r"FIELDCHAT_GATEWAY_PORT=(\d+)", env)
    assert port
    assert runtime.all("EXPOSE") == [port.group(1)]
    assert "FIELDCHAT_GATEWAY_HOST=0.0.0.0" in env  # reachable from outside the container

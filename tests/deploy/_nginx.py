"""Debian's nginx running ``deploy/nginx/fieldchat.conf`` on ephemeral loopback ports.

The shipped file is used verbatim except for the lines an operator edits anyway (listen
addresses, certificate paths, upstream addresses); each replacement must match exactly
once, so a change to the recipe that the test no longer covers fails here, loudly.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
RECIPE = Path(__file__).resolve().parents[2] / "deploy" / "nginx" / "fieldchat.conf"


def render(*, http_port: int, https_port: int, upstreams: list[int], cert: Path, key: Path) -> str:
    """The recipe with this machine's ports, certificate and replicas."""
    text = RECIPE.read_text()
    replacements = {
        "listen 80;": f"listen 127.0.0.1:{http_port};",
        "listen 443 ssl http2;": f"listen 127.0.0.1:{https_port} ssl http2;",
        "/etc/ssl/fieldchat/fullchain.pem": str(cert),
        "/etc/ssl/fieldchat/privkey.pem": str(key),
        **{
            f"server 127.0.0.1:{8081 + i} ": f"server 127.0.0.1:{port} "
            for i, port in enumerate(upstreams)
        },
    }
    for old, new in replacements.items():
        count = text.count(old)
        if count != 1:
            raise AssertionError(f"{RECIPE.name}: {old!r} occurs {count} times, expected once")
        text = text.replace(old, new)
    return text


class Nginx:
    """``nginx -c <tmp>/nginx.conf -p <tmp>`` in the foreground (``daemon off``)."""

    def __init__(self, workdir: Path, site: str) -> None:
        self.dir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "fieldchat.conf").write_text(site)
        temp = {name: workdir / name for name in ("body", "proxy", "fastcgi", "uwsgi", "scgi")}
        for path in temp.values():
            path.mkdir(exist_ok=True)
        self.conf = workdir / "nginx.conf"
        self.error_log = workdir / "error.log"
        self.conf.write_text(
            "\n".join(
                [
                    # Workers would otherwise drop to nobody, who cannot read the tmp files.
                    *(["user root;"] if os.geteuid() == 0 else []),
                    "daemon off;",
                    "worker_processes 1;",
                    f"pid {workdir / 'nginx.pid'};",
                    f"error_log {self.error_log} info;",
                    "events { worker_connections 256; }",
                    "http {",
                    f"    access_log {workdir / 'access.log'};",
                    f"    client_body_temp_path {temp['body']};",
                    f"    proxy_temp_path {temp['proxy']};",
                    f"    fastcgi_temp_path {temp['fastcgi']};",
                    f"    uwsgi_temp_path {temp['uwsgi']};",
                    f"    scgi_temp_path {temp['scgi']};",
                    f"    include {workdir / 'fieldchat.conf'};",
                    "}",
                    "",
                ]
            )
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def _argv(self, *extra: str) -> list[str]:
        # -e: the error log before the configuration is read (Debian's default is stderr,
        # but never /var/log/nginx, which may be missing or the system service's).
        return [NGINX, "-e", str(self.error_log), "-p", str(self.dir), "-c", str(self.conf), *extra]

    def check(self) -> subprocess.CompletedProcess[str]:
        """``nginx -t`` on the rendered configuration."""
        return subprocess.run(
            self._argv("-t"), capture_output=True, text=True, timeout=30, check=False
        )

    def start(self, port: int) -> Nginx:
        self.proc = subprocess.Popen(
            self._argv(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        end = time.monotonic() + 15
        while time.monotonic() < end:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", port), timeout=0.2),
            ):
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"nginx exited: {self.error_log.read_text()[-2000:]}")
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("nginx did not start listening")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # fast shutdown: the master stops its workers
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

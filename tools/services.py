"""Processes the tests and the benchmark start: gunicorn from the Procfile, on loopback.

Everything started here is stopped by its own pid; nothing else on the machine is touched.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from mnist_api.config import PROJECT_ROOT

API_KEYS = ("test-key-one", "test-key-two")
# The server secret of every service the tests start (production requires its own).
TEST_SECRET_KEY = "test-secret-key-not-for-production"


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def procfile_command(process: str) -> list[str]:
    """One Procfile line, run by a shell as Heroku does (`exec` keeps the pid ours)."""
    for line in (PROJECT_ROOT / "Procfile").read_text().splitlines():
        name, _, command = line.partition(":")
        if name.strip() == process:
            return ["/bin/sh", "-c", f"exec {command.strip()}"]
    raise LookupError(f"no {process!r} line in the Procfile")


def venv_env(**extra: str) -> dict[str, str]:
    """This process's environment with the venv's bin first on PATH, plus `extra`."""
    env = dict(os.environ)
    env.setdefault("SECRET_KEY", TEST_SECRET_KEY)  # a service started from here needs one
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


@dataclass
class LiveServer:
    """A service started as a subprocess, reachable over HTTP on 127.0.0.1."""

    url: str
    api_key: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        """Everything the server printed on stdout so far (its JSON log lines)."""
        return self.log_path.read_text(errors="replace")

    def records(self) -> list[dict[str, Any]]:
        """The server's log lines, parsed."""
        return [json.loads(line) for line in self.log().splitlines() if line.startswith("{")]

    def worker_pids(self) -> set[int]:
        """The pids of the workers that have loaded the model so far."""
        return {r["pid"] for r in self.records() if "loaded and warmed up" in r["message"]}

    def worker_pids_when(self, count: int, timeout: float = 30.0) -> set[int]:
        """Wait until `count` workers have loaded the model (ever), and return their pids."""
        deadline = time.monotonic() + timeout
        pids = self.worker_pids()
        while len(pids) < count and time.monotonic() < deadline:
            time.sleep(0.1)
            pids = self.worker_pids()
        if len(pids) < count:
            raise TimeoutError(f"only {len(pids)} of {count} workers loaded the model")
        return pids

    def children(self) -> list[int]:
        """The pids of the gunicorn master's live workers (whatever app they serve)."""
        pids = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:  # the process ended while we looked
                continue
            if int(fields[1]) == self.process.pid:
                pids.append(int(stat.parent.name))
        return sorted(pids)

    def stderr(self) -> str:
        """Everything the server printed on stderr so far."""
        return self.log_path.with_suffix(".err").read_text(errors="replace")


def wait_ready(url: str, process: subprocess.Popen[bytes], timeout: float = 30.0) -> float:
    """Poll /readyz until 200; return the seconds it took. Fails if the process dies."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode} before it was ready")
        try:
            if requests.get(f"{url}/readyz", timeout=1).status_code == 200:
                return time.monotonic() - started
        except requests.RequestException:  # not listening yet, or busy booting
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{url} was not ready within {timeout} s")


def stop(process: subprocess.Popen[bytes]) -> None:
    """Stop a process we started, by its pid: TERM, then KILL if it lingers."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


def start_web(
    tmp_dir: Path, app: str = "api:app", root: Path = PROJECT_ROOT, **env: str
) -> LiveServer:
    """Start the Procfile's web command with gunicorn on a free port and wait until ready.

    `env` overrides the environment (e.g. WEB_CONCURRENCY="3"); `app` serves another WSGI
    app with the same gunicorn settings (the benchmark's floor, `tools.floor_app:app`);
    `root` runs another copy of the project (a test that changes its code).
    """
    port = free_port()
    log_path = tmp_dir / f"web-{port}.log"
    defaults = {
        "PORT": str(port),
        "API_KEYS": ",".join(API_KEYS),
        "SECRET_KEY": TEST_SECRET_KEY,
        "WEB_CONCURRENCY": "2",
        "LOG_FORMAT": "json",
        "LOG_LEVEL": "INFO",
        "RATE_LIMIT": "off",  # tests/http/test_rate_limits.py turns it on where it is the subject
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_dir / f"metrics-{port}"),
        # Its own feedback file (gunicorn.conf.py migrates it), never the repository's.
        "DATABASE_URL": f"sqlite:///{tmp_dir / f'feedback-{port}.db'}",
    }
    environment = venv_env(**{**defaults, **env})
    with log_path.open("wb") as out, log_path.with_suffix(".err").open("wb") as err:
        command = [part.replace("api:app", app) for part in procfile_command("web")]
        process = subprocess.Popen(command, cwd=root, env=environment, stdout=out, stderr=err)
    server = LiveServer(f"http://127.0.0.1:{port}", API_KEYS[0], process, log_path)
    try:
        wait_ready(server.url, process)
    except Exception:
        stop(process)
        raise
    return server

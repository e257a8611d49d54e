"""A real PostgreSQL server on a free loopback port, in a temporary folder, for the tests.

PostgreSQL refuses to run as root, so when the tests run as root (CI, this machine) initdb
and postgres run as the `postgres` system user, in a folder that user owns. `setpriv` execs
the server in place (runuser would fork and keep the pid, and not pass SIGINT on), so the
pid we hold is the server's own. The server is stopped by that pid; nothing else on the
machine is touched.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg

SYSTEM_USER = "postgres"


def postgres_bin() -> Path | None:
    """The newest installed /usr/lib/postgresql/<version>/bin, or None."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/postgres"),
        key=lambda path: int(Path(path).parent.parent.name),
    )
    return Path(found[-1]).parent if found else None


class PostgresServer:
    """One postgres process with trust authentication on 127.0.0.1:`port`."""

    def __init__(self, port: int) -> None:
        bin_dir = postgres_bin()
        if bin_dir is None:
            raise RuntimeError("PostgreSQL is not installed (scripts/install-system-deps.sh)")
        self.bin_dir = bin_dir
        self.port = port
        # Not under pytest's tmp_path: root's temporary folders are closed to other users.
        self.workdir = Path(tempfile.mkdtemp(prefix="mnist-pg-"))
        self.data_dir = self.workdir / "data"
        self.process: subprocess.Popen[bytes] | None = None
        self.as_root = os.geteuid() == 0
        if self.as_root:
            shutil.chown(self.workdir, SYSTEM_USER, SYSTEM_USER)

    @property
    def url(self) -> str:
        """A Heroku-style URL (`postgres://`): the service must rewrite its scheme itself."""
        return f"postgres://postgres@127.0.0.1:{self.port}/postgres"

    def _command(self, *args: str) -> list[str]:
        prefix = (
            ["setpriv", f"--reuid={SYSTEM_USER}", f"--regid={SYSTEM_USER}", "--init-groups", "--"]
            if self.as_root
            else []
        )
        return [*prefix, *args]

    def start(self) -> None:
        """initdb on the first start, then start the server and wait until it accepts."""
        if not self.data_dir.exists():
            subprocess.run(
                self._command(
                    str(self.bin_dir / "initdb"),
                    "-D",
                    str(self.data_dir),
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "--no-sync",
                    "-E",
                    "UTF8",
                ),
                check=True,
                capture_output=True,
            )
        log = (self.workdir / "postgres.log").open("ab")
        self.process = subprocess.Popen(
            self._command(
                str(self.bin_dir / "postgres"),
                "-D",
                str(self.data_dir),
                "-p",
                str(self.port),
                "-h",
                "127.0.0.1",
                "-k",
                str(self.workdir),  # the unix socket, not /var/run/postgresql
                "-c",
                "fsync=off",
            ),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"postgres exited: {self.log()[-2000:]}")
            try:
                with psycopg.connect(self.dsn, connect_timeout=1):
                    return
            except psycopg.OperationalError:
                time.sleep(0.1)
        raise TimeoutError(f"postgres on port {self.port} did not start")

    @property
    def dsn(self) -> str:
        """A libpq connection string for inspecting the server from the test."""
        return f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres"

    def log(self) -> str:
        """The server's log so far."""
        return (self.workdir / "postgres.log").read_text(errors="replace")

    def stop(self) -> None:
        """Fast shutdown (SIGINT) and wait; SIGKILL if it lingers."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(2)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        self.process = None

    def remove(self) -> None:
        """Stop and delete the data folder."""
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

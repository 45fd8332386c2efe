"""A throwaway PostgreSQL server for tests: Debian's binaries, a fresh data directory under /tmp,
run as an unprivileged user (PostgreSQL refuses root), listening on 127.0.0.1 and a private unix
socket directory. ``make sysdeps`` installs the ``postgresql`` package."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from tests.util import free_port, stop_process


def binaries() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"),
                   key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    return Path(found[-1]).parent if found else None


def _user() -> str:
    """The account to run the server as: Debian's ``postgres`` (made by the package), or nobody."""
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    raise RuntimeError("no unprivileged user to run PostgreSQL as")


class PgServer:
    def __init__(self):
        self.bin = binaries()
        if self.bin is None:
            raise RuntimeError("PostgreSQL is not installed (make sysdeps installs Debian's postgresql)")
        self.user = _user()
        self.root = Path(tempfile.mkdtemp(prefix="dispatch-cloud-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.log = self.root / "server.log"
        pw = pwd.getpwnam(self.user)
        os.chown(self.root, pw.pw_uid, pw.pw_gid)
        os.chmod(self.root, 0o700)
        self._as_user = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": [],
                         "env": {"PATH": "/usr/bin:/bin", "HOME": str(self.root), "LC_ALL": "C"},
                         "cwd": str(self.root)}
        subprocess.run([str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust",
                        "-E", "UTF8", "--no-sync", "--no-instructions"], check=True,
                       capture_output=True, timeout=120, **self._as_user)

    @property
    def connection(self) -> dict:
        """``PostgreSQL.Connection`` for a cluster config."""
        return {"host": "127.0.0.1", "port": str(self.port), "user": "postgres", "dbname": "postgres"}

    def start(self, timeout: float = 30) -> "PgServer":
        import psycopg
        self.proc = subprocess.Popen(
            [str(self.bin / "postgres"), "-D", str(self.data), "-p", str(self.port), "-k", str(self.root),
             "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "synchronous_commit=off",
             "-c", "full_page_writes=off", "-c", "shared_buffers=16MB", "-c", "max_connections=30"],
            stdout=subprocess.DEVNULL, stderr=open(self.log, "ab"), **self._as_user)
        deadline = time.monotonic() + timeout
        while True:
            try:
                psycopg.connect(connect_timeout=2, **self.connection).close()
                return self
            except psycopg.OperationalError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"PostgreSQL did not start: {self.log.read_text()[-2000:]}")
                time.sleep(0.1)

    def stop(self, sig: int = signal.SIGINT) -> None:
        """SIGINT: PostgreSQL's fast shutdown (it ends every session at once)."""
        stop_process(self.proc, sig)
        self.proc = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

"""One dispatcher per cluster: the lock a process must hold before it dispatches anything.

With ``PostgreSQL.Connection`` in the config it is Arvados' own ``dblock.Dispatch``: the session
advisory lock 10005 on the cluster database, so ours and a Go ``arvados-dispatch-cloud`` (or
``arvados-dispatch-lsf``) exclude each other too. Without one (dev mode, tests) it is an exclusive
``flock`` on a file in the state directory: the same guarantee, on one host.

Both answer ``try_acquire()`` (never blocks long: connect and statement timeouts), ``holder()``
(who has it, for the "waiting" log line), ``check()`` (is it still ours) and ``release()``. The
caller runs the retry loop, so it can keep serving the management API meanwhile.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
from collections.abc import Mapping
from pathlib import Path

log = logging.getLogger("dispatch.lock")

DISPATCH_LOCK_ID = 10005  # lib/controller/dblock: Dispatch
RETRY_INTERVAL = 5.0  # seconds between attempts while another process holds it (Go's retryDelay)
CHECK_INTERVAL = 2.0  # seconds between checks that the lock is still ours

# libpq settings that bound every call (a dead server or network must not hang the check).
# The site's own Connection keys win.
_PG_DEFAULTS = {"connect_timeout": "5", "keepalives": "1", "keepalives_idle": "5",
                "keepalives_interval": "2", "keepalives_count": "2", "tcp_user_timeout": "8000",
                "application_name": "dispatch-cloud"}


class PgAdvisoryLock:
    """``pg_try_advisory_lock(10005)`` held by one open session."""

    def __init__(self, connection: Mapping[str, str], key: int = DISPATCH_LOCK_ID):
        self.params = {**_PG_DEFAULTS, **dict(connection)}
        self.key = key
        self._conn = None
        self._last_conn = None

    def describe(self) -> str:
        p = self.params
        where = p.get("host", "") or "local socket"
        return f"PostgreSQL advisory lock {self.key} on {where}:{p.get('port', '5432')}/{p.get('dbname', '')}"

    def _connect(self):
        import psycopg
        conn = psycopg.connect(autocommit=True, **self.params)
        conn.execute("SET statement_timeout = 5000")
        return conn

    def try_acquire(self) -> bool:
        """True if this process now holds the lock; False if another does. Raises on DB errors."""
        if self._conn is not None:
            return True
        conn = self._connect()
        try:
            [locked] = conn.execute("SELECT pg_try_advisory_lock(%s)", (self.key,)).fetchone()
        except BaseException:
            conn.close()
            raise
        if not locked:
            self._last_conn = conn  # kept for holder(), closed there
            return False
        self._conn = conn
        return True

    def holder(self) -> str:
        """``client_addr:client_port`` of the session holding the lock (as Go logs it), or ""."""
        conn = self._last_conn or self._connect()
        self._last_conn = None
        try:
            row = conn.execute(
                "SELECT client_addr::text, client_port, pid FROM pg_stat_activity WHERE pid IN "
                "(SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND objid = %s AND granted)",
                (self.key,)).fetchone()
        finally:
            conn.close()
        if row is None:
            return ""
        addr, port, pid = row
        if addr is None:  # a unix-socket client has no address
            return f"local pid {pid}"
        return f"{addr.split('/')[0]}:{port}"

    def check(self) -> bool:
        """Still ours: the session is alive and still holds the lock. Never raises."""
        if self._conn is None:
            return False
        try:
            [held] = self._conn.execute(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = %s "
                "AND pid = pg_backend_pid() AND granted", (self.key,)).fetchone()
            if held:
                return True
            log.error("dispatch lock no longer held by this session", extra={"ID": self.key})
        except Exception as e:
            log.error("database connection check failed: lost the dispatch lock",
                      extra={"ID": self.key, "error": str(e)})
        self._drop()
        return False

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:
                pass

    def release(self) -> None:
        if self._conn is not None:
            try:
                self._conn.execute("SELECT pg_advisory_unlock(%s)", (self.key,))
            except Exception as e:
                log.info("error releasing pg_advisory_lock", extra={"ID": self.key, "error": str(e)})
            self._drop()


class FileLock:
    """An exclusive ``flock`` on ``<state dir>/dispatch-<cluster>.lock``; the holder writes its
    host and pid into it. The kernel drops the lock when the process dies, however it dies."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._fd: int | None = None

    def describe(self) -> str:
        return f"lock file {self.path}"

    def try_acquire(self) -> bool:
        if self._fd is not None:
            return True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{socket.gethostname()} pid {os.getpid()}\n".encode())
        self._fd = fd
        return True

    def holder(self) -> str:
        try:
            return self.path.read_text().strip()
        except OSError:
            return ""

    def check(self) -> bool:
        """Ours while our descriptor still names the file at ``path`` (someone deleting or replacing
        the file would let a second process lock a new one)."""
        if self._fd is None:
            return False
        try:
            same = os.stat(self.path).st_ino == os.fstat(self._fd).st_ino
        except OSError:
            same = False
        if not same:
            log.error("lock file removed or replaced: lost the dispatch lock", extra={"Path": str(self.path)})
            self.release()
        return same

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # closing drops the flock


def state_dir(explicit: str | None = None) -> Path:
    """Where a non-dev dispatcher keeps its lock file: ``--state-dir``, systemd's
    ``$STATE_DIRECTORY``, ``$DISPATCH_CLOUD_STATE``, else ``~/.local/state/dispatch-cloud``."""
    base = (explicit or os.environ.get("STATE_DIRECTORY", "").split(":")[0]
            or os.environ.get("DISPATCH_CLOUD_STATE")
            or os.path.join(os.path.expanduser("~"), ".local", "state", "dispatch-cloud"))
    return Path(base)


def for_cluster(cluster, directory: Path):
    """The lock this cluster's config calls for (see the module docstring)."""
    conn = cluster.postgresql_connection
    if conn.get("host") or conn.get("dbname"):
        return PgAdvisoryLock(conn)
    return FileLock(Path(directory) / f"dispatch-{cluster.cluster_id}.lock")

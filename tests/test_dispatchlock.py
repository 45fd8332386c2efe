"""The dispatch lock against a real PostgreSQL server (Go's advisory lock 10005) and as a lock file."""

from __future__ import annotations

import os
import subprocess
import sys

import psycopg
import pytest

from actors.dispatchlock import DISPATCH_LOCK_ID, FileLock, PgAdvisoryLock, for_cluster, state_dir
from conf.model import Cluster
from tests import pgserver


@pytest.fixture(scope="module")
def pg():
    if pgserver.binaries() is None:
        pytest.skip("PostgreSQL not installed (make sysdeps installs Debian's postgresql)")
    server = pgserver.PgServer().start()
    yield server
    server.close()


def test_one_holder_others_see_who_holds_it(pg):
    a, b = PgAdvisoryLock(pg.connection), PgAdvisoryLock(pg.connection)
    try:
        assert a.try_acquire()
        assert a.check()
        assert not b.try_acquire()
        # as Go logs it: the holder's client address and port from pg_stat_activity
        [port] = a._conn.execute("SELECT inet_client_port()").fetchone()
        assert b.holder() == f"127.0.0.1:{port}"
        # it is Arvados' lock: a Go dispatcher's pg_try_advisory_lock(10005) would fail too
        with psycopg.connect(**pg.connection) as other:
            assert other.execute("SELECT pg_try_advisory_lock(%s)", (DISPATCH_LOCK_ID,)).fetchone() == (False,)
        a.release()
        assert b.try_acquire() and b.check()
    finally:
        a.release()
        b.release()


def test_check_fails_when_the_session_is_killed(pg):
    a = PgAdvisoryLock(pg.connection)
    assert a.try_acquire()
    [pid] = a._conn.execute("SELECT pg_backend_pid()").fetchone()
    with psycopg.connect(autocommit=True, **pg.connection) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
    assert not a.check()
    assert not a.check()  # and stays lost until re-acquired
    b = PgAdvisoryLock(pg.connection)
    assert b.try_acquire()  # the server released it with the session
    b.release()


def test_unreachable_database_is_an_error_not_a_hang(pg):
    lock = PgAdvisoryLock({**pg.connection, "port": "1", "password": "s3cret-pw"})
    with pytest.raises(psycopg.OperationalError) as e:
        lock.try_acquire()
    assert "s3cret" not in str(e.value) and "s3cret" not in lock.describe()


def test_file_lock_excludes_a_second_process(tmp_path):
    path = tmp_path / "state" / "dispatch-zzzzz.lock"
    a = FileLock(path)
    assert a.try_acquire() and a.check()
    assert f"pid {os.getpid()}" in FileLock(path).holder()
    # another process cannot take it while we hold it, and can once we let go
    probe = ("import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR)\n"
             "try: fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB); print('got')\n"
             "except BlockingIOError: print('busy')")
    run = lambda: subprocess.run([sys.executable, "-c", probe, str(path)], capture_output=True, text=True,
                                 timeout=30).stdout.strip()
    assert run() == "busy"
    assert not FileLock(path).try_acquire()
    a.release()
    assert run() == "got"


def test_file_lock_removed_means_lost(tmp_path):
    a = FileLock(tmp_path / "x.lock")
    assert a.try_acquire()
    (tmp_path / "x.lock").unlink()
    assert not a.check()


def test_which_lock(tmp_path, monkeypatch):
    assert isinstance(for_cluster(Cluster(), tmp_path), FileLock)
    assert for_cluster(Cluster(cluster_id="abcde"), tmp_path).path == tmp_path / "dispatch-abcde.lock"
    pg = for_cluster(Cluster(postgresql_connection={"host": "db", "dbname": "arvados"}), tmp_path)
    assert isinstance(pg, PgAdvisoryLock) and pg.params["host"] == "db"
    assert "db:5432/arvados" in pg.describe()
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/dispatch-cloud")
    assert state_dir() == state_dir(None) and str(state_dir()) == "/var/lib/dispatch-cloud"
    assert str(state_dir("/x")) == "/x"

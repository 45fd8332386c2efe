"""Small helpers shared by the process-level tests (real servers and subprocesses)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from contextlib import contextmanager


def free_port() -> int:
    """A loopback port that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WaitTimeout(AssertionError, TimeoutError):
    """``wait_for`` gave up: a failed assertion to pytest, a TimeoutError to a bench script."""


def wait_for(cond, timeout: float = 10.0, what: str = "condition", interval: float = 0.05):
    """Poll ``cond`` until it returns something truthy, at most ``timeout`` seconds."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(interval)
    raise WaitTimeout(f"timed out after {timeout}s waiting for {what}")


def run_threads(target, args_list, timeout: float) -> None:
    """``target(*args)`` for each of ``args_list`` on its own thread, all started before any is
    joined (each for at most ``timeout`` seconds): the shape of every race test. A thread that
    raised or did not finish fails the test (an exception on a thread is otherwise only a
    warning, and the test would pass without the work that thread was checking)."""
    errors: list[BaseException] = []

    def run(*args):
        try:
            target(*args)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=run, args=args) for args in args_list]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    stuck = sum(t.is_alive() for t in threads)
    assert not stuck, f"{stuck} of {len(threads)} threads still running after {timeout}s"
    if errors:
        raise errors[0]


@contextmanager
def closing_each(factory):
    """A ``make(...)`` that calls ``factory(...)`` and closes each thing it made on exit, for
    fixtures that let a test make several (clusters, live servers)."""
    made = []

    def make(*args, **kw):
        thing = factory(*args, **kw)
        made.append(thing)
        return thing
    try:
        yield make
    finally:
        for thing in made:
            thing.close()


def stop_process(proc: subprocess.Popen | None, sig: int = signal.SIGTERM, wait: float = 30.0) -> int | None:
    """Send ``sig`` to a child we started and wait for it; SIGKILL it if it has not exited within
    ``wait`` seconds. Returns its exit status (None without a process)."""
    if proc is None:
        return None
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            return proc.wait(wait)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait(10)


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far, from /proc (benches)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

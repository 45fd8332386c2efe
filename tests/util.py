"""Small helpers shared by the process-level tests (real servers and subprocesses)."""

from __future__ import annotations

import socket
import time


def free_port() -> int:
    """A loopback port that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(cond, timeout: float = 10.0, what: str = "condition", interval: float = 0.05):
    """Poll ``cond`` until it returns something truthy, at most ``timeout`` seconds."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")

"""Time sources. Actors never read the wall clock: ``now`` reaches them in ``tick(now)``.

The Ticker (a plain thread) reads a Clock; tests and simulations use :class:`FakeClock`, whose
time moves only when told to, so every timeout in the system is deterministic.
"""

from __future__ import annotations

import threading
import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Seconds since the epoch."""


class SystemClock:
    def now(self) -> float:
        return time.time()


class FakeClock:
    """A clock that moves only by :meth:`advance` / :meth:`set`. Thread-safe."""

    def __init__(self, start: float = 1_700_000_000.0):
        self._t = float(start)
        self._lock = threading.Lock()

    def now(self) -> float:
        with self._lock:
            return self._t

    def advance(self, dt: float) -> float:
        if dt < 0:
            raise ValueError("FakeClock cannot go backwards")
        with self._lock:
            self._t += dt
            return self._t

    def set(self, t: float) -> None:
        with self._lock:
            if t < self._t:
                raise ValueError("FakeClock cannot go backwards")
            self._t = float(t)

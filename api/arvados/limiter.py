"""How many container API requests may be in flight at once: the Go SDK's ``requestLimiter``
(``sdk/go/arvados/limiter.go``), which every Arvados client built from the cluster config uses.

It starts at 8 requests, grows by 10 % (at least 1) with every answer that is not a server error
but never beyond twice what was in flight then, nor beyond ``max_limit`` (Go sets
``API.MaxConcurrentRequests / 4``); a 503 halves it and starts no new request for a second, and
more 503s inside that second do not halve it again. A slot is held across a request's retries.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

INITIAL_LIMIT = 8
QUIET_PERIOD = 1.0  # seconds without new requests after a 503


class RequestLimiter:
    """Thread-safe. ``limit`` 0 means unlimited (until the first 503 sets one)."""

    def __init__(self, max_limit: int = 0, *, initial: int = INITIAL_LIMIT,
                 clock: Callable[[], float] = time.monotonic):
        self.max_limit = max(0, int(max_limit))
        self.limit = initial if not self.max_limit else min(initial, self.max_limit)
        self.current = 0
        self.quiet_until = 0.0
        self._clock = clock
        self._cond = threading.Condition()

    def acquire(self, timeout: float | None = None) -> bool:
        """Take a slot, waiting out a quiet period and a full limit; False if ``timeout`` passed
        first (then no slot is held)."""
        end = None if timeout is None else self._clock() + timeout
        with self._cond:
            while True:
                now = self._clock()
                wait = self.quiet_until - now
                if wait <= 0 and (self.limit <= 0 or self.current < self.limit):
                    self.current += 1
                    return True
                if end is not None:
                    if now >= end:
                        return False
                    wait = min(wait, end - now) if wait > 0 else end - now
                self._cond.wait(wait if wait > 0 else None)

    def release(self) -> None:
        with self._cond:
            self.current -= 1
            self._cond.notify()

    def report(self, status: int | None) -> bool:
        """One answer's HTTP status (None: no answer, which changes nothing); True if a 503."""
        with self._cond:
            if status == 503:
                if self.limit == 0:
                    self.limit = self.current  # unlimited until now: start from what was in flight
                now = self._clock()
                if now >= self.quiet_until:
                    self.limit = (self.limit + 1) // 2
                    self.quiet_until = now + QUIET_PERIOD
                return True
            if status is not None and 200 <= status < 400 and self.limit > 0:
                self.limit += max(1, self.limit // 10)
                self.limit = min(self.limit, max(1, self.current * 2))
                if self.max_limit:
                    self.limit = min(self.limit, self.max_limit)
                self._cond.notify_all()
            return False

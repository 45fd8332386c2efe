"""Delivers ``tick(now)`` to an actor only when one of its deadlines is due.

Waking 1,000 worker actors every second costs ~30 ms of CPU per tick, so each actor tells the
Ticker its next deadline (``schedule``) and is woken once, at that time. A delivered deadline is
forgotten: the actor schedules its next one while handling the tick, so a slow actor never has
more than one tick queued. An early tick is harmless (actors compare ``now`` with their own
deadlines).

In production a thread drives ``fire_due`` from the real clock; a simulation calls it itself
after moving a FakeClock.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
from collections.abc import Callable, Hashable

from cloud.clock import Clock

log = logging.getLogger("dispatch.ticker")


class Ticker:
    def __init__(self, clock: Clock):
        self.clock = clock
        self._heap: list[tuple[float, int, Hashable]] = []
        self._due: dict[Hashable, float] = {}
        self._targets: dict[Hashable, Callable[[float], None]] = {}
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False

    def register(self, key: Hashable, deliver: Callable[[float], None]) -> None:
        """``deliver(now)`` is called (from the ticker thread) when ``key``'s deadline is due."""
        with self._cond:
            self._targets[key] = deliver

    def unregister(self, key: Hashable) -> None:
        with self._cond:
            self._targets.pop(key, None)
            self._due.pop(key, None)

    def schedule(self, key: Hashable, when: float) -> None:
        """Wake ``key`` at ``when`` (keeps the earliest pending deadline)."""
        with self._cond:
            cur = self._due.get(key)
            if cur is not None and cur <= when:
                return
            self._due[key] = when
            heapq.heappush(self._heap, (when, next(self._seq), key))
            if self._heap[0][2] == key:
                self._cond.notify()

    def next_deadline(self) -> float | None:
        with self._cond:
            self._drop_stale()
            return self._heap[0][0] if self._heap else None

    def _drop_stale(self) -> None:
        h = self._heap
        while h and self._due.get(h[0][2]) != h[0][0]:
            heapq.heappop(h)

    def fire_due(self, now: float | None = None) -> int:
        """Deliver every deadline <= now; returns how many were delivered."""
        if now is None:
            now = self.clock.now()
        fired = []
        with self._cond:
            h = self._heap
            while h:
                self._drop_stale()
                if not h or h[0][0] > now:
                    break
                _, _, key = heapq.heappop(h)
                del self._due[key]
                target = self._targets.get(key)
                if target is not None:
                    fired.append(target)
        for deliver in fired:
            try:
                deliver(now)
            except Exception:  # a stopped actor: nothing to wake
                log.debug("tick delivery failed", exc_info=True)
        return len(fired)

    # -- real-time driving ---------------------------------------------------------------------

    def start(self, max_wait: float = 1.0) -> None:
        self._stopping = False
        self._thread = threading.Thread(target=self._run, args=(max_wait,), name="Ticker", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def _run(self, max_wait: float) -> None:
        while True:
            with self._cond:
                if self._stopping:
                    return
                self._drop_stale()
                now = self.clock.now()
                wait = max_wait if not self._heap else min(max_wait, self._heap[0][0] - now)
                if wait > 0:
                    self._cond.wait(wait)
                    if self._stopping:
                        return
            self.fire_due()

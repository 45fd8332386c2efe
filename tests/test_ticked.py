"""actors.base.TickedActor: the register / book / tick / unregister dance, written once."""

from __future__ import annotations

from actors.base import ACTIVITY, TickedActor
from actors.ticker import Ticker
from cloud.clock import FakeClock


class Alarm(TickedActor):
    """Wakes at 10, then every 5 s after each tick."""

    def __init__(self, ticker):
        super().__init__(ticker)
        self.ticks = []

    def next_wake(self):
        return 10.0

    def tick(self, now):
        self.ticks.append(now)
        self.wake_at(now + 5)

    def seen(self):
        return list(self.ticks)


def test_registers_books_ticks_and_unregisters():
    ticker = Ticker(FakeClock(0.0))
    ref = Alarm.start(ticker)
    try:
        assert ticker.next_deadline() == 10.0  # booked on start
        assert ticker.fire_due(9.0) == 0
        assert ticker.fire_due(10.0) == 1
        ACTIVITY.wait_idle(5)
        assert ref.proxy().seen().get(timeout=5) == [10.0]
        assert ticker.next_deadline() == 15.0  # booked by the tick
    finally:
        ref.stop()
    assert ticker.fire_due(100.0) == 0  # unregistered on stop: nothing to wake

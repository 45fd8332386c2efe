"""Spot price history bookkeeping: pure functions plus a small locked store (Go's prices map)."""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable

from cloud.base import InstancePrice

GIB = 1 << 30


def normalize_price_history(prices: Iterable[InstancePrice]) -> list[InstancePrice]:
    """Newest first, dropping a point whose older neighbour has the same start time or price
    (so each run of equal prices keeps its oldest point): Go's ``NormalizePriceHistory``."""
    out = sorted(prices, key=lambda p: p.start_time, reverse=True)
    i = 0
    while i < len(out) - 1:
        if out[i].start_time == out[i + 1].start_time or out[i].price == out[i + 1].price:
            del out[i]
        else:
            i += 1
    return out


def ebs_hourly(ebs_price_per_gib_month: float, added_scratch: int) -> float:
    """What AddedScratch's EBS volume adds per hour: ceil(GiB) * price / 30 / 24."""
    return ebs_price_per_gib_month * math.ceil(added_scratch / GIB) / 30 / 24 if added_scratch > 0 else 0.0


class SpotPrices:
    """Price histories by (provider type, availability zone), each with its last update time."""

    def __init__(self):
        self._lock = threading.Lock()
        self._prices: dict[tuple[str, str], list[InstancePrice]] = {}
        self._updated: dict[tuple[str, str], float] = {}

    def stale(self, keys: Iterable[tuple[str, str]], now: float, interval: float) -> bool:
        """Does any of these keys lack an update within ``interval``?"""
        with self._lock:
            return any(self._updated.get(k, -math.inf) < now - interval for k in keys)

    def update(self, entries: Iterable[tuple[str, str, InstancePrice]], now: float, interval: float) -> None:
        """Add fetched points, expire keys not updated for 64 intervals, normalize every series."""
        with self._lock:
            for ptype, az, price in entries:
                self._prices.setdefault((ptype, az), []).append(price)
                self._updated[(ptype, az)] = now
            for k, last in list(self._updated.items()):
                if last < now - 64 * interval:
                    del self._updated[k]
                    self._prices.pop(k, None)
            for k, series in self._prices.items():
                self._prices[k] = normalize_price_history(series)

    def history(self, ptype: str, az: str) -> list[InstancePrice]:
        with self._lock:
            return list(self._prices.get((ptype, az), ()))

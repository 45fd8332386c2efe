"""The pool's quota, capacity and concurrency bookkeeping, as pure functions on frozen values.

Arvados keeps this in ``worker.Pool`` (``atQuotaUntil``, ``atQuotaUntilFewerInstances``,
``atCapacityUntil``, the create holdoff) and ``scheduler.maxConcurrency`` (the 503 back-off and
the quota estimate). The SchedulerActor holds one :class:`PoolState` and one
:class:`Concurrency` and replaces them with what these functions return; what to log and when the
next pass is due come back as values too.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType

from actors.messages import CreateFailure

QUOTA_ERROR_TTL = 60.0
CAPACITY_ERROR_TTL = 60.0
QUIET_AFTER_503 = 60.0


@dataclass(frozen=True)
class PoolState:
    """What decides whether a create may happen now."""

    at_quota_until: float = 0.0
    at_quota_until_fewer: int = 0  # at quota until fewer than this many instances exist
    capacity_until: Mapping = field(default_factory=lambda: MappingProxyType({}))  # key -> time
    create_hold_until: float = 0.0  # a rate-limit holdoff

    def at_quota(self, now: float) -> bool:
        return self.at_quota_until_fewer > 0 or now < self.at_quota_until

    def create_throttled(self, now: float) -> bool:
        return now < self.create_hold_until

    def blocked(self) -> frozenset:
        """The capacity keys (cloud.base.capacity_keys) under a capacity error."""
        return frozenset(self.capacity_until)


def expire(p: PoolState, now: float) -> PoolState:
    """``p`` without the capacity errors whose TTL has passed."""
    if all(t > now for t in p.capacity_until.values()):
        return p
    return replace(p, capacity_until=MappingProxyType(
        {k: t for k, t in p.capacity_until.items() if t > now}))


def after_listing(p: PoolState, n_instances: int) -> PoolState:
    """An instance went away since the quota error: creates may be tried again."""
    if p.at_quota_until_fewer > n_instances:
        return replace(p, at_quota_until_fewer=0)
    return p


@dataclass(frozen=True)
class FailureOutcome:
    state: PoolState
    wake: tuple[float, ...]  # times a pass is due (a TTL or holdoff ends)
    quota: str = ""  # "zero": wait for the TTL; "fewer": wait for an instance to go; "": no change
    capacity_until: float | None = None


def after_create_failure(p: PoolState, failure: CreateFailure, n_instances: int,
                         now: float) -> FailureOutcome:
    """Pool.Create's error handling; ``n_instances`` counts listed instances and pending creates."""
    wake: list[float] = []
    quota = ""
    cap_until = None
    if failure.quota:
        if n_instances < 1:
            p = replace(p, at_quota_until_fewer=0, at_quota_until=now + QUOTA_ERROR_TTL)
            quota = "zero"
        elif n_instances < p.at_quota_until_fewer or p.at_quota_until_fewer == 0:
            p = replace(p, at_quota_until_fewer=n_instances, at_quota_until=0.0)
            quota = "fewer"
        wake.append(now + QUOTA_ERROR_TTL)
    if failure.capacity_scope is not None:
        cap_until = now + CAPACITY_ERROR_TTL
        p = replace(p, capacity_until=MappingProxyType({**p.capacity_until,
                                                        failure.capacity_scope: cap_until}))
        wake.append(cap_until)
    if failure.retry_at:
        p = replace(p, create_hold_until=max(p.create_hold_until, failure.retry_at))
        wake.append(failure.retry_at)
    return FailureOutcome(p, tuple(wake), quota, cap_until)


@dataclass(frozen=True)
class Concurrency:
    """How many containers may run at once (0 = no limit), and what that estimate rests on."""

    max_containers: int
    within_quota: int = 0  # instances known to fit the cloud quota
    last_503: float = 0.0  # the API's last 503 this estimate has seen


def adjust(c: Concurrency, now: float, n_running: int, at_quota: bool, n_instances: int,
           last_503: float) -> Concurrency:
    """Arvados' maxConcurrency: back off after a 503 from the API, grow again once it is quiet,
    and keep to what the cloud quota allowed."""
    m, within, seen = c.max_containers, c.within_quota, c.last_503
    if last_503 > seen:
        seen = last_503
        m = max(1, n_running - 1)
    elif m > 0 and now - seen > QUIET_AFTER_503:
        m = max(m, n_running * 11 // 10 + 1)
    if 0 < within < n_instances:
        within = n_instances
    if at_quota:
        if m == 0 or m > n_instances:
            m = n_instances or 1
        within = n_instances
    elif within > 0 and m > within + 1:
        m = within + 1
    return Concurrency(m, within, seen)


def supervisor_limit(max_containers: int, fraction: float) -> int:
    """SupervisorFraction of the container limit, at least 1 when both are set (0 = no limit)."""
    n = int(max_containers * fraction)
    if n < 1 and fraction > 0 and max_containers > 0:
        n = 1
    return n

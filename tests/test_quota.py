"""actors.quota: the pool's quota/capacity state and the container concurrency limit (tables)."""

from __future__ import annotations

import pytest

from actors import quota
from actors.messages import CreateFailure
from actors.quota import CAPACITY_ERROR_TTL, QUOTA_ERROR_TTL, Concurrency, PoolState

NOW = 1000.0
CAP = ("type", "pt1", False)


@pytest.mark.parametrize("failure,n,before,want_state,want_wake,note", [
    # a quota error with nothing running: wait out the TTL
    (CreateFailure("q", quota=True), 0, PoolState(),
     PoolState(at_quota_until=NOW + QUOTA_ERROR_TTL), (NOW + QUOTA_ERROR_TTL,), "zero"),
    # with instances: at quota until one goes
    (CreateFailure("q", quota=True), 3, PoolState(),
     PoolState(at_quota_until_fewer=3), (NOW + QUOTA_ERROR_TTL,), "fewer"),
    # a lower count replaces a higher one ...
    (CreateFailure("q", quota=True), 2, PoolState(at_quota_until_fewer=3),
     PoolState(at_quota_until_fewer=2), (NOW + QUOTA_ERROR_TTL,), "fewer"),
    # ... a higher one does not
    (CreateFailure("q", quota=True), 4, PoolState(at_quota_until_fewer=3),
     PoolState(at_quota_until_fewer=3), (NOW + QUOTA_ERROR_TTL,), ""),
    # a rate limit holds creates off until its retry time (the later one wins)
    (CreateFailure("r", retry_at=NOW + 5), 1, PoolState(create_hold_until=NOW + 9),
     PoolState(create_hold_until=NOW + 9), (NOW + 5,), ""),
    (CreateFailure("plain"), 1, PoolState(), PoolState(), (), ""),
])
def test_after_create_failure(failure, n, before, want_state, want_wake, note):
    out = quota.after_create_failure(before, failure, n, NOW)
    assert (out.state, out.wake, out.quota) == (want_state, want_wake, note)


def test_capacity_error_blocks_its_key_until_the_ttl():
    out = quota.after_create_failure(PoolState(), CreateFailure("c", capacity_scope=CAP), 1, NOW)
    assert out.capacity_until == NOW + CAPACITY_ERROR_TTL and out.wake == (NOW + CAPACITY_ERROR_TTL,)
    assert out.state.blocked() == {CAP}
    assert quota.expire(out.state, NOW + CAPACITY_ERROR_TTL - 1).blocked() == {CAP}
    assert quota.expire(out.state, NOW + CAPACITY_ERROR_TTL).blocked() == frozenset()


@pytest.mark.parametrize("state,now,at_quota,throttled", [
    (PoolState(), NOW, False, False),
    (PoolState(at_quota_until=NOW + 1), NOW, True, False),
    (PoolState(at_quota_until=NOW), NOW, False, False),
    (PoolState(at_quota_until_fewer=2), NOW, True, False),
    (PoolState(create_hold_until=NOW + 1), NOW, False, True),
])
def test_at_quota_and_throttled(state, now, at_quota, throttled):
    assert state.at_quota(now) is at_quota and state.create_throttled(now) is throttled


@pytest.mark.parametrize("fewer,n,want", [(3, 2, 0), (3, 3, 3), (0, 5, 0)])
def test_after_listing_clears_quota_when_an_instance_went(fewer, n, want):
    assert quota.after_listing(PoolState(at_quota_until_fewer=fewer), n).at_quota_until_fewer == want


@pytest.mark.parametrize("before,now,running,at_quota,n,last503,want", [
    # a new 503: back off to one less than what runs
    (Concurrency(10), NOW, 6, False, 6, NOW - 1, Concurrency(5, 0, NOW - 1)),
    (Concurrency(10), NOW, 0, False, 0, NOW - 1, Concurrency(1, 0, NOW - 1)),
    # quiet for a minute: grow by 10% + 1 over what runs
    (Concurrency(5, 0, NOW - 61), NOW, 10, False, 10, NOW - 61, Concurrency(12, 0, NOW - 61)),
    # not yet quiet: unchanged
    (Concurrency(5, 0, NOW - 30), NOW, 10, False, 10, NOW - 30, Concurrency(5, 0, NOW - 30)),
    # 0 = unlimited stays unlimited while quiet
    (Concurrency(0), NOW, 10, False, 10, 0.0, Concurrency(0)),
    # at quota: no more containers than instances, and remember what fit
    (Concurrency(0), NOW, 3, True, 4, 0.0, Concurrency(4, 4, 0.0)),
    (Concurrency(9), NOW, 3, True, 0, 0.0, Concurrency(1, 0, 0.0)),
    # below quota again: at most one more than what fit
    (Concurrency(20, 4, 0.0), NOW, 3, False, 4, 0.0, Concurrency(5, 4, 0.0)),
    # more instances than known to fit: they fit
    (Concurrency(20, 4, 0.0), NOW, 3, False, 7, 0.0, Concurrency(8, 7, 0.0)),
])
def test_adjust_concurrency(before, now, running, at_quota, n, last503, want):
    assert quota.adjust(before, now, running, at_quota, n, last503) == want


@pytest.mark.parametrize("maxc,fraction,want", [(10, 0.2, 2), (3, 0.2, 1), (0, 0.2, 0), (10, 0.0, 0),
                                                (10, 1.0, 10)])
def test_supervisor_limit(maxc, fraction, want):
    assert quota.supervisor_limit(maxc, fraction) == want
